#!/usr/bin/env bash
# P-Tuning v2 on prompt/response data (formatted_data/advertise_gen.jsonl), one GPU by default.
#
#   bash scripts/finetune_pt.sh
#   NUM_GPUS=2 LR=1e-2 PRE_SEQ_LEN=64 bash scripts/finetune_pt.sh
#   bash scripts/finetune_pt.sh --prefix_projection               # more finetune.py flags
#   QUANTIZATION_BIT=8 bash scripts/finetune_pt.sh                  # a frozen 8-bit base (4 also works)
#
# On a CPU, with the demo's tiny model and data (bash scripts/demo.sh builds them), in about a minute on
# two cores (the defaults above are sized for a GPU and the 6B model: 32 records a step, a
# 128-token prefix):
#   OMP_NUM_THREADS=1 USE_CPU=1 BASE_MODEL_PATH=models/tiny-chatglm3 DATASET_PATH=formatted_data/demo/advertise_gen.jsonl \
#       PRE_SEQ_LEN=16 DEV_BATCH_SIZE=4 GRAD_ACCUMULARION_STEPS=1 MAX_STEP=40 bash scripts/finetune_pt.sh
#
# LoRA is scripts/finetune_lora.sh (finetune.py refuses --lora_rank together with --pre_seq_len).
# The variables, and how the processes start: scripts/launcher_common.sh.
source "$(dirname "$0")/launcher_common.sh"
defaults DEV_BATCH_SIZE=1 GRAD_ACCUMULARION_STEPS=32 LR=2e-2 MAX_STEP=1000 SAVE_INTERVAL=500 PRE_SEQ_LEN=128 \
    MAX_SOURCE_LEN=1024 MAX_TARGET_LEN=128 DATASET_PATH=formatted_data/advertise_gen.jsonl RUN_NAME=advertise_gen_pt
launch_finetune p-tuning input-output "$@"
