"""Generation for inference, evaluation and the server.

- `chat_engine`: `ChatModel`, `load_chat_model` (prompt ids, generation, streamed and parsed replies);
- `batched_decoding`: `BatchedDecoder`, concurrent requests decoded together;
- `openai_protocol`: OpenAI chat requests into ChatGLM3 messages, and replies back.
"""
