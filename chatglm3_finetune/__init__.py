"""The ChatGLM3 fine-tuning library, one subpackage per concern:

- `format`: the ChatGLM3 tokenizer and the conversation format (the one contract every part shares);
- `data`: records in, training batches out (read, validate, convert formats, encode, cache, pack, collate);
- `model`: loading, attention, checkpoint folders, conversion, LoRA merge; `model.ptuning` for P-Tuning v2;
- `train`: the targets-only loss, token counts, and what keeps runs safe;
- `plan`: the memory and time plan of a run, one training step simulated on fake tensors;
- `serve`: the chat engine, batched decoding, the OpenAI protocol;
- `evaluate`: generation-based evaluation and its metrics;
- `compat`: every use of a private library API, behind a version check;
- `did_you_mean`: the closest valid choice for an error message (roles, option names).

The top-level files (finetune.py, inference.py, api_server.py, ...) are what users run; they
import this package, never the other way round.
"""
