#!/usr/bin/env bash
# The offline demo, one command on a fresh machine (no GPU, no network):
#
#   bash scripts/demo.sh                  # SKIP_SETUP=1 to reuse an existing .venv
#
# 1. scripts/setup.sh: .venv with the pinned requirements (skipped with SKIP_SETUP=1);
# 2. scripts/make_tiny_model.py: a tiny GLM model with the ChatGLM3 layout and tokenizer,
#    briefly pretrained on the samples' plain texts (models/tiny-chatglm3): on random weights a
#    prefix cannot lower the loss, the logits stay near uniform;
# 3. the bundled samples (data/sample) through both converters into formatted_data/demo/;
# 4. P-Tuning v2 (with the prefix MLP, --prefix_projection) on the CPU through
#    scripts/finetune_pt_multiturn.sh into output/demo (sanity check, progress bar,
#    output/demo/train.log, loss_curve.png);
# 5. one answer from the tuned model through inference.py, which reads the prefix settings from
#    the checkpoint (no flags).
# Steps 2-5 take about two minutes on two cores. DEMO_STEPS changes the P-Tuning step count,
# DEMO_MODEL_ARGS adds scripts/make_tiny_model.py flags (the tests shorten its pretraining).
# The demo writes only into its own folders (models/tiny-chatglm3, formatted_data/demo/,
# output/demo/): your formatted_data/*.jsonl and other runs are never touched.
source "$(dirname "$0")/launcher_common.sh"  # the project root, fail, find_python

step() { printf '\n==== %s\n' "$*"; }

if [ "${SKIP_SETUP:-0}" != 1 ]; then
    step "Installing the pinned requirements into .venv (scripts/setup.sh)"
    bash scripts/setup.sh
fi
find_python
# The tiny model is fastest on one thread; more threads only contend.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
MODEL=models/tiny-chatglm3
DATA=formatted_data/demo
OUTPUT_DIR=output/demo

step "Building the tiny ChatGLM3-layout model ($MODEL)"
"$PYTHON" scripts/make_tiny_model.py --output "$MODEL" ${DEMO_MODEL_ARGS:-}

step "Formatting the bundled samples (data/sample -> $DATA/)"
mkdir -p "$DATA"
"$PYTHON" scripts/format_tool_alpaca.py --path data/sample/tool_alpaca_train.json --output "$DATA/tool_alpaca.jsonl"
"$PYTHON" scripts/format_advertise_gen.py --path data/sample/advertise_gen_train.json --output "$DATA/advertise_gen.jsonl"

step "P-Tuning v2 on the tool conversations, on the CPU (scripts/finetune_pt_multiturn.sh -> $OUTPUT_DIR)"
rm -rf "$OUTPUT_DIR"  # a rerun starts over rather than resuming a finished run
USE_CPU=1 NUM_GPUS=1 NNODES=1 HOSTFILE= BASE_MODEL_PATH="$MODEL" DATASET_PATH="$DATA/tool_alpaca.jsonl" \
    MAX_STEP=${DEMO_STEPS:-150} PRE_SEQ_LEN=16 LR=2e-2 MAX_SEQ_LEN=1024 DEV_BATCH_SIZE=4 \
    GRAD_ACCUMULARION_STEPS=1 SAVE_INTERVAL=1000000 LOGGING_STEPS=1 OUTPUT_DIR="$OUTPUT_DIR" PYTHON="$PYTHON" \
    EXTRA_ARGS="--prefix_projection --report_to none" \
    bash scripts/finetune_pt_multiturn.sh
"$PYTHON" -c '
import json, sys
losses = [e["loss"] for e in json.load(open(sys.argv[1]))["log_history"] if "loss" in e]
first, last = (sum(part) / len(part) for part in (losses[:10], losses[-10:]))
print(f"P-Tuning loss, mean of the first and last 10 steps: {first:.2f} -> {last:.2f}")
' "$OUTPUT_DIR/trainer_state.json"
echo "loss curve: $OUTPUT_DIR/loss_curve.png, log: $OUTPUT_DIR/train.log"

step "Asking the tuned model (inference.py --pt-checkpoint $OUTPUT_DIR)"
"$PYTHON" -c '
import json, sys
print(json.dumps(json.loads(open(sys.argv[1]).readline())["tools"], ensure_ascii=False))
' "$DATA/tool_alpaca.jsonl" > "$DATA/tools.json"
"$PYTHON" inference.py --model "$MODEL" --pt-checkpoint "$OUTPUT_DIR" --tools "$DATA/tools.json" \
    --max-new-tokens 48 --prompt "What is the weather like in Paris right now?"
