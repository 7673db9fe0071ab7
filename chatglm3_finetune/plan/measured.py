"""The same step run with real tensors on the CPU, its peak measured by the allocator, not by the plan.

`measure_step(spec)` builds the run's model with random weights (build.build_real_model), runs
the steady-state step (step.run_step) and reads torch.profiler's record of every CPU allocation
and free (`profile_memory=True`): the peak of the running sum of those records during the step,
counted from before the model existed. Nothing of the plan's accounting (ledger.py) is used, so a
mistake in it cannot hide in both numbers.
"""

from __future__ import annotations

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from .build import build_real_model
from .spec import RunSpec, collate
from .step import run_step

STEP_MARK = "plan.measured_step"


def allocation_peak(prof, window: str = STEP_MARK) -> tuple[int, int]:
    """(the highest sum of allocated-minus-freed CPU bytes, over the profiler's raw memory records in
    time order, reached inside the `window` record_function; the sum when the window opened)."""
    events = prof.profiler.kineto_results.events()
    marks = [e for e in events if e.name() == window]
    if not marks:
        raise ValueError(f"no {window!r} range in the profile")
    start, end = marks[0].start_ns(), marks[0].start_ns() + marks[0].duration_ns()
    records = sorted((e.start_ns(), e.nbytes()) for e in events
                     if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    live, peak, before = 0, 0, None
    for when, change in records:
        if before is None and when >= start:
            before = live
        live += change
        if start <= when <= end:
            peak = max(peak, live)
    return peak, before or 0


def measure_step(spec: RunSpec, seed: int = 0) -> tuple[int, int]:
    """(the measured peak of tensor bytes (CPU allocator) during one steady-state step of `spec`,
    the bytes live when it started: the model and the batch)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        model = build_real_model(spec, seed)
        batch = collate(spec)
        with record_function(STEP_MARK):
            run_step(model, batch, spec)
    return allocation_peak(prof)


__all__ = ["measure_step", "allocation_peak"]
