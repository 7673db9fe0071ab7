"""The ChatGLM3 fine-tuning library: the tokenizer, the conversation format, data encoding and
collation, P-Tuning v2, the targets-only loss, model loading and conversion, generation, metrics,
and the one module that touches private library APIs (private_api, version-checked).

The top-level files (finetune.py, inference.py, api_server.py, ...) are what users run; they
import this package, never the other way round.
"""
