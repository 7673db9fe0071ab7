#!/usr/bin/env python3
"""Merges a LoRA adapter into its base model and saves a plain model folder.

    python scripts/merge_lora.py --adapter output/lora --output models/merged \\
        [--base models/chatglm3-6b] [--dtype bfloat16] [--max_shard_size 4GB]

The output loads with `AutoModelForCausalLM.from_pretrained` (and serves with vLLM) without peft.
--base defaults to the base folder the adapter names in its adapter_config.json. The tokenizer is
copied from the adapter folder (finetune.py saves one there), else from the base. --dtype is the
dtype of the saved weights (default: the base's own). An adapter trained on a 4/8-bit base merges
into the full-precision base, as usual for QLoRA. The weights are written in safetensors shards of at
most --max_shard_size (default 4GB: a merged ChatGLM3-6B in bf16 is 4 files) plus their index.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import sys

from ..train.file_modes import respect_umask
from .loading import DTYPES, load_base_model, peft_deprecations_silenced

logger = logging.getLogger("merge_lora")

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja")


DEFAULT_MAX_SHARD_SIZE = "4GB"


class MergeError(RuntimeError):
    """An adapter that cannot be merged as asked, with what to do about it."""


SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
              "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def shard_size_bytes(max_shard_size: str | int) -> int:
    """--max_shard_size as bytes: a whole number of bytes or a size such as 500MB, 4GB or 2GiB."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([a-zA-Z]*)", str(max_shard_size).strip())
    unit = match.group(2).upper() if match else None
    if unit not in SIZE_UNITS or int(float(match.group(1)) * SIZE_UNITS[unit]) < 1:
        raise MergeError(f"--max_shard_size {max_shard_size!r} is not a size: give bytes or a number with a "
                         f"unit, e.g. 500MB, 4GB or 2GiB")
    return int(float(match.group(1)) * SIZE_UNITS[unit])


def read_adapter_config(adapter: str) -> dict:
    config_file = os.path.join(adapter, "adapter_config.json")
    if not os.path.isdir(adapter):
        raise MergeError(f"--adapter {adapter}: no such folder")
    if not os.path.isfile(config_file):
        raise MergeError(f"--adapter {adapter}: not a LoRA adapter folder (no adapter_config.json); point it at "
                         f"a LoRA run's output_dir or one of its checkpoint-N folders")
    with open(config_file, encoding="utf-8") as f:
        config = json.load(f)
    if config.get("peft_type") != "LORA":
        raise MergeError(f"--adapter {adapter}: a {config.get('peft_type')} adapter, only LoRA adapters merge")
    return config


def resolve_base(base: str | None, adapter_config: dict, adapter: str) -> str:
    base = base or adapter_config.get("base_model_name_or_path")
    if not base:
        raise MergeError(f"{adapter}/adapter_config.json names no base model: pass --base")
    if not os.path.isdir(base):
        raise MergeError(f"base model {base}: missing (no such folder); pass --base with the folder "
                         f"the adapter was trained on")
    if not os.path.isfile(os.path.join(base, "config.json")):
        raise MergeError(f"base model {base}: not a model folder (no config.json); pass --base with the folder "
                         f"the adapter was trained on")
    return base


def check_output(output: str, base: str, adapter: str) -> None:
    target = os.path.realpath(output)
    if target in (os.path.realpath(base), os.path.realpath(adapter)):
        raise MergeError(f"--output {output} is the base or adapter folder: choose a new folder")
    if os.path.isdir(output) and os.listdir(output):
        raise MergeError(f"--output {output} exists and is not empty: choose a new folder")


def merge_lora(adapter: str, output: str, base: str | None = None, dtype: str = "auto",
               max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE) -> str:
    """Loads base + adapter, merges the LoRA weights, saves the plain model (safetensors shards of at
    most `max_shard_size`, with an index when there are several) and the tokenizer; returns output."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    shard_bytes = shard_size_bytes(max_shard_size)
    adapter_config = read_adapter_config(adapter)
    base = resolve_base(base, adapter_config, adapter)
    check_output(output, base, adapter)
    if dtype in DTYPES:  # one copy in memory, whatever dtype the base is stored in
        model = load_base_model(base, DTYPES[dtype])
    else:
        model = AutoModelForCausalLM.from_pretrained(base, dtype="auto")
    try:
        with peft_deprecations_silenced():
            model = PeftModel.from_pretrained(model, adapter)
    except (RuntimeError, ValueError) as e:
        detail = str(e).strip().splitlines()
        detail = next((line.strip() for line in detail if "size mismatch" in line), detail[0] if detail else "")
        detail = detail.rstrip(".")
        trained_on = adapter_config.get("base_model_name_or_path")
        raise MergeError(f"adapter {adapter} does not fit base {base} ({detail}); it was trained on "
                         f"{trained_on or 'another model'}: pass that folder as --base") from None
    merged = model.merge_and_unload()
    os.makedirs(output, exist_ok=True)
    merged.save_pretrained(output, max_shard_size=shard_bytes)
    respect_umask(output)
    tokenizer_source = adapter if os.path.isfile(os.path.join(adapter, "tokenizer_config.json")) else base
    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(tokenizer_source, name)):
            shutil.copy2(os.path.join(tokenizer_source, name), os.path.join(output, name))
    logger.info("Merged %s (LoRA r=%s on %s) into %s -> %s (%s)", adapter, adapter_config.get("r"),
                adapter_config.get("target_modules"), base, output, merged.dtype)
    return output


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", required=True, help="LoRA adapter folder (adapter_config.json + weights)")
    parser.add_argument("--output", required=True, help="new folder for the merged model")
    parser.add_argument("--base", help="base model folder (default: the one named in adapter_config.json)")
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                        help="dtype of the saved weights (default: the base model's)")
    parser.add_argument("--max_shard_size", default=DEFAULT_MAX_SHARD_SIZE,
                        help=f"largest weight file: bytes or a size such as 500MB or 2GB (default {DEFAULT_MAX_SHARD_SIZE}); "
                             f"bigger models are split into several files plus model.safetensors.index.json")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    try:
        output = merge_lora(args.adapter, args.output, args.base, args.dtype, args.max_shard_size)
    except MergeError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    print(f"Merged model: {output}")


if __name__ == "__main__":
    main()
