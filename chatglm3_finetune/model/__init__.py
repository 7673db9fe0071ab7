"""Models: loading, attention, checkpoint folders, conversion and merging.

- `loading`: `load_base_model`, `add_prefix_tuning`, `add_lora`, quantization;
- `stored_weights`: the dtype a folder's weights are stored in, and casting them one tensor at a time;
- `inference_loading`: `load_for_inference`, a model and its tokenizer for generation;
- `packed_attention`: `packed_sdpa`, attention per record in packed rows;
- `checkpoint_folders`: `folder_kind` (a prefix, a LoRA adapter or a full model);
- `conversion`: original THUDM ChatGLM3 checkpoints into native `GlmForCausalLM` folders;
- `lora_merge`: a LoRA adapter merged into its base model;
- `tiny_model`, `make_tiny_model`: tiny ChatGLM3-layout models for tests and the demo;
- `ptuning`: P-Tuning v2.
"""
