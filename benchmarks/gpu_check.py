#!/usr/bin/env python3
"""The GPU check: the toolkit's real pipeline, as a ChatGLM3-6B user runs it, on one GPU.

    bash benchmarks/gpu_check.sh              # on a GPU machine (gpu_check.sh: the wheels to carry)
    bash benchmarks/gpu_check.sh --cpu        # the same at full 6B shape on a CPU (< 24 GiB of RAM)
    bash benchmarks/gpu_check.sh --dry        # tiny shapes on the CPU: every case's code path (the test suite)

It writes a random-weight ChatGLM3 checkpoint in the original THUDM layout shard by shard and converts
it with scripts/convert_chatglm3.py; then per case (gpu_check_lib/cases.py) it runs the launcher a user
would run for a few steps, a resume of one more step, inference.py on the result and, for P-Tuning,
api_server.py answering one request (gpu_check_lib/case.py). A probe on every process's PYTHONPATH
(gpu_check_probe/sitecustomize.py) records peak memory and step times. The rules that fail a case are
in gpu_check_lib/report.py; the exit status is 1 when one failed. docs/gpu-check.md has the details.
"""

from __future__ import annotations

import argparse
import sys

CASES = ("ptuning", "ptuning_8bit", "ptuning_4bit", "lora", "qlora", "packing", "packing_flash_attn", "zero2",
         "zero2_ptuning", "zero3", "zero3_offload")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--cpu", action="store_true", help="full 6B shape on this CPU: 1 + 1 steps of 32 tokens a case (ZeRO: 2 ranks, a 178M GLM)")
    where.add_argument("--dry", action="store_true", help="tiny shapes on the CPU: every case's code path")
    parser.add_argument("--cases", nargs="+", choices=CASES, metavar="CASE",
                        help=f"run only these, in this order (default: all, in the order {' '.join(CASES)})")
    parser.add_argument("--json", help="write one row per case here")
    parser.add_argument("--work", help="folder for models, data, runs and logs (default /tmp/gpu_check-MODE); "
                                       "a converted model left there is reused")
    parser.add_argument("--fresh", action="store_true", help="write and convert the models again")
    parser.add_argument("--tokenizer", help="folder with the real ChatGLM3 tokenizer.model and tokenizer_config.json "
                                            "(default ../shared/data/chatglm3-tokenizer or .gpu_check/tokenizer)")
    parser.add_argument("--budget", type=float, help="seconds for the whole check; cases that would start later "
                                                     "are skipped (default 450 on a GPU, none elsewhere)")
    parser.add_argument("--jobs", type=int, help="inference and server runs going on beside the next case's "
                                                 "training (default 2; 1 with --cpu, where one 6B model fits)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    # Imported once the options are read: `--help` works wherever this file is run from (the package
    # sits beside it, which Python finds when gpu_check.py runs as a script).
    from gpu_check_lib.check import run_check

    return run_check(args)


if __name__ == "__main__":
    sys.exit(main())
