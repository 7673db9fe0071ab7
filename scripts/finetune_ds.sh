#!/usr/bin/env bash
# Full fine-tuning on prompt/response data (formatted_data/advertise_gen.jsonl) with DeepSpeed ZeRO.
#
#   bash scripts/finetune_ds.sh                                   # 4 GPUs, ZeRO-2
#   DS_CONFIG=configs/ds_zero3.json NUM_GPUS=8 bash scripts/finetune_ds.sh
#   HOSTFILE=hostfile MASTER_ADDR=node1 bash scripts/finetune_ds.sh   # several nodes
#   USE_CPU=1 BASE_MODEL_PATH=models/tiny-chatglm3 MAX_STEP=20 bash scripts/finetune_ds.sh
#   bash scripts/finetune_ds.sh --pre_seq_len 128                 # extra finetune.py flags (or EXTRA_ARGS=...)
#
# Every variable below can be set from the environment. Relative paths are relative to the
# project root. BASE_MODEL_PATH is a local folder (nothing is downloaded): a ChatGLM3-6B converted
# with scripts/convert_chatglm3.py, or models/tiny-chatglm3 from scripts/make_tiny_model.py.
# OUTPUT_DIR defaults to a fresh timestamped folder; to RESUME an interrupted run, rerun with
# OUTPUT_DIR set to its folder: finetune.py continues from the newest checkpoint there (and
# train.log is appended to). EXTRA_ARGS is split like shell words, quotes included.
# DS_CONFIG: configs/ds_zero2.json (default), ds_zero3.json (the saved model is consolidated),
# ds_zero3_offload.json (parameters and optimizer states in CPU memory).
# HOSTFILE (multi-node, DeepSpeed's "host slots=N" lines), MASTER_ADDR, MASTER_PORT go to the launcher.
# USE_CPU=1 trains on the CPU (no GPU needed); PRECISION=bf16|fp16|fp32 (default: bf16 where the
# GPU supports it, else fp16; fp32 on the CPU); DRY_RUN=1 prints the command instead of running it.
set -eo pipefail
cd "$(dirname "$0")/.."
source scripts/launcher_common.sh

USE_CPU=${USE_CPU:-0}
[ "$USE_CPU" = 1 ] && NUM_GPUS=${NUM_GPUS:-1}
NUM_GPUS=${NUM_GPUS:-4}
DEV_BATCH_SIZE=${DEV_BATCH_SIZE:-4}
GRAD_ACCUMULARION_STEPS=${GRAD_ACCUMULARION_STEPS:-${GRAD_ACCUMULATION_STEPS:-1}}
LR=${LR:-1e-4}
MAX_STEP=${MAX_STEP:-500}
LOGGING_STEPS=${LOGGING_STEPS:-10}  # loss, tokens and speed every N optimizer steps (each log reads the device)
SAVE_INTERVAL=${SAVE_INTERVAL:-500}
MAX_SOURCE_LEN=${MAX_SOURCE_LEN:-1024}
MAX_TARGET_LEN=${MAX_TARGET_LEN:-128}
DATASET_PATH=${DATASET_PATH:-formatted_data/advertise_gen.jsonl}
BASE_MODEL_PATH=${BASE_MODEL_PATH:-models/chatglm3-6b}
RUN_NAME=${RUN_NAME:-advertise_gen_ft}
DATESTR=${DATESTR:-$(date +%Y%m%d-%H%M%S)}
OUTPUT_DIR=${OUTPUT_DIR:-output/${RUN_NAME}-${DATESTR}-${LR}}
DS_CONFIG=${DS_CONFIG:-configs/ds_zero2.json}
PRECISION=${PRECISION:-auto}

set_device_args
set_deepspeed_launcher_args
set_extra_args

CMD=(deepspeed "${LAUNCHER_ARGS[@]}" finetune.py
    --deepspeed "$DS_CONFIG"
    --do_train
    --train_format input-output
    --train_file "$DATASET_PATH"
    --max_source_length "$MAX_SOURCE_LEN"
    --max_target_length "$MAX_TARGET_LEN"
    --preprocessing_num_workers 1
    --model_name_or_path "$BASE_MODEL_PATH"
    --output_dir "$OUTPUT_DIR"
    --per_device_train_batch_size "$DEV_BATCH_SIZE"
    --gradient_accumulation_steps "$GRAD_ACCUMULARION_STEPS"
    --max_steps "$MAX_STEP"
    --logging_steps "$LOGGING_STEPS"
    --save_steps "$SAVE_INTERVAL"
    --learning_rate "$LR"
    --gradient_checkpointing
    "${DEVICE_ARGS[@]}" "${EXTRA[@]}" "$@")

launch "$OUTPUT_DIR" "${CMD[@]}"
