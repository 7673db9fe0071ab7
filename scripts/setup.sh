#!/usr/bin/env bash
# Creates .venv and installs the pinned requirements (CPU torch first so nothing pulls a CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -d .venv ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
TORCH_PIN=$(grep -E '^torch==' requirements.txt)
DS_BUILD_OPS=0 python -m pip install -q "$TORCH_PIN"
DS_BUILD_OPS=0 python -m pip install -q -r requirements.txt
python -m pip install -q --no-deps -e .
python -c "import chatglm3_finetune, torch, transformers, deepspeed, peft, datasets, sentencepiece, jieba, rouge_chinese, nltk" 
