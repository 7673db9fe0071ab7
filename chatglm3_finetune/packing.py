"""Packing: several short records share one training row, without seeing each other.

`pack_features` places whole records into rows of at most `max_length` tokens (best-fit
decreasing: longest record first, into the fullest row that still has room; deterministic).
Inside a row each record keeps its own positions (restarting at 0) and its first label is -100,
so no record predicts across a boundary; the attention mask confines every record to itself.

Two batch layouts, chosen by the attention implementation:
- `PackedCollator()` (default): rows padded to a common length plus a 4D block-diagonal causal
  mask [batch, 1, q, k]. transformers hands a 4D mask to eager and sdpa attention untouched (CPU
  or GPU), and only this layout can carry a P-Tuning prefix (`packed_attention_mask(...,
  prefix_len=n)`). The mask is boolean (True = may attend) by default: sdpa, transformers'
  default, takes it in any compute dtype, and it is 4x smaller than a float one. Eager attention
  ADDS the mask to the scores, so it needs an additive float mask (a boolean one would be
  silently wrong); and sdpa on CUDA misreads a float mask of another dtype than the queries
  (H200, torch 2.11, bf16 queries, float32 mask: NaN with dtype-min, wrong outputs with -inf).
  `attention_mask_for` converts a mask to what an implementation reads, and
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

import bisect
from collections.abc import Sequence

import torch

IGNORE_INDEX = -100


def pack_features(features: Sequence[dict], max_length: int) -> list[dict]:
    """Packs unpadded {"input_ids", "labels"} records into rows of at most max_length tokens.

    Returns rows {"input_ids", "labels", "position_ids", "seq_lens"} of plain lists. A record longer
    than max_length is an error (truncate while encoding, where the loss of targets is counted).
    """
    if max_length < 1:
        raise ValueError(f"max_length must be positive, got {max_length}")
    lengths = []
    for index, feature in enumerate(features):
        length = len(feature["input_ids"])
        if len(feature["labels"]) != length:
            raise ValueError(f"record {index}: {len(feature['labels'])} labels for {length} input_ids")
        if length == 0:
            raise ValueError(f"record {index} is empty")
        if length > max_length:
            raise ValueError(f"record {index} has {length} tokens, more than max_length={max_length}: "
                             "truncate it while encoding (max_seq_length) or raise the packing length")
        lengths.append(length)

    # Best-fit decreasing: each record goes to the row with the least room that still fits it.
    # `free` is kept sorted as (room left, row index), so a lookup is a bisect.
    row_members: list[list[int]] = []
    free: list[tuple[int, int]] = []
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        spot = bisect.bisect_left(free, (lengths[index], -1))
        if spot == len(free):
            row = len(row_members)
            row_members.append([])
            room = max_length
        else:
            room, row = free.pop(spot)
        row_members[row].append(index)
        if room - lengths[index] > 0:
            bisect.insort(free, (room - lengths[index], row))
    return [_concatenate([features[i] for i in members]) for members in row_members]


def _concatenate(records: list[dict]) -> dict:
    row = {"input_ids": [], "labels": [], "position_ids": [], "seq_lens": []}
    for record in records:
        length = len(record["input_ids"])
        row["input_ids"].extend(record["input_ids"])
        # Label 0 of a record is never predicted when it stands alone; in a row it would be the
        # target of the previous record's last token, so it is masked here.
        row["labels"].extend([IGNORE_INDEX, *record["labels"][1:]])
        row["position_ids"].extend(range(length))
        row["seq_lens"].append(length)
    return row


def seq_lens_from_position_ids(position_ids: Sequence[int]) -> list[int]:
    """Record lengths of one packed row, read off where its positions restart at 0."""
    starts = [i for i, position in enumerate(position_ids) if position == 0]
    if not starts or starts[0] != 0:
        raise ValueError("a packed row's position_ids must start at 0 and restart at 0 per record")
    return [end - start for start, end in zip(starts, starts[1:] + [len(position_ids)])]


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


def attention_mask_for(attn_implementation: str, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A 4D mask (boolean, or additive float) in the form `attn_implementation` reads.

    eager: additive, 0 or the minimum of dtype (the model's dtype). Anything else (sdpa, ...): boolean.
    """
    allowed = mask if mask.dtype == torch.bool else mask == 0
    if attn_implementation != "eager":
        return allowed
    if mask.dtype == dtype:
        return mask  # already additive in the model's dtype
    return torch.zeros(allowed.shape, dtype=dtype, device=mask.device).masked_fill_(~allowed, torch.finfo(dtype).min)


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
        rows = [row if "position_ids" in row else _concatenate([row]) for row in rows]
        seq_lens_per_row = [list(row["seq_lens"]) if "seq_lens" in row else seq_lens_from_position_ids(row["position_ids"])
                            for row in rows]
        if self.padding_free:
            return self._padding_free(rows, seq_lens_per_row)
        length = max(len(row["input_ids"]) for row in rows)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
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


__all__ = ["pack_features", "packed_attention_mask", "attention_mask_for", "seq_lens_from_position_ids", "PackedCollator"]
