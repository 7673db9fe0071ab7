"""The divergence guard: a non-finite loss or gradient norm (or, under fp16 loss scaling, a long run
of skipped steps) stops training before anything non-finite is saved."""

from __future__ import annotations

import logging
import math

import torch
from transformers import TrainerCallback

from .preemption import flags_on_any_rank

logger = logging.getLogger(__name__)

DIVERGED_EXIT_CODE = 3
# Dynamic loss scaling halves the scale at each overflow: from 2**16 it reaches 1 in 16 skipped
# steps, so a longer unbroken run of skips means the model itself overflows.
FP16_SKIPPED_STEPS_LIMIT = 25


class TrainingDiverged(RuntimeError):
    """Training produced non-finite values; the message names the step, the value and a likely cause."""


def _as_float(value) -> float:
    return float(value.item() if isinstance(value, torch.Tensor) else value)


def any_rank(flag: bool, device) -> bool:
    """True when `flag` is true on any process (all ranks call this at the same point)."""
    return flags_on_any_rank([flag], device)[0]


def first_non_finite_parameter(model) -> str | None:
    """The name of a trainable parameter holding NaN/inf (its local ZeRO-3 shard), or None, on any rank."""
    bad = None
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            local = getattr(parameter, "ds_tensor", parameter)
            if local.numel() and not torch.isfinite(local).all():
                bad = name
                break
    device = next(model.parameters()).device
    if any_rank(bad is not None, device) and bad is None:
        return "(a parameter on another process)"
    return bad


class DivergenceGuard(TrainerCallback):
    """Watches each optimizer step. The trainer feeds it the micro-batch losses and the gradient norm.

    Without DeepSpeed or fp16 the check runs before the optimizer step, so up to `patience`
    consecutive bad steps can be skipped (their gradients dropped) instead of stopping. Under
    DeepSpeed the engine has already stepped, and under fp16 non-finite gradients are the loss
    scaler's business: there only an unbroken run of skipped steps stops the run.
    """

    def __init__(self, patience: int = 0, fp16: bool = False, deepspeed: bool = False):
        self.patience, self.fp16, self.deepspeed = patience, fp16, deepspeed
        self.bad_steps_in_a_row = 0
        self.skipped_in_a_row = 0
        self.skipped_steps = 0
        self._skipped_since_log = 0
        self._last_logged_step = 0
        self._reset_step()

    def _reset_step(self) -> None:
        self.losses = []  # this step's micro-batch losses, kept on the device (no sync per micro-batch)
        self.grad_norm = None

    # ---- fed by the trainer ----

    def observe_loss(self, loss: torch.Tensor) -> None:
        self.losses.append(loss.detach().reshape(-1)[:1].float())

    def observe_grad_norm(self, grad_norm) -> None:
        self.grad_norm = grad_norm

    def loss_to_accumulate(self, loss: torch.Tensor) -> torch.Tensor:
        """With patience, a skipped batch's NaN must not poison the running loss sum: it adds 0 and
        `correct_logged_loss` averages over the steps that were not skipped."""
        return torch.nan_to_num(loss, nan=0.0, posinf=0.0, neginf=0.0) if self.patience else loss

    def correct_logged_loss(self, logs: dict, global_step: int) -> None:
        window, skipped = global_step - self._last_logged_step, self._skipped_since_log
        self._last_logged_step, self._skipped_since_log = global_step, 0
        if skipped:
            logs["loss"] = logs["loss"] * window / (window - skipped) if window > skipped else float("nan")
            logs["skipped_steps"] = self.skipped_steps

    def on_train_begin(self, args, state, control, **kwargs):
        self._last_logged_step = state.global_step

    # ---- callback events ----

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.deepspeed or self.fp16:
            return
        problem = self._problem(args.device)
        if problem is None:
            self.bad_steps_in_a_row = 0
            return
        self.bad_steps_in_a_row += 1
        if self.bad_steps_in_a_row > self.patience:
            raise TrainingDiverged(self._message(state.global_step + 1, problem, args))
        for parameter in model.parameters():  # optimizers leave parameters without a gradient untouched
            parameter.grad = None
        self.skipped_steps += 1
        self._skipped_since_log += 1
        logger.warning("Skipped optimizer step %d: %s (%d of --nan_patience %d in a row)", state.global_step + 1,
                       problem, self.bad_steps_in_a_row, self.patience)

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        try:
            if self.fp16:
                skipped = bool(getattr(optimizer, "step_was_skipped", False))
                self.skipped_in_a_row = self.skipped_in_a_row + 1 if skipped else 0
                if any_rank(self.skipped_in_a_row >= FP16_SKIPPED_STEPS_LIMIT, args.device):
                    raise TrainingDiverged(self._message(
                        state.global_step, f"the last {self.skipped_in_a_row} optimizer steps were all skipped by "
                                           f"fp16 loss scaling (overflow)", args))
            elif self.deepspeed:
                problem = self._problem(args.device)
                if problem is not None:
                    raise TrainingDiverged(self._message(state.global_step, problem, args))
        finally:
            self._reset_step()

    def _problem(self, device) -> str | None:
        losses = torch.cat(self.losses) if self.losses else torch.zeros(1)
        non_finite = losses[~torch.isfinite(losses)]
        loss_bad = non_finite.numel() > 0
        grad_bad = self.grad_norm is not None and not math.isfinite(_as_float(self.grad_norm))
        if not any_rank(loss_bad or grad_bad, device):
            return None
        if loss_bad:
            return f"the loss is {_as_float(non_finite[0])}"
        if grad_bad:
            return f"the gradient norm is {_as_float(self.grad_norm)}"
        return "a non-finite loss on another process"

    def _message(self, step: int, problem: str, args) -> str:
        if self.fp16:
            cause = "fp16 overflow: train in bf16 (--bf16) if the hardware has it, or lower --learning_rate"
        elif step <= 1:
            cause = ("non-finite from the first step: check the model weights and --learning_rate "
                     f"({args.learning_rate})")
        else:
            cause = f"the learning rate is too high (--learning_rate {args.learning_rate}): lower it"
        return f"training diverged at step {step}: {problem}. Likely cause: {cause}. Nothing from this step on was saved"
