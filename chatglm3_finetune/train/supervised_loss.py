"""Causal-LM loss computed only where there is something to learn.

`GlmForCausalLM(..., labels=...)` projects EVERY position onto the 65,024-wide vocabulary, then
throws most of it away (prompts, system turns and padding are -100). Here the decoder body runs as
usual, but the output layer and the cross entropy only see the hidden states whose next label is a
target, a chunk at a time, each chunk checkpointed: the [n, vocab] logits never all exist at once,
in the forward nor in the backward. The result (loss and every gradient) is the same as the full
computation's.

The model's submodules are only ever called (`causal_lm.model`, `causal_lm.lm_head`), never their
weights read, so DeepSpeed ZeRO-3 gathers partitioned parameters through its usual hooks.

Models compute it inside their own forward when the switch in `loss_switch` is on.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..data.encoding import IGNORE_INDEX

# 4096 targets: at most ~1 GB of fp32 logits (and as much gradient) at ChatGLM3's vocabulary.
DEFAULT_CHUNK_SIZE = 4096


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """The label shift of a causal LM: the hidden state at position i predicts labels[i + 1], so
    label 0 of a row is never a target (nothing comes before it). [batch, seq] -> [batch, seq - 1]."""
    return labels[..., 1:]


def count_targets(labels) -> int:
    """How many positions a causal-LM loss trains on: the shifted labels that are not -100.

    labels: a [batch, seq] tensor, a list of rows, or one row (list of ints). This is also how the
    HF Trainer counts `num_items_in_batch` (ChatGLMTrainer declares the shift for every model kind).
    """
    if isinstance(labels, torch.Tensor):
        return int((shift_labels(labels) != IGNORE_INDEX).sum())
    rows = [labels] if labels and not isinstance(labels[0], (list, tuple)) else labels
    return sum(1 for row in rows for label in row[1:] if label != IGNORE_INDEX)


def _chunk_cross_entropy_sum(lm_head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = lm_head(hidden).float()
    return F.cross_entropy(logits, targets, reduction="sum")


def supervised_lm_loss(causal_lm: torch.nn.Module, labels: torch.Tensor, num_items_in_batch=None,
                       chunk_size: int = DEFAULT_CHUNK_SIZE, checkpoint_chunks: bool = True,
                       **model_inputs) -> tuple[torch.Tensor, int]:
    """Next-token cross entropy over the supervised positions only; returns (loss, num_targets).

    causal_lm: a transformers causal LM with a decoder body `.model` and an output layer `.lm_head`
    (GlmForCausalLM, LlamaForCausalLM, ...). labels: [batch, seq], HF convention (aligned with
    input_ids, -100 = not a target). model_inputs: what the decoder body takes (input_ids,
    attention_mask, position_ids, cache, ...), passed through.
    num_items_in_batch: the HF Trainer's target count over all micro-batches and processes; the
    summed loss is divided by it, else by this batch's own number of targets.
    chunk_size: supervised positions per output-layer call; when there is more than one chunk and
    checkpoint_chunks is on, the backward recomputes each chunk's logits instead of keeping them
    all, so at most one chunk's [chunk_size, vocab] logits exist at any time.
    A batch without targets gives a zero loss that still reaches every parameter (zero gradients).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of positions, got {chunk_size}")
    for part in ("model", "lm_head"):
        if not isinstance(getattr(causal_lm, part, None), torch.nn.Module):
            raise TypeError(f"supervised_lm_loss needs a causal LM with a `.{part}` submodule "
                            f"(e.g. GlmForCausalLM); got {type(causal_lm).__name__}")
    model_inputs.setdefault("use_cache", False)
    hidden = causal_lm.model(**model_inputs).last_hidden_state
    labels = labels.to(hidden.device)
    if labels.shape != hidden.shape[:2]:
        raise ValueError(f"labels {tuple(labels.shape)} do not match the inputs {tuple(hidden.shape[:2])}")

    next_labels = shift_labels(labels)
    is_target = next_labels != IGNORE_INDEX
    target_hidden = hidden[:, :-1][is_target]
    target_ids = next_labels[is_target]
    num_targets = target_ids.numel()

    # A lone chunk is held until its backward either way: recomputing it would only cost time.
    use_checkpoint = checkpoint_chunks and torch.is_grad_enabled() and num_targets > chunk_size
    # With no targets the one (empty) chunk still calls lm_head, so every parameter gets a gradient.
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, max(num_targets, 1), chunk_size):
        chunk = (causal_lm.lm_head, target_hidden[start:start + chunk_size], target_ids[start:start + chunk_size])
        if use_checkpoint:
            total = total + checkpoint(_chunk_cross_entropy_sum, *chunk, use_reentrant=False)
        else:
            total = total + _chunk_cross_entropy_sum(*chunk)

    if num_items_in_batch is None:
        denominator = max(num_targets, 1)
    elif torch.is_tensor(num_items_in_batch):
        denominator = num_items_in_batch.to(total.device)
    else:
        denominator = num_items_in_batch
    return total / denominator, num_targets


__all__ = ["DEFAULT_CHUNK_SIZE", "shift_labels", "count_targets", "supervised_lm_loss"]
