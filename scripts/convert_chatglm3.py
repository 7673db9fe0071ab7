#!/usr/bin/env python3
"""Converts an original THUDM ChatGLM3 checkpoint into a native transformers GLM model folder.

    python scripts/convert_chatglm3.py --input chatglm3-6b --output chatglm3-6b-glm [--dtype bfloat16]

The output loads with AutoModelForCausalLM / AutoTokenizer.from_pretrained, no remote code, and
with chatglm3_tokenizer.load_tokenizer. Conversion goes one shard at a time (peak memory ~ a shard).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from chatglm3_conversion import DTYPES, ConversionError, convert_checkpoint  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="original ChatGLM3 folder (config.json, weights, tokenizer.model)")
    parser.add_argument("--output", required=True, help="new folder for the converted model (must be empty or absent)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="weight dtype of the output (default: the checkpoint's torch_dtype)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        output = convert_checkpoint(args.input, args.output, dtype=args.dtype)
    except (ConversionError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"converted {args.input} -> {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
