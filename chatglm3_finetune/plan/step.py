"""One optimizer step as the HF Trainer takes it, in its steady state (the optimizer's states exist
from the first step on), on whatever tensors the model holds: fake ones for the plan, real ones to
measure it.

The sequence: the optimizer states (made by one step on zero gradients, before the step proper);
with gradient accumulation or DDP the gradients of every trainable parameter (they outlive a
micro-batch: accumulation adds into them, DDP's buckets hold them); the forward under the
Trainer's autocast (not under DeepSpeed, which casts the model itself), the backward, gradient
clipping, the optimizer step and `zero_grad(set_to_none=True)`. Under DeepSpeed the optimizer
and gradient partitions are DeepSpeed's (deepspeed_rules.py): the step stops after the backward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from .spec import RunSpec


def make_optimizer(params: list[torch.nn.Parameter], spec: RunSpec) -> torch.optim.Optimizer:
    """AdamW as the Trainer makes it: fused for adamw_torch_fused (the default), else foreach (the
    default implementation on a GPU). Other optimizers are planned with AdamW's states."""
    fused = spec.optim == "adamw_torch_fused"
    return torch.optim.AdamW(params, lr=1e-4, fused=fused, foreach=None if fused else True)


def autocast_context(spec: RunSpec):
    """The Trainer's mixed precision (accelerate wraps the forward in autocast), except under
    DeepSpeed, whose engine converts the model to 16 bits instead."""
    if spec.mixed_precision and not spec.deepspeed:
        dtype = torch.bfloat16 if spec.mixed_precision == "bf16" else torch.float16
        return torch.autocast("cpu", dtype=dtype)
    return contextlib.nullcontext()


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def prime_optimizer(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter]) -> None:
    """Creates the optimizer's states with one step on zero gradients."""
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def optimizer_state_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [t for state in optimizer.state.values() for t in state.values() if isinstance(t, torch.Tensor)]


def gradients_outlive_micro_batch(spec: RunSpec) -> bool:
    """Accumulation adds into existing gradients; DDP keeps them in its buckets from the start."""
    return spec.grad_accum > 1 or (spec.world_size > 1 and not spec.deepspeed)


def run_step(model: torch.nn.Module, batch: dict, spec: RunSpec,
             on_phase: Callable[[str], None] = lambda phase: None,
             on_state: Callable[[str, torch.Tensor], None] = lambda part, tensor: None) -> None:
    """The steady-state step. on_phase(name) is called as the step enters "forward", "backward" and
    "optimizer step"; on_state(part, tensor) for each optimizer state ("optimizer_states") and each
    gradient ("gradients") as it appears."""
    params = trainable_parameters(model)
    optimizer = None
    if not spec.deepspeed:
        optimizer = make_optimizer(params, spec)
        prime_optimizer(optimizer, params)
        for tensor in optimizer_state_tensors(optimizer):
            on_state("optimizer_states", tensor)
    hooks = [p.register_post_accumulate_grad_hook(lambda p: on_state("gradients", p.grad)) for p in params]
    try:
        if gradients_outlive_micro_batch(spec):
            for p in params:
                p.grad = torch.zeros_like(p)
                on_state("gradients", p.grad)
        on_phase("forward")
        with autocast_context(spec):
            loss = model(**batch).loss
        on_phase("backward")
        loss.backward()
        del loss
        if optimizer is not None:
            on_phase("optimizer step")
            if spec.max_grad_norm and spec.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, spec.max_grad_norm, foreach=True)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        on_phase("done")
    finally:
        for hook in hooks:
            hook.remove()
        for p in params:
            p.grad = None


__all__ = ["run_step", "make_optimizer", "autocast_context", "trainable_parameters", "gradients_outlive_micro_batch"]
