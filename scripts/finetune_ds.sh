#!/usr/bin/env bash
# Full fine-tuning on prompt/response data (formatted_data/advertise_gen.jsonl) with DeepSpeed ZeRO.
#
#   bash scripts/finetune_ds.sh                                   # 4 GPUs, ZeRO-2
#   DS_CONFIG=configs/ds_zero3.json NUM_GPUS=8 bash scripts/finetune_ds.sh
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node1 NUM_GPUS=8 bash scripts/finetune_ds.sh   # on each node
#   USE_CPU=1 BASE_MODEL_PATH=models/tiny-chatglm3 MAX_STEP=20 bash scripts/finetune_ds.sh
#   bash scripts/finetune_ds.sh --pre_seq_len 128                 # more finetune.py flags
#
# DS_CONFIG: configs/ds_zero2.json (default), ds_zero3.json (the saved model is consolidated),
# ds_zero3_offload.json (parameters and optimizer states in CPU memory). The other variables, and
# how the processes start: scripts/launcher_common.sh.
source "$(dirname "$0")/launcher_common.sh"
defaults NUM_GPUS=4 DEV_BATCH_SIZE=4 GRAD_ACCUMULARION_STEPS=1 LR=1e-4 MAX_STEP=500 SAVE_INTERVAL=500 \
    MAX_SOURCE_LEN=1024 MAX_TARGET_LEN=128 DATASET_PATH=formatted_data/advertise_gen.jsonl RUN_NAME=advertise_gen_ft
launch_finetune full input-output "$@"
