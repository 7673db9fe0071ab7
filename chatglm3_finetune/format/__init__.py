"""The ChatGLM3 tokenizer and conversation format.

- `tokenizer`: `load_tokenizer`, `ChatGLM3Tokenizer` (exact to the id, no remote code);
- `fast_tokenizer`: `build_fast_tokenizer`, its `AutoTokenizer` twin with the chat template;
- `chat_format`: special and role tokens, `Message`, the tools prompt, tool-call and interpreter
  rendering, `build_chat_input`;
- `chat_parsing`: `parse_assistant_reply`, replies read back into text, tool calls or code.
"""
