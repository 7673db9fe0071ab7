"""Stopping safely: the first SIGTERM/SIGINT finishes the current optimizer step and saves a checkpoint
(all ranks agree on the step); one that comes after the last step lets the final save complete first.
A second SIGINT exits at once. Also time-based checkpoints."""

from __future__ import annotations

import logging
import os
import signal
import sys
import time

import torch
from transformers import TrainerCallback

logger = logging.getLogger(__name__)

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: stopped on request with a checkpoint; rerun to resume
RESUME_HINT = "rerun the same command to resume"


def flags_on_any_rank(flags: list[bool], device) -> list[bool]:
    """Each flag OR-ed over all processes (every rank must call this at the same point)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flags
    tensor = torch.tensor([1.0 if flag else 0.0 for flag in flags], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return [bool(value) for value in tensor.tolist()]


class PreemptionSaver(TrainerCallback):
    """Catches SIGTERM/SIGINT during training and saves every `save_every_minutes` (0: off).

    Both decisions are taken at the end of an optimizer step from flags all-reduced over the ranks,
    so every rank saves the same step (a checkpoint under ZeRO needs all of them).
    """

    def __init__(self, save_every_minutes: float = 0):
        self.save_every_seconds = save_every_minutes * 60
        self.signal_name = None
        self.preempted = False
        self.training_ended = False
        self._last_save = time.monotonic()
        self._previous_handlers = {}

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.signal_name is None:
            self.signal_name = name
            if self.training_ended:
                print(f"{name} received: completing the final save, then stopping (press Ctrl-C again to exit at "
                      f"once; rerunning the same command then writes the final model from the last checkpoint)",
                      file=sys.stderr, flush=True)
            else:
                print(f"{name} received: finishing this optimizer step, then saving a checkpoint "
                      f"(press Ctrl-C again to exit at once without saving)", file=sys.stderr, flush=True)
        elif signum == signal.SIGINT:
            print("second interrupt: exiting now without saving", file=sys.stderr, flush=True)
            os._exit(130)
        # a second SIGTERM (launchers forward the one they got) changes nothing: the save is under way

    def on_train_begin(self, args, state, control, **kwargs):
        self._last_save = time.monotonic()
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._previous_handlers[signum] = signal.signal(signum, self._handle)

    def on_step_end(self, args, state, control, **kwargs):
        time_due = 0 < self.save_every_seconds <= time.monotonic() - self._last_save
        stop, save = flags_on_any_rank([self.signal_name is not None, time_due], args.device)
        if stop:
            self.preempted = state.global_step < state.max_steps
            control.should_save = True
            control.should_training_stop = True
            logger.warning("Stopping at step %d on request: saving a checkpoint", state.global_step)
        elif save:
            logger.info("Saving a checkpoint at step %d (--save_every_minutes %g)", state.global_step,
                        self.save_every_seconds / 60)
            control.should_save = True

    def on_save(self, args, state, control, **kwargs):
        self._last_save = time.monotonic()

    def on_train_end(self, args, state, control, **kwargs):
        # The handlers stay until `release`: a stop request during the final save is honoured after it.
        self.training_ended = True

    def stop_requested(self, device) -> bool:
        """Whether any rank got a stop request so far (every rank must call this at the same point)."""
        return flags_on_any_rank([self.signal_name is not None], device)[0]

    def release(self) -> None:
        """Gives SIGTERM/SIGINT back their previous handlers."""
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers.clear()
