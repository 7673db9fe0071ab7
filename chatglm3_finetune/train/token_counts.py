"""What a training batch holds, counted on its own device: real (non-padding) and supervised tokens.

Counts stay tensors, so that summing them every micro-batch costs no host synchronisation; the
trainer reads them when it logs. A P-Tuning prefix is never counted: it is not in the batch.
"""

from __future__ import annotations

import torch

from ..data.encoding import IGNORE_INDEX

COUNTING_MODES = ("non_padding", "all", "no")


def real_tokens(batch: dict) -> torch.Tensor:
    """Non-padding tokens of a batch, in every layout the collators produce:
    - padding-free packed rows (`cu_seq_lens_q`): every position is a real token;
    - a 2D attention mask (dynamic padding, padding to the cap): its ones;
    - no mask at all: every position.
    """
    input_ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    if "cu_seq_lens_q" in batch or mask is None:
        return torch.tensor(input_ids.numel(), device=input_ids.device)
    return mask.sum()


def input_tokens(batch: dict, mode: str) -> torch.Tensor:
    """What `num_input_tokens_seen` adds for a batch: real tokens (non_padding, or no), every position (all)."""
    if mode == "all":
        return torch.tensor(batch["input_ids"].numel(), device=batch["input_ids"].device)
    return real_tokens(batch)


def supervised_tokens(batch: dict) -> torch.Tensor:
    """Positions the loss trains on: labels[1:] != -100 per row (label 0 is never predicted)."""
    return (batch["labels"][..., 1:] != IGNORE_INDEX).sum()


__all__ = ["COUNTING_MODES", "real_tokens", "input_tokens", "supervised_tokens"]
