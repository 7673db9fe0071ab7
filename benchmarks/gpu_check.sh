#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py): the real pipeline as a ChatGLM3-6B user runs it - a random
# checkpoint in the original THUDM layout, written shard by shard and converted with
# scripts/convert_chatglm3.py, then per case the launcher with the user's flags, a resume of one more
# step, inference.py and (P-Tuning) api_server.py. Cases: P-Tuning v2 (pre_seq_len 128, 2048 tokens,
# bf16, gradient checkpointing) plain, 8-bit and 4-bit; LoRA and QLoRA; packing (packed_sdpa, and
# flash-attention varlen where flash_attn imports); full fine-tuning of a ~1B GLM under ZeRO-2, ZeRO-3
# and ZeRO-3 with offload, and P-Tuning under ZeRO-2. Prints one table (peak GPU memory measured inside each training process,
# the memory plan's figure next to it where finetune.py has --plan_json, step time, tokens/s, MFU);
# exits 1 when a case failed. docs/gpu-check.md explains the table and holds the last results.
#
#   bash benchmarks/gpu_check.sh                    # on a GPU machine; cases that would start after 450 s are skipped
#   bash benchmarks/gpu_check.sh --cpu              # the 6B rehearsal on this CPU (< 20 GB RSS; about 90 min on 2 busy cores)
#   bash benchmarks/gpu_check.sh --dry              # tiny shapes on the CPU, every case's code path (7-15 min)
#   bash benchmarks/gpu_check.sh --cases ptuning lora --json out.json
#
# Through the device tool of this workplace (its GPU machine has torch 2.11+cu130, transformers 5.17,
# peft, accelerate; not the pinned transformers, deepspeed, datasets, bitsandbytes or fastapi, and no
# network): first, here, `bash benchmarks/gpu_check_wheels.sh` fills .gpu_check/ (git-ignored) with
#   wheels/  transformers 5.24.0, peft 0.21.2, datasets 5.2.0 + dill + multiprocess + xxhash, deepspeed
#            0.19.8 built without ops + hjson + pydantic 2.14.4 + pydantic-core + annotated-types +
#            typing-inspection + typing-extensions, bitsandbytes 0.50.2 with only its CUDA 13.0 and CPU
#            kernels, fastapi + starlette + uvicorn + opentelemetry-api (the server)
#   tokenizer/  the real ChatGLM3 tokenizer.model and tokenizer_config.json
#   (24.6 MB in all, each size printed)
# then: run(command="bash benchmarks/gpu_check.sh --json $OUT/gpu_check.json", carry=[".gpu_check"],
# timeout_s=590), and for cases skipped for time, at once (the warm machine keeps the models):
# run(command="bash benchmarks/gpu_check.sh --cases NAME... --json $OUT/gpu_check.json", carry=[".gpu_check"]).
# This script installs the wheels offline into /tmp/gpu_check_site with --no-deps, keeping the
# machine's own CUDA torch; the output starts with the versions found.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
if ls .gpu_check/wheels/*.whl > /dev/null 2>&1 && ! "$PYTHON" -c "import deepspeed, datasets" 2> /dev/null; then
    echo "installing $(ls .gpu_check/wheels/*.whl | wc -l) wheels from .gpu_check/wheels into /tmp/gpu_check_site" >&2
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/gpu_check_site .gpu_check/wheels/*.whl
    export PYTHONPATH="/tmp/gpu_check_site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHON PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
# A GPU machine keeps its own CUDA torch, not the pinned one: the private-API version check
# (chatglm3_finetune/compat.py) then warns instead of stopping; the report prints the versions.
export CHATGLM3_FT_ALLOW_UNTESTED=1
exec "$PYTHON" benchmarks/gpu_check.py "$@"
