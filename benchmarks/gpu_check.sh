#!/usr/bin/env bash
# The GPU check of issue #16, one command: P-Tuning v2 (pre_seq_len 128) and LoRA on a ChatGLM3-6B-shaped
# GLM with random weights at 2048 tokens (gradient checkpointing, bf16), packing on the per-record path
# (packed_sdpa, and flash-attention varlen when flash_attn imports), full fine-tuning of a ~1B GLM under
# DeepSpeed ZeRO-3. Prints one table and its JSON (also written to $OUT/gpu_check.json when OUT is set).
# About 3-5 minutes on one 80-141 GB GPU; each case is limited to 300 s. Nothing is downloaded.
#
#   bash benchmarks/gpu_check.sh                 # on the GPU machine, from the repository root
#   bash benchmarks/gpu_check.sh --dry           # tiny shapes on the CPU (what tests/benchmarks/test_gpu_check.py runs)
#   bash benchmarks/gpu_check.sh --cases ptuning lora
#
# Wheels to bring (the GPU machine has torch 2.11+cu130, transformers 5.17, accelerate, peft, safetensors,
# tokenizers; not the pinned transformers, nor deepspeed): put them in .whl/ at the repository root
# (git-ignored via .git/info/exclude) and this script installs them offline into /tmp/gpu_check_site,
# keeping the machine's torch. Made here with:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl transformers==5.24.0 tokenizers==0.23.3 huggingface_hub==2.4.0 peft==0.21.2 safetensors==0.8.0 \
#     hjson==3.1.0 msgpack==1.2.4 ninja==1.13.2 py-cpuinfo==9.0.0 einops==0.8.2 pydantic==2.14.4 \
#     pydantic-core typer regex        # (pure-python ones take --platform any; add what `pip show` there lacks)
#   DS_BUILD_OPS=0 pip wheel --no-deps deepspeed==0.19.8 -w .whl      # pure python, builds in seconds
# and on the device tool: run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=540).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}   # the GPU machine's python3; the CPU dry run passes the project's venv Python
if [ -d .whl ] && ls .whl/*.whl > /dev/null 2>&1; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/gpu_check_site .whl/*.whl
    export PYTHONPATH="/tmp/gpu_check_site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
# The GPU machine keeps its own CUDA torch (2.11), not the pinned 2.13: the private-API version check
# (chatglm3_finetune/compat.py) then warns instead of stopping; the table reports the versions.
export CHATGLM3_FT_ALLOW_UNTESTED=1
json_args=()
if [ -n "${OUT:-}" ]; then json_args=(--json "$OUT/gpu_check.json"); fi
exec "$PYTHON" benchmarks/gpu_check.py "${json_args[@]}" "$@"
