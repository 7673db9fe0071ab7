#!/usr/bin/env python3
"""Preprocessing speed: records/s and tokens/s of validation + tokenization with the real
ChatGLM3 tokenizer, on AdvertiseGen dev and the formatted ToolAlpaca sample.

    python benchmarks/bench_preprocess.py [--workers 1 2] [--repeat 3]

Reads ../shared/data (the real tokenizer and data sets); converts the data in memory with the
project's own converters. Prints one row per data set and worker count (best of --repeat runs).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"

from chatglm3_finetune.format.tokenizer import load_tokenizer  # noqa: E402
from chatglm3_finetune.data.converters.advertise_gen import convert_advertise_gen  # noqa: E402
from chatglm3_finetune.data.converters.tool_alpaca import convert_tool_alpaca  # noqa: E402
from chatglm3_finetune.data.formats import load_data
from chatglm3_finetune.data.records import INPUT_OUTPUT, MULTI_TURN
from chatglm3_finetune.data.encoding import LengthLimits
from chatglm3_finetune.data.training_data import tokenize_records


def formatted_files(tmp: Path) -> dict:
    advert = tmp / "advertise_gen.jsonl"
    lines = (SHARED / "advertisegen" / "dev.json").read_text(encoding="utf-8").splitlines()
    advert.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n"
                              for r in convert_advertise_gen(lines, "dev.json")), encoding="utf-8")
    tool = tmp / "tool_alpaca.jsonl"
    records = json.loads((SHARED / "toolalpaca" / "train_sample.json").read_text(encoding="utf-8"))
    rows, _ = convert_tool_alpaca(records, "train_sample.json")
    tool.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return {
        "advertisegen dev (input-output 1024+128)": (advert, INPUT_OUTPUT, LengthLimits(None, 1024, 128)),
        "toolalpaca sample (multi-turn 2048)": (tool, MULTI_TURN, LengthLimits(max_seq_length=2048)),
    }


def measure(tokenizer, path: Path, train_format: str, limits: LengthLimits, workers: int) -> tuple[float, int, int]:
    start = time.perf_counter()
    records = load_data(str(path), train_format).records
    _, report = tokenize_records(tokenizer, records, train_format, limits, num_proc=workers)
    return time.perf_counter() - start, report.records, report.tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    if not SHARED.is_dir():
        sys.exit(f"{SHARED} is absent: this benchmark needs the shared data folder beside the project")
    logging.disable(logging.WARNING)
    import datasets

    datasets.disable_progress_bars()
    tokenizer = load_tokenizer(str(SHARED / "chatglm3-tokenizer"))
    print(f"{'data':42} {'workers':>7} {'records':>8} {'tokens':>9} {'seconds':>8} {'records/s':>10} {'tokens/s':>10}")
    with tempfile.TemporaryDirectory() as tmp:
        for name, (path, train_format, limits) in formatted_files(Path(tmp)).items():
            for workers in args.workers:
                seconds, records, tokens = min(measure(tokenizer, path, train_format, limits, workers)
                                               for _ in range(args.repeat))
                print(f"{name:42} {workers:>7} {records:>8} {tokens:>9} {seconds:>8.2f} "
                      f"{records / seconds:>10.0f} {tokens / seconds:>10.0f}")


if __name__ == "__main__":
    main()
