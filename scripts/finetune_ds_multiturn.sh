#!/usr/bin/env bash
# Full fine-tuning on multi-turn tool conversations (formatted_data/tool_alpaca.jsonl) with
# DeepSpeed ZeRO-2 (DS_CONFIG=configs/ds_zero3.json for ZeRO-3).
#
#   BASE_MODEL_PATH=models/chatglm3-6b bash scripts/finetune_ds_multiturn.sh      # 4 GPUs
#   HOSTFILE=hostfile bash scripts/finetune_ds_multiturn.sh        # several nodes through DeepSpeed's ssh
#   USE_CPU=1 BASE_MODEL_PATH=models/tiny-chatglm3 MAX_STEP=20 bash scripts/finetune_ds_multiturn.sh
#
# The variables, and how the processes start: scripts/launcher_common.sh.
source "$(dirname "$0")/launcher_common.sh"
defaults NUM_GPUS=4 DEV_BATCH_SIZE=16 GRAD_ACCUMULARION_STEPS=1 LR=1e-4 MAX_STEP=200 SAVE_INTERVAL=50 \
    MAX_SEQ_LEN=2048 DATASET_PATH=formatted_data/tool_alpaca.jsonl RUN_NAME=tool_alpaca_ft
launch_finetune full multi-turn "$@"
