#!/usr/bin/env python3
"""Converts an original THUDM ChatGLM3 checkpoint into a native transformers GLM model folder.

    python scripts/convert_chatglm3.py --input chatglm3-6b --output chatglm3-6b-glm [--dtype float16]
    python scripts/convert_chatglm3.py --ptuning original-ptuning-ckpt --output my-prefix [--base chatglm3-6b-glm]

The output loads with AutoModelForCausalLM / AutoTokenizer.from_pretrained, no remote code, and
with chatglm3_tokenizer.load_tokenizer. Conversion goes one shard at a time (peak memory ~ a shard).
The weights are written in bfloat16 unless --dtype says otherwise: the original ChatGLM3-6B checkpoint
is float16, but training and inference on Ampere or newer GPUs run in bfloat16, and a model stored in
the dtype it is loaded in needs no conversion pass when loading. --dtype float16 keeps the original
weights exactly (for V100/T4, which have no bfloat16).

With --ptuning, an original P-Tuning v2 checkpoint becomes a prefix in this toolkit's format, which
prefix_model.PrefixTuningModel.from_pretrained(base, folder) loads with its settings inside.
"""

from __future__ import annotations

import argparse
import logging
import sys

from chatglm3_finetune.model.conversion import DTYPES, ConversionError, convert_checkpoint, convert_ptuning


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", help="original ChatGLM3 model folder (config.json, weights, tokenizer.model)")
    source.add_argument("--ptuning", help="original P-Tuning v2 checkpoint folder (config.json with pre_seq_len, "
                                          "pytorch_model.bin with transformer.prefix_encoder.*)")
    parser.add_argument("--output", required=True, help="new folder for the result (must be empty or absent)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="weight dtype of the converted model (default: bfloat16, what training and inference "
                             "load; the original ChatGLM3-6B is float16, which --dtype float16 keeps exactly)")
    parser.add_argument("--base", default=None,
                        help="with --ptuning: the converted model folder the prefix belongs to (checked, recorded)")
    args = parser.parse_args(argv)
    if args.base and not args.ptuning:
        parser.error("--base goes with --ptuning")
    if args.dtype and args.ptuning:
        parser.error("--dtype goes with --input (a prefix is always saved in fp32)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.ptuning:
            convert_ptuning(args.ptuning, args.output, base_dir=args.base)
        else:
            convert_checkpoint(args.input, args.output, dtype=args.dtype)
    except (ConversionError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0  # the conversion logged its own last line: "converted INPUT -> OUTPUT (...)"


if __name__ == "__main__":
    sys.exit(main())
