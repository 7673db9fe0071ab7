#!/usr/bin/env python3
"""Merges a LoRA adapter into its base model and saves a plain model folder.

    python scripts/merge_lora.py --adapter output/lora --output models/merged \\
        [--base models/chatglm3-6b] [--dtype bfloat16]

The output loads with `AutoModelForCausalLM.from_pretrained` (and serves with vLLM) without peft.
--base defaults to the base folder the adapter names in its adapter_config.json. The tokenizer is
copied from the adapter folder (finetune.py saves one there), else from the base. --dtype is the
dtype of the saved weights (default: the base's own). An adapter trained on a 4/8-bit base merges
into the full-precision base, as usual for QLoRA.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys

from .loading import DTYPES

from ..train.file_modes import respect_umask
from .loading import peft_deprecations_silenced

logger = logging.getLogger("merge_lora")

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja")


class MergeError(RuntimeError):
    """An adapter that cannot be merged as asked, with what to do about it."""


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


def merge_lora(adapter: str, output: str, base: str | None = None, dtype: str = "auto") -> str:
    """Loads base + adapter, merges the LoRA weights, saves the plain model and the tokenizer; returns output."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter_config = read_adapter_config(adapter)
    base = resolve_base(base, adapter_config, adapter)
    check_output(output, base, adapter)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=DTYPES.get(dtype, "auto"))
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
    merged.save_pretrained(output)
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
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    try:
        output = merge_lora(args.adapter, args.output, args.base, args.dtype)
    except MergeError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    print(f"Merged model: {output}")


if __name__ == "__main__":
    main()
