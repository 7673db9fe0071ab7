"""The plan's core: one training step of the run's real model code on fake tensors, every storage booked.

`simulate(spec)` builds the model (build.py) with FakeTensor weights, collates the planned batch
with the project's collator (real integer tensors), and runs the steady-state step (step.py)
under a `StorageLedger`; it returns the peak of live tensor bytes, its parts and its moment.
`simulate_by_depth(spec)` simulates two shallow copies of the model (2 and 3 decoder layers) and
extends the result linearly to the real depth: every layer of a decoder stack keeps the same
tensors, so each part grows by the same bytes per layer (the advice uses it to re-plan quickly;
tests check it against the full simulation).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
import warnings
from dataclasses import dataclass

import torch
from torch.utils._pytree import tree_flatten

from .build import build_model
from .fake_tensors import RealIndexTensors, fake_mode
from .ledger import MODEL, PARTS, Peak, StorageLedger
from .quantized import QuantizedLinearStandIn
from .spec import RunSpec, batch_summary, collate
from .step import run_step

SHALLOW_DEPTHS = (2, 3)
CUDA_BLOCK = 512  # the CUDA caching allocator's smallest block


@dataclass
class StepMemory:
    """What the simulation found, in bytes: the peak of everything live and of the activations alone."""
    peak: Peak
    activation_peak: Peak
    trainable_params: int
    total_params: int
    batch: dict  # batch_summary of the micro-batch
    seconds: float
    depth: str  # "full" or "extended from 2 and 3 layers"
    start_bytes: int = 0  # live before the step: the model's parameters and buffers, the batch


class _ModuleStack:
    """Keeps ledger.module_stack as the names of the modules running now (forward and recomputation)."""

    def __init__(self, model: torch.nn.Module, ledger: StorageLedger):
        self.names = {id(module): name or MODEL for name, module in model.named_modules()}
        self.ledger = ledger
        self.handles = []

    def __enter__(self):
        from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

        def enter(module, args):
            name = self.names.get(id(module))
            if name is not None:
                self.ledger.module_stack.append(name)

        def leave(module, args, output):
            name = self.names.get(id(module))
            if name is not None and self.ledger.module_stack:
                self.ledger.module_stack.pop()
            if name is not None and self.ledger.phase == "forward":
                for tensor in tree_flatten(output)[0]:  # the backward enters the module here
                    if isinstance(tensor, torch.Tensor) and tensor.grad_fn is not None:
                        tensor.grad_fn.register_prehook(functools.partial(self.entered_backward, name))

        self.handles = [register_module_forward_pre_hook(enter), register_module_forward_hook(leave, always_call=True)]
        return self

    def entered_backward(self, name, grad_outputs):
        self.ledger.backward_module = name

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        self.ledger.module_stack.clear()


def _quiet():
    """The simulation repeats what a run logs and warns about (LoRA's trainable count, transformers'
    notices); the plan says what matters itself."""
    stack = contextlib.ExitStack()
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    for name in ("transformers", "peft", "chatglm3_finetune.model.loading", "chatglm3_finetune.model.ptuning"):
        level = logging.getLogger(name).level
        logging.getLogger(name).setLevel(logging.ERROR)
        stack.callback(logging.getLogger(name).setLevel, level)
    return stack


def simulate(spec: RunSpec, num_layers: int | None = None, round_to: int = CUDA_BLOCK) -> StepMemory:
    """One steady-state training step of `spec` on fake tensors; `num_layers` overrides the depth."""
    started = time.monotonic()
    mode = fake_mode()
    with _quiet():
        model = build_model(spec, mode, num_layers)
        batch = collate(spec)
        ledger = StorageLedger(vocab_size=spec.config.vocab_size, round_to=round_to)
        params = list(model.parameters())
        for p in params:
            ledger.book(p, "trainable" if p.requires_grad else "weights")
        for buffer in model.buffers():
            ledger.book(buffer, "inputs")
        for module in model.modules():  # a quantized weight's scales and code tables belong to it
            if isinstance(module, QuantizedLinearStandIn):
                for buffer in module.buffers():
                    ledger.book(buffer, "weights")
        for value in batch.values():
            if isinstance(value, torch.Tensor):
                ledger.book(value, "inputs")

        def on_phase(phase: str) -> None:
            ledger.phase = phase

        start = ledger.total

        with mode, RealIndexTensors(), ledger, _ModuleStack(model, ledger):
            run_step(model, batch, spec, on_phase, on_state=lambda part, tensor: ledger.book(tensor, part))
    return StepMemory(peak=ledger.peak, activation_peak=ledger.activation_peak,
                      trainable_params=sum(p.numel() for p in params if p.requires_grad),
                      total_params=sum(p.numel() for p in params), batch=batch_summary(batch),
                      seconds=time.monotonic() - started, depth="full", start_bytes=start)


def _extend(shallow: Peak, deeper: Peak, extra_layers: int) -> Peak:
    parts = {part: deeper.parts.get(part, 0) + extra_layers * (deeper.parts.get(part, 0) - shallow.parts.get(part, 0))
             for part in PARTS}
    total = deeper.total + extra_layers * (deeper.total - shallow.total)
    return Peak(total, parts, deeper.moment)


def simulate_by_depth(spec: RunSpec) -> StepMemory:
    """The step simulated at 2 and 3 decoder layers, extended linearly to the model's depth."""
    layers = spec.num_layers
    if layers <= SHALLOW_DEPTHS[1]:
        return simulate(spec)
    started = time.monotonic()
    low, high = (simulate(spec, num_layers=depth) for depth in SHALLOW_DEPTHS)
    extra = layers - SHALLOW_DEPTHS[1]
    per_layer = high.total_params - low.total_params
    per_layer_trainable = high.trainable_params - low.trainable_params
    return StepMemory(peak=_extend(low.peak, high.peak, extra),
                      activation_peak=_extend(low.activation_peak, high.activation_peak, extra),
                      trainable_params=high.trainable_params + extra * per_layer_trainable,
                      total_params=high.total_params + extra * per_layer, batch=high.batch,
                      seconds=time.monotonic() - started,
                      depth=f"extended from {SHALLOW_DEPTHS[0]} and {SHALLOW_DEPTHS[1]} layers")


__all__ = ["StepMemory", "simulate", "simulate_by_depth"]
