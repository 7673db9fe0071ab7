#!/usr/bin/env bash
# P-Tuning v2 on prompt/response data (formatted_data/advertise_gen.jsonl), one node.
#
#   bash scripts/finetune_pt.sh
#   NUM_GPUS=2 LR=1e-2 PRE_SEQ_LEN=64 bash scripts/finetune_pt.sh
#   USE_CPU=1 BASE_MODEL_PATH=models/tiny-chatglm3 MAX_STEP=20 bash scripts/finetune_pt.sh
#   bash scripts/finetune_pt.sh --prefix_projection         # extra finetune.py flags (or EXTRA_ARGS=...)
#
# LoRA is scripts/finetune_lora.sh (finetune.py refuses --lora_rank together with --pre_seq_len).
#
# Every variable below can be set from the environment. Relative paths are relative to the
# project root. BASE_MODEL_PATH is a local folder (nothing is downloaded): a ChatGLM3-6B converted
# with scripts/convert_chatglm3.py, or models/tiny-chatglm3 from scripts/make_tiny_model.py.
# OUTPUT_DIR defaults to a fresh timestamped folder; to RESUME an interrupted run, rerun with
# OUTPUT_DIR set to its folder: finetune.py continues from the newest checkpoint there (and
# train.log is appended to). EXTRA_ARGS is split like shell words, quotes included.
# USE_CPU=1 trains on the CPU (no GPU needed); PRECISION=bf16|fp16|fp32 (default: bf16 where the
# GPU supports it, else fp16; fp32 on the CPU); DRY_RUN=1 prints the command instead of running it.
set -eo pipefail
cd "$(dirname "$0")/.."
source scripts/launcher_common.sh

USE_CPU=${USE_CPU:-0}
NUM_GPUS=${NUM_GPUS:-1}
DEV_BATCH_SIZE=${DEV_BATCH_SIZE:-1}
GRAD_ACCUMULARION_STEPS=${GRAD_ACCUMULARION_STEPS:-${GRAD_ACCUMULATION_STEPS:-32}}
LR=${LR:-2e-2}
MAX_STEP=${MAX_STEP:-1000}
LOGGING_STEPS=${LOGGING_STEPS:-10}  # loss, tokens and speed every N optimizer steps (each log reads the device)
SAVE_INTERVAL=${SAVE_INTERVAL:-500}
MAX_SOURCE_LEN=${MAX_SOURCE_LEN:-1024}
MAX_TARGET_LEN=${MAX_TARGET_LEN:-128}
PRE_SEQ_LEN=${PRE_SEQ_LEN:-128}
DATASET_PATH=${DATASET_PATH:-formatted_data/advertise_gen.jsonl}
BASE_MODEL_PATH=${BASE_MODEL_PATH:-models/chatglm3-6b}
RUN_NAME=${RUN_NAME:-advertise_gen_pt}
DATESTR=${DATESTR:-$(date +%Y%m%d-%H%M%S)}
OUTPUT_DIR=${OUTPUT_DIR:-output/${RUN_NAME}-${DATESTR}-${PRE_SEQ_LEN}-${LR}}
PRECISION=${PRECISION:-auto}

set_device_args
set_extra_args

CMD=(torchrun --standalone --nnodes=1 --nproc_per_node="$NUM_GPUS" finetune.py
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
    --pre_seq_len "$PRE_SEQ_LEN"
    --gradient_checkpointing
    "${DEVICE_ARGS[@]}" "${EXTRA[@]}" "$@")

launch "$OUTPUT_DIR" "${CMD[@]}"
