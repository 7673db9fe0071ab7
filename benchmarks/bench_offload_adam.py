#!/usr/bin/env python3
"""What configs/ds_zero3_offload.json's optimizer costs: the CPU step of ZeRO-Offload with torch's
AdamW (what the config asks for: "torch_adam": true, "fused": true, nothing to compile) against
DeepSpeed's own CPU Adam (built with g++ and ninja on first use) and torch's default foreach AdamW,
on the same fp32 parameters and gradients, side by side in one process.

    .venv/bin/python benchmarks/bench_offload_adam.py                      # 20M parameters
    .venv/bin/python benchmarks/bench_offload_adam.py --params 1e8 --threads 2 --json out.json

ZeRO-Offload hands the optimizer the fp32 master weights as a few flat tensors (one per sub-group),
so each optimizer here steps one flat tensor of --params elements. Printed per optimizer: time per
step (after one warm-up step), parameters updated per second, time relative to DeepSpeedCPUAdam, the
largest difference of the updated parameters from the fused AdamW's (all three compute AdamW), and the
time to create the optimizer: DeepSpeedCPUAdam's first use on a machine compiles its op (cached in
TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions, afterwards).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

KWARGS = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01}


def flat_parameter(count: int) -> torch.nn.Parameter:
    generator = torch.Generator().manual_seed(0)
    param = torch.nn.Parameter(torch.randn(count, generator=generator))
    param.grad = torch.randn(count, generator=generator) * 1e-3
    return param


def deepspeed_cpu_adam(params):
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    return DeepSpeedCPUAdam(params, adamw_mode=True, **KWARGS)


OPTIMIZERS = {
    "torch AdamW, fused (the offload config)": lambda params: torch.optim.AdamW(params, fused=True, **KWARGS),
    "torch AdamW, foreach (torch_adam alone)": lambda params: torch.optim.AdamW(params, foreach=True, **KWARGS),
    "DeepSpeedCPUAdam (compiled op)": deepspeed_cpu_adam,
}


def time_steps(make, count: int, steps: int) -> tuple[float, float, torch.Tensor]:
    """Seconds to create the optimizer (DeepSpeed's builds its op on first use), seconds per step
    (after a warm-up step), and the parameters after all steps."""
    param = flat_parameter(count)
    start = time.perf_counter()
    optimizer = make([param])
    created = time.perf_counter() - start
    optimizer.step()
    start = time.perf_counter()
    for _ in range(steps):
        optimizer.step()
    return created, (time.perf_counter() - start) / steps, param.detach()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=float, default=2e7, help="fp32 parameters to update (default 2e7)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per optimizer (default 5)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    parser.add_argument("--no-cpu-adam", action="store_true", help="skip DeepSpeedCPUAdam (it compiles on first use)")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    if args.params < 1 or args.steps < 1:
        parser.error("--params and --steps must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    count = int(args.params)
    print(f"{count:,} fp32 parameters, {args.steps} timed steps, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}", flush=True)

    rows, reference = [], None
    for name, make in OPTIMIZERS.items():
        if args.no_cpu_adam and make is deepspeed_cpu_adam:
            rows.append({"optimizer": name, "status": "not run: --no-cpu-adam"})
            continue
        try:
            created, seconds, updated = time_steps(make, count, args.steps)
        except Exception as e:  # DeepSpeed's op cannot be built here (no compiler, no ninja)
            rows.append({"optimizer": name, "status": f"not run: {type(e).__name__}: {str(e).splitlines()[0]}"})
            continue
        reference = updated if reference is None else reference
        rows.append({"optimizer": name, "status": "ok", "setup_s": round(created, 1),
                     "ms_per_step": round(seconds * 1e3, 1),
                     "million_params_per_s": round(count / seconds / 1e6, 1),
                     "max_abs_difference_from_fused": float((updated - reference).abs().max())})
    cpu_adam = next((row for row in rows if row["optimizer"].startswith("DeepSpeedCPUAdam") and row["status"] == "ok"),
                    None)
    for row in rows:
        if row["status"] != "ok":
            print(f"  {row['optimizer']:42s} {row['status']}")
            continue
        if cpu_adam:
            row["time_vs_deepspeed_cpu_adam"] = round(row["ms_per_step"] / cpu_adam["ms_per_step"], 2)
        relative = f"  {row['time_vs_deepspeed_cpu_adam']:.2f}x DeepSpeedCPUAdam's time" if cpu_adam else ""
        print(f"  {row['optimizer']:42s} {row['ms_per_step']:9.1f} ms/step {row['million_params_per_s']:8.1f} "
              f"M params/s{relative}  max |diff| {row['max_abs_difference_from_fused']:.1e}  "
              f"created in {row['setup_s']:.1f} s")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"params": count, "steps": args.steps, "threads": torch.get_num_threads(), "rows": rows}, f,
                      indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
