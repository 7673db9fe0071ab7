"""Batches: right padding for training (dynamic, or to a fixed length as the reference did),
packed rows, and left padding for generation.

Packed rows (packing.py) have two batch layouts, chosen by the attention implementation:
- `PackedCollator()` (default): rows padded to a common length plus a 4D block-diagonal causal
  mask [batch, 1, q, k]. transformers hands a 4D mask to eager and sdpa attention untouched (CPU
  or GPU), and only this layout can carry a P-Tuning prefix (`packed_attention_mask(...,
  prefix_len=n)`). The mask is boolean (True = may attend) by default: sdpa, transformers'
  default, takes it in any compute dtype, and it is 4x smaller than a float one. Eager attention
  ADDS the mask to the scores, so it needs an additive float mask (a boolean one would be
  silently wrong); and sdpa on CUDA misreads a float mask of another dtype than the queries
  (H200, torch 2.11, bf16 queries, float32 mask: NaN with dtype-min, wrong outputs with -inf).
  `supervised_loss.attention_mask_for` converts a mask to what an implementation reads, and
  `supervised_lm_loss` applies it, so a packed batch trains correctly with either one.
- `PackedCollator(padding_free=True)`: every record of the batch in one row [1, total], no mask,
  position_ids plus `cu_seq_lens_q/k` and `max_length_q/k`. With
  `attn_implementation="flash_attention_2"` (GPU) transformers hands these to flash-attention's
  varlen kernel: no padding and no O(L^2) mask at all (not run yet: the GPU machine has no
  flash-attn package; sdpa and eager on it matched the unpacked loss). With eager/sdpa the same batch still works,
  as transformers rebuilds the block-diagonal causal mask from the restarting position_ids. Not
  for P-Tuning: that detection is off when a cache (the prefix) is passed.

Padding positions (labels -100) attend only to themselves: no query row is fully masked, so no
backend or dtype can turn a padding row into NaN, and no real token ever sees a padding key.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .encoding import IGNORE_INDEX
from .packing import concatenate_records, seq_lens_from_position_ids


def round_up(length: int, multiple: int | None) -> int:
    """length rounded up to a multiple of `multiple` (unchanged when it is None or 0)."""
    return -(-length // multiple) * multiple if multiple else length


class DataCollatorForChatGLM:
    """Pads a batch to its longest member (or to `max_length` when given, as the reference did).

    input_ids are padded with `pad_token_id`, labels with -100, and an attention mask marks the
    real tokens. Padding goes on the right for training.
    """

    def __init__(self, pad_token_id: int = 0, pad_to_multiple_of: int | None = None,
                 max_length: int | None = None):
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of
        self.max_length = max_length

    def padded_length(self, longest: int) -> int:
        return round_up(max(longest, self.max_length or 0), self.pad_to_multiple_of)

    def __call__(self, features: list[dict]) -> dict:
        length = self.padded_length(max(len(f["input_ids"]) for f in features))
        input_ids, labels, attention_mask = [], [], []
        for f in features:
            pad = length - len(f["input_ids"])
            input_ids.append(list(f["input_ids"]) + [self.pad_token_id] * pad)
            labels.append(list(f["labels"]) + [IGNORE_INDEX] * pad)
            attention_mask.append([1] * len(f["input_ids"]) + [0] * pad)
        return {"input_ids": torch.tensor(input_ids), "labels": torch.tensor(labels),
                "attention_mask": torch.tensor(attention_mask)}


# ---- packed rows ------------------------------------------------------------------------------------

def packed_attention_mask(seq_lens_per_row: Sequence[Sequence[int]], length: int,
                          dtype: torch.dtype = torch.bool, prefix_len: int = 0) -> torch.Tensor:
    """Block-diagonal causal mask [batch, 1, length, prefix_len + length] for packed rows.

    Row b holds records of seq_lens_per_row[b] tokens from position 0, then padding up to length.
    A token sees the earlier tokens of its own record and the prefix_len leading columns (a
    P-Tuning prefix every record shares); a padding position sees only itself.
    dtype torch.bool: True = may attend. A float dtype: additive, 0 or that dtype's minimum.
    """
    batch = len(seq_lens_per_row)
    record_id = torch.full((batch, length), -1, dtype=torch.long)
    for b, seq_lens in enumerate(seq_lens_per_row):
        if sum(seq_lens) > length:
            raise ValueError(f"row {b} holds {sum(seq_lens)} tokens, more than the mask length {length}")
        if seq_lens:
            record_id[b, :sum(seq_lens)] = torch.repeat_interleave(
                torch.arange(len(seq_lens)), torch.tensor(seq_lens, dtype=torch.long))
    is_real = record_id >= 0
    same_record = record_id[:, :, None] == record_id[:, None, :]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    allowed = (same_record & causal & is_real[:, :, None]) | (torch.eye(length, dtype=torch.bool) & ~is_real[:, :, None])
    if prefix_len:
        prefix_columns = is_real[:, :, None].expand(batch, length, prefix_len)
        allowed = torch.cat([prefix_columns, allowed], dim=-1)
    allowed = allowed[:, None]
    if dtype == torch.bool:
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)


class PackedCollator:
    """Collates rows from `pack_features` into tensors (see the module doc for the two layouts).

    Rows without "seq_lens" (e.g. dropped by the Trainer's remove_unused_columns) get them from
    their position_ids; plain records without position_ids (an unpacked eval set) are rows of one.
    """

    def __init__(self, pad_token_id: int = 0, pad_to_multiple_of: int | None = None,
                 mask_dtype: torch.dtype = torch.bool, padding_free: bool = False):
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of
        self.mask_dtype = mask_dtype
        self.padding_free = padding_free

    def __call__(self, rows: Sequence[dict]) -> dict:
        rows = [row if "position_ids" in row else concatenate_records([row]) for row in rows]
        seq_lens_per_row = [list(row["seq_lens"]) if "seq_lens" in row else seq_lens_from_position_ids(row["position_ids"])
                            for row in rows]
        if self.padding_free:
            return self._padding_free(rows, seq_lens_per_row)
        length = round_up(max(len(row["input_ids"]) for row in rows), self.pad_to_multiple_of)
        input_ids, labels, position_ids = [], [], []
        for row in rows:
            padding = length - len(row["input_ids"])
            input_ids.append(list(row["input_ids"]) + [self.pad_token_id] * padding)
            labels.append(list(row["labels"]) + [IGNORE_INDEX] * padding)
            position_ids.append(list(row["position_ids"]) + list(range(padding)))
        return {
            "input_ids": torch.tensor(input_ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "position_ids": torch.tensor(position_ids, dtype=torch.long),
            "attention_mask": packed_attention_mask(seq_lens_per_row, length, self.mask_dtype),
        }

    def _padding_free(self, rows: Sequence[dict], seq_lens_per_row: list[list[int]]) -> dict:
        for row, row_lens in zip(rows, seq_lens_per_row):
            if sum(row_lens) != len(row["input_ids"]):
                raise ValueError("padding_free takes unpadded rows from pack_features: a row's seq_lens "
                                 f"add up to {sum(row_lens)}, its input_ids hold {len(row['input_ids'])}")
        seq_lens = [n for row_lens in seq_lens_per_row for n in row_lens]
        cu_seq_lens = torch.tensor([0, *seq_lens], dtype=torch.int32).cumsum(0, dtype=torch.int32)
        return {
            "input_ids": torch.tensor([[t for row in rows for t in row["input_ids"]]], dtype=torch.long),
            "labels": torch.tensor([[t for row in rows for t in row["labels"]]], dtype=torch.long),
            "position_ids": torch.tensor([[p for row in rows for p in row["position_ids"]]], dtype=torch.long),
            "cu_seq_lens_q": cu_seq_lens,
            "cu_seq_lens_k": cu_seq_lens,
            "max_length_q": max(seq_lens),
            "max_length_k": max(seq_lens),
        }


# ---- generation: left padding -----------------------------------------------------------------------

def left_pad(rows: list[list[int]], pad_token_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) with every row right-aligned, padding on the left."""
    if any(len(row) == 0 for row in rows):
        raise ValueError("an empty prompt cannot be generated from")
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
        attention_mask[i, width - len(row):] = 1
    return input_ids.to(device), attention_mask.to(device)


class GenerationCollator:
    """Generation batches: prompts LEFT-padded (the new tokens then line up at the end), and
    `labels` = the items' indices [batch, 1] so metrics find each prediction's reference."""

    def __init__(self, pad_token_id: int = 0):
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict]) -> dict:
        input_ids, attention_mask = left_pad([list(f["input_ids"]) for f in features], self.pad_token_id)
        labels = torch.tensor([list(f["labels"]) for f in features], dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def build_collator(tokenizer, data_args):
    """The training collator the data options ask for: packed rows, dynamic or fixed padding."""
    from .training_data import max_sequence_length

    if data_args.packing:
        # One padding-free row per batch: attention runs per record (packed_sdpa or flash-attention varlen).
        return PackedCollator(pad_token_id=tokenizer.pad_token_id, padding_free=True)
    return DataCollatorForChatGLM(
        pad_token_id=tokenizer.pad_token_id, pad_to_multiple_of=data_args.pad_to_multiple_of,
        max_length=max_sequence_length(data_args) if data_args.pad_to_max_length else None)


__all__ = ["DataCollatorForChatGLM", "PackedCollator", "GenerationCollator", "packed_attention_mask", "left_pad",
           "round_up", "build_collator"]
