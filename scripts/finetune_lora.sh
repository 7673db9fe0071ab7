#!/usr/bin/env bash
# LoRA (or QLoRA on a 4/8-bit base) on prompt/response or multi-turn tool data, one node.
#
#   bash scripts/finetune_lora.sh                                   # advertise_gen, input-output
#   FORMAT=multi-turn bash scripts/finetune_lora.sh                 # tool_alpaca conversations
#   QUANTIZATION_BIT=4 LORA_TARGET=all-linear bash scripts/finetune_lora.sh      # QLoRA
#   USE_CPU=1 BASE_MODEL_PATH=models/tiny-chatglm3 MAX_STEP=20 bash scripts/finetune_lora.sh
#   bash scripts/finetune_lora.sh --deepspeed configs/ds_zero2.json  # extra finetune.py flags (or EXTRA_ARGS=...)
#
# Every variable below can be set from the environment. Relative paths are relative to the
# project root. BASE_MODEL_PATH is a local folder (nothing is downloaded): a ChatGLM3-6B converted
# with scripts/convert_chatglm3.py, or models/tiny-chatglm3 from scripts/make_tiny_model.py.
# OUTPUT_DIR defaults to a fresh timestamped folder; to RESUME an interrupted run, rerun with
# OUTPUT_DIR set to its folder: finetune.py continues from the newest checkpoint there.
# The output is a small adapter folder (adapter_model.safetensors + adapter_config.json +
# tokenizer): chat with `python inference.py --model BASE --lora OUTPUT_DIR`, or make a plain
# model with `python scripts/merge_lora.py --adapter OUTPUT_DIR --output MERGED`.
# USE_CPU=1 trains on the CPU (no GPU needed); PRECISION=bf16|fp16|fp32 (default: bf16 where the
# GPU supports it, else fp16; fp32 on the CPU); DRY_RUN=1 prints the command instead of running it.
set -eo pipefail
cd "$(dirname "$0")/.."
source scripts/launcher_common.sh

FORMAT=${FORMAT:-input-output}
USE_CPU=${USE_CPU:-0}
NUM_GPUS=${NUM_GPUS:-1}
DEV_BATCH_SIZE=${DEV_BATCH_SIZE:-1}
GRAD_ACCUMULARION_STEPS=${GRAD_ACCUMULARION_STEPS:-${GRAD_ACCUMULATION_STEPS:-16}}
LR=${LR:-2e-4}
MAX_STEP=${MAX_STEP:-1000}
LOGGING_STEPS=${LOGGING_STEPS:-10}  # loss, tokens and speed every N optimizer steps (each log reads the device)
SAVE_INTERVAL=${SAVE_INTERVAL:-500}
LORA_RANK=${LORA_RANK:-8}
LORA_ALPHA=${LORA_ALPHA:-32}
LORA_DROPOUT=${LORA_DROPOUT:-0.1}
LORA_TARGET=${LORA_TARGET:-q_proj,k_proj,v_proj,o_proj}
QUANTIZATION_BIT=${QUANTIZATION_BIT:-}
BASE_MODEL_PATH=${BASE_MODEL_PATH:-models/chatglm3-6b}
PRECISION=${PRECISION:-auto}

case "$FORMAT" in
    input-output)
        DATASET_PATH=${DATASET_PATH:-formatted_data/advertise_gen.jsonl}
        RUN_NAME=${RUN_NAME:-advertise_gen_lora}
        MAX_SOURCE_LEN=${MAX_SOURCE_LEN:-1024}
        MAX_TARGET_LEN=${MAX_TARGET_LEN:-128}
        LENGTH_ARGS=(--max_source_length "$MAX_SOURCE_LEN" --max_target_length "$MAX_TARGET_LEN") ;;
    multi-turn)
        DATASET_PATH=${DATASET_PATH:-formatted_data/tool_alpaca.jsonl}
        RUN_NAME=${RUN_NAME:-tool_alpaca_lora}
        MAX_SEQ_LEN=${MAX_SEQ_LEN:-2048}
        LENGTH_ARGS=(--max_seq_length "$MAX_SEQ_LEN") ;;
    *) echo "FORMAT must be input-output or multi-turn, got '$FORMAT'" >&2; exit 2 ;;
esac
DATESTR=${DATESTR:-$(date +%Y%m%d-%H%M%S)}
OUTPUT_DIR=${OUTPUT_DIR:-output/${RUN_NAME}-${DATESTR}-r${LORA_RANK}-${LR}}

set_device_args
QUANT_ARGS=()
[ -n "$QUANTIZATION_BIT" ] && QUANT_ARGS+=(--quantization_bit "$QUANTIZATION_BIT")
set_extra_args

CMD=(torchrun --standalone --nnodes=1 --nproc_per_node="$NUM_GPUS" finetune.py
    --do_train
    --train_format "$FORMAT"
    --train_file "$DATASET_PATH"
    "${LENGTH_ARGS[@]}"
    --preprocessing_num_workers 1
    --model_name_or_path "$BASE_MODEL_PATH"
    --output_dir "$OUTPUT_DIR"
    --per_device_train_batch_size "$DEV_BATCH_SIZE"
    --gradient_accumulation_steps "$GRAD_ACCUMULARION_STEPS"
    --max_steps "$MAX_STEP"
    --logging_steps "$LOGGING_STEPS"
    --save_steps "$SAVE_INTERVAL"
    --learning_rate "$LR"
    --lora_rank "$LORA_RANK"
    --lora_alpha "$LORA_ALPHA"
    --lora_dropout "$LORA_DROPOUT"
    --lora_target "$LORA_TARGET"
    --gradient_checkpointing
    "${QUANT_ARGS[@]}" "${DEVICE_ARGS[@]}" "${EXTRA[@]}" "$@")

# Unlike the other launchers, DRY_RUN=1 prints the bare command on stdout (ready to paste, or to
# split: tests/test_lora.py reruns it), and a real run prints it once on stderr, where set -x used to.
if [ "${DRY_RUN:-0}" = 1 ]; then
    echo "$(shell_quoted "${CMD[@]}")"
    exit 0
fi
echo "+ $(shell_quoted "${CMD[@]}")" >&2
run_logged "$OUTPUT_DIR" "${CMD[@]}"
