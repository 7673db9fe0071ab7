#!/usr/bin/env bash
# P-Tuning v2 on multi-turn tool conversations (formatted_data/tool_alpaca.jsonl), one GPU by default.
#
#   BASE_MODEL_PATH=models/chatglm3-6b bash scripts/finetune_pt_multiturn.sh
#   OUTPUT_DIR=output/tool_alpaca_pt-20261127-101500-128-2e-2 bash scripts/finetune_pt_multiturn.sh   # resume
#   EXTRA_ARGS="--prefix_projection --run_name 'my run'" bash scripts/finetune_pt_multiturn.sh
#   QUANTIZATION_BIT=4 bash scripts/finetune_pt_multiturn.sh        # a frozen 4-bit base (8 also works)
#
# The variables, and how the processes start: scripts/launcher_common.sh.
source "$(dirname "$0")/launcher_common.sh"
defaults DEV_BATCH_SIZE=1 GRAD_ACCUMULARION_STEPS=16 LR=2e-2 MAX_STEP=1000 SAVE_INTERVAL=500 PRE_SEQ_LEN=128 \
    MAX_SEQ_LEN=2048 DATASET_PATH=formatted_data/tool_alpaca.jsonl RUN_NAME=tool_alpaca_pt
launch_finetune p-tuning multi-turn "$@"
