#!/usr/bin/env bash
# LoRA (or QLoRA on a 4/8-bit base) on prompt/response or multi-turn tool data, one GPU by default.
#
#   bash scripts/finetune_lora.sh                                   # advertise_gen, input-output
#   FORMAT=multi-turn bash scripts/finetune_lora.sh                 # tool_alpaca conversations
#   QUANTIZATION_BIT=4 LORA_TARGET=all-linear bash scripts/finetune_lora.sh      # QLoRA
#   bash scripts/finetune_lora.sh --deepspeed configs/ds_zero2.json  # more finetune.py flags
#
# The output is a small adapter folder (adapter_model.safetensors + adapter_config.json +
# tokenizer): chat with `.venv/bin/python inference.py --model BASE --lora OUTPUT_DIR`, or make a
# plain model with `.venv/bin/python scripts/merge_lora.py --base BASE --adapter OUTPUT_DIR --output MERGED`.
# The variables, and how the processes start: scripts/launcher_common.sh.
source "$(dirname "$0")/launcher_common.sh"
defaults FORMAT=input-output DEV_BATCH_SIZE=1 GRAD_ACCUMULARION_STEPS=16 LR=2e-4 MAX_STEP=1000 SAVE_INTERVAL=500 \
    LORA_RANK=8 LORA_ALPHA=32 LORA_DROPOUT=0.1 LORA_TARGET=q_proj,k_proj,v_proj,o_proj
case "$FORMAT" in
    input-output) defaults DATASET_PATH=formatted_data/advertise_gen.jsonl RUN_NAME=advertise_gen_lora \
                      MAX_SOURCE_LEN=1024 MAX_TARGET_LEN=128 ;;
    multi-turn) defaults DATASET_PATH=formatted_data/tool_alpaca.jsonl RUN_NAME=tool_alpaca_lora MAX_SEQ_LEN=2048 ;;
esac
launch_finetune lora "$FORMAT" "$@"
