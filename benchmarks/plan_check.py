#!/usr/bin/env python3
"""The memory plan next to the measured peak of the same training step, on the CPU.

    python benchmarks/plan_check.py                      # tiny and small GLMs, every method
    flock /tmp/bigmem.lock python benchmarks/plan_check.py --shape 6b --cases ptuning --length 64 --bf16

Each case is one steady-state training step (chatglm3_finetune/plan/step.py) of a GLM built
in code with random weights. "planned": the plan's simulation on fake tensors (full depth;
CPU allocations, not rounded to CUDA's 512-byte blocks). "measured": torch.profiler's record of
every CPU allocation and free during the same step run with real tensors (the running sum's
peak, counted from before the model was built). "step": what the step added to the memory live
before it (weights and batch excluded), planned vs measured. The 6B shape (ChatGLM3-6B: hidden
4096, 28 layers, vocab 65024) needs about 13 GB of RAM in bf16: run it under the big-memory lock.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {
    "tiny": dict(vocab_size=1024, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128),
    "small": dict(vocab_size=65024, hidden_size=512, num_layers=6, num_heads=8, num_kv_heads=2, intermediate_size=1712),
    "6b": dict(vocab_size=65024, hidden_size=4096, num_layers=28, num_heads=32, num_kv_heads=2, intermediate_size=13696),
}
CASES = {
    "ptuning": dict(method="ptuning"), "ptuning_projection": dict(method="ptuning", prefix_projection=True),
    "ptuning_no_checkpointing": dict(method="ptuning", gradient_checkpointing=False),
    "ptuning_packing": dict(method="ptuning", packing=True), "lora": dict(method="lora"),
    "full": dict(method="full"), "full_no_checkpointing": dict(method="full", gradient_checkpointing=False),
}


def spec_for(shape: str, case: str, length: int, batch: int, bf16: bool):
    import random

    from chatglm3_finetune.data.packing import pack_features
    from chatglm3_finetune.model.tiny_model import tiny_glm_config
    from chatglm3_finetune.plan.spec import Row, RunSpec

    dims = dict(SHAPES[shape])
    vocab = dims.pop("vocab_size")
    config = tiny_glm_config(vocab, max_positions=8192, **dims)
    options = dict(CASES[case])
    method = options.pop("method")
    rng = random.Random(0)
    rows = []
    for i in range(batch * (4 if options.get("packing") else 1)):
        n = max(length - 7 * i, 8)
        ids = tuple(rng.randrange(3, min(vocab, 64789)) for _ in range(n))
        rows.append(Row(ids, (-100,) * (n // 2) + ids[n // 2:]))
    if options.get("packing"):
        rows = [Row(tuple(r["input_ids"]), tuple(r["labels"]), tuple(r["position_ids"]), tuple(r["seq_lens"]))
                for r in pack_features([row.as_feature() for row in rows], 2 * length)]
    method_args = {"ptuning": dict(pre_seq_len=128 if shape == "6b" else 8), "lora": dict(lora_rank=8), "full": {}}[method]
    dtype = torch.bfloat16 if bf16 else torch.float32
    return RunSpec(model_path=f"{shape} GLM built in code", config=config, method=method, weights_dtype=dtype,
                   mixed_precision="bf16" if bf16 else None, rows=tuple(rows), rows_source="synthetic",
                   micro_batch=batch, gradient_checkpointing=options.pop("gradient_checkpointing", True),
                   use_cpu=True, **method_args, **options)


def run_case(shape: str, case: str, length: int, batch: int, bf16: bool) -> dict:
    from chatglm3_finetune.plan.measured import measure_step
    from chatglm3_finetune.plan.simulate import simulate

    spec = spec_for(shape, case, length, batch, bf16)
    plan = simulate(spec, round_to=1)
    started = time.monotonic()
    measured, before = measure_step(spec)
    return {"shape": shape, "case": case, "tokens": length, "batch": batch, "dtype": "bf16" if bf16 else "fp32",
            "planned": plan.peak.total, "measured": measured, "ratio": plan.peak.total / measured,
            "planned_step": plan.peak.total - plan.start_bytes, "measured_step": measured - before,
            "step_ratio": (plan.peak.total - plan.start_bytes) / max(measured - before, 1),
            "moment": plan.peak.moment, "plan_seconds": plan.seconds, "measure_seconds": time.monotonic() - started}


def table(rows: list[dict]) -> str:
    lines = [f"{'shape':<6} {'case':<26} {'tokens':>6} {'batch':>5} {'dtype':>5} {'planned MB':>11} {'measured MB':>12} "
             f"{'ratio':>7} {'step ratio':>10} {'plan s':>7}  moment of the peak"]
    for r in rows:
        lines.append(f"{r['shape']:<6} {r['case']:<26} {r['tokens']:>6} {r['batch']:>5} {r['dtype']:>5} "
                     f"{r['planned'] / 2 ** 20:>11.1f} {r['measured'] / 2 ** 20:>12.1f} {r['ratio']:>7.4f} "
                     f"{r['step_ratio']:>10.4f} {r['plan_seconds']:>7.1f}  {r['moment']}")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", nargs="+", default=["tiny", "small"], choices=sorted(SHAPES))
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--length", type=int, default=256, help="tokens of the longest record")
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 4])
    parser.add_argument("--bf16", action="store_true", help="bf16 weights and autocast (as a GPU run)")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)
    rows = []
    for shape in args.shape:
        for case in args.cases:
            for batch in args.batch:
                rows.append(run_case(shape, case, args.length, batch, args.bf16))
                print(table(rows[-1:]).splitlines()[-1], flush=True)
    print(table(rows))
    print(f"peak RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20:.1f} GB")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    sys.exit(main() and 0)
