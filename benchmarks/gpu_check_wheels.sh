#!/usr/bin/env bash
# Fills .gpu_check/ (git-ignored) with what benchmarks/gpu_check.sh needs on a GPU machine that has its
# own CUDA torch but no network: wheels/ (the project's pinned pure-Python needs for Python 3.12,
# deepspeed built here without ops, bitsandbytes cut down to its CUDA 13.0 and CPU kernels) and
# tokenizer/ (the real ChatGLM3 tokenizer files). Prints each wheel's size and the total, which must
# stay under the device tool's 64 MiB carry limit.
#
#   bash benchmarks/gpu_check_wheels.sh              # versions: requirements.txt, else this .venv's
#   TOKENIZER_DIR=path/to/chatglm3-6b bash benchmarks/gpu_check_wheels.sh
set -euo pipefail
case "${1:-}" in
    "") ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "error: unknown argument $1: this script takes none (PYTHON and TOKENIZER_DIR come from the environment; see --help)" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
TOKENIZER_DIR=${TOKENIZER_DIR:-../shared/data/chatglm3-tokenizer}
DEST=.gpu_check
# What the GPU machine lacks (its torch, accelerate, huggingface_hub, tokenizers, safetensors,
# sentencepiece, pyarrow, numpy, ... stay as they are).
PACKAGES=(transformers peft datasets dill multiprocess xxhash hjson pydantic pydantic-core annotated-types
          typing-inspection typing-extensions fastapi starlette uvicorn opentelemetry-api)

# A clone may lack .git/info; outside a git checkout there is nothing to keep .gpu_check out of.
if exclude=$(git rev-parse --git-path info/exclude 2> /dev/null); then
    mkdir -p "$(dirname "$exclude")"
    grep -qx "/$DEST/" "$exclude" 2> /dev/null || echo "/$DEST/" >> "$exclude"
fi
rm -rf "$DEST/wheels" && mkdir -p "$DEST/wheels" "$DEST/tokenizer"

version() {  # the pin in requirements.txt, else the version installed in this .venv
    local pin
    pin=$(grep -iE "^$1==" requirements.txt | head -n 1 | cut -d= -f3)
    if [ -n "$pin" ]; then echo "$pin"; else "$PYTHON" -c "import importlib.metadata as m; print(m.version('$1'))"; fi
}
specs=()
for name in "${PACKAGES[@]}"; do specs+=("$name==$(version "$name")"); done
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any -d "$DEST/wheels" "${specs[@]}" 2>&1 | grep -v "is ignored" || true
DS_BUILD_OPS=0 "$PYTHON" -m pip wheel -q --no-deps --no-build-isolation "deepspeed==$(version deepspeed)" \
    -w "$DEST/wheels" 2>&1 | grep -v "is ignored" || true

# bitsandbytes ships kernels for every CUDA and ROCm release (43 MB): keep the CPU one and CUDA 13.0's,
# which the GPU machine's torch (cu130) loads.
bnb_dir=$(mktemp -d)
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_24_x86_64 \
    -d "$bnb_dir" "bitsandbytes==$(version bitsandbytes)" 2>&1 | grep -v "is ignored" || true
"$PYTHON" - "$bnb_dir"/bitsandbytes-*.whl "$DEST/wheels" <<'EOF'
import os, re, sys, zipfile

source, folder = sys.argv[1], sys.argv[2]
keep = re.compile(r"libbitsandbytes_(cpu|cuda130)\.so$")
with zipfile.ZipFile(source) as wheel, zipfile.ZipFile(os.path.join(folder, os.path.basename(source)), "w",
                                                       zipfile.ZIP_DEFLATED) as cut:
    for item in wheel.infolist():
        name = item.filename
        if re.search(r"libbitsandbytes_\w+\.so$", name) and not keep.search(name):
            continue
        data = wheel.read(name)
        if name.endswith(".dist-info/RECORD"):  # the dropped kernels leave the record too
            data = b"".join(line for line in data.splitlines(keepends=True)
                            if not re.search(rb"libbitsandbytes_\w+\.so,", line) or keep.search(line.split(b",")[0].decode()))
        cut.writestr(item, data)
EOF
rm -rf "$bnb_dir"

for name in tokenizer.model tokenizer_config.json; do
    [ -f "$TOKENIZER_DIR/$name" ] || { echo "error: no $name in $TOKENIZER_DIR: set TOKENIZER_DIR to a folder with the real ChatGLM3 tokenizer files" >&2; exit 2; }
    cp "$TOKENIZER_DIR/$name" "$DEST/tokenizer/$name"
done
du -k "$DEST"/wheels/*.whl "$DEST"/tokenizer/* | awk '{printf "%8.2f MB  %s\n", $1 / 1024, $2; total += $1}
    END {printf "%8.2f MB  in all (the device tool carries at most 64 MiB with the working tree)\n", total / 1024}'
