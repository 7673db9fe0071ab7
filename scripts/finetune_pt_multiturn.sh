#!/usr/bin/env bash
# P-Tuning v2 on multi-turn tool conversations (formatted_data/tool_alpaca.jsonl), one GPU by default.
#
#   BASE_MODEL_PATH=models/chatglm3-6b bash scripts/finetune_pt_multiturn.sh
#   OUTPUT_DIR=output/tool_alpaca_pt-20261127-101500-128-2e-2 bash scripts/finetune_pt_multiturn.sh   # resume
#   EXTRA_ARGS="--prefix_projection --run_name 'my run'" bash scripts/finetune_pt_multiturn.sh
#   QUANTIZATION_BIT=4 bash scripts/finetune_pt_multiturn.sh        # a frozen 4-bit base (8 also works)
#
# On a CPU, with the demo's tiny model and data (bash scripts/demo.sh builds them), in about a minute on
# two cores (the defaults above are sized for a GPU and the 6B model: 16 records a step, a
# 128-token prefix):
#   OMP_NUM_THREADS=1 USE_CPU=1 BASE_MODEL_PATH=models/tiny-chatglm3 DATASET_PATH=formatted_data/demo/tool_alpaca.jsonl \
#       PRE_SEQ_LEN=16 DEV_BATCH_SIZE=4 GRAD_ACCUMULARION_STEPS=1 MAX_SEQ_LEN=1024 MAX_STEP=40 bash scripts/finetune_pt_multiturn.sh
#
# The variables, and how the processes start: scripts/launcher_common.sh.
source "$(dirname "$0")/launcher_common.sh"
defaults DEV_BATCH_SIZE=1 GRAD_ACCUMULARION_STEPS=16 LR=2e-2 MAX_STEP=1000 SAVE_INTERVAL=500 PRE_SEQ_LEN=128 \
    MAX_SEQ_LEN=2048 DATASET_PATH=formatted_data/tool_alpaca.jsonl RUN_NAME=tool_alpaca_pt
launch_finetune p-tuning multi-turn "$@"
