"""Batches: right padding for training (dynamic, or to a fixed length as the reference did),
packed rows, and left padding for generation.

Packed rows (packing.py) become ONE padding-free row [1, total]: no mask, position_ids restarting
per record, plus `cu_seq_lens_q/k` and `max_length_q/k`. Attention then runs per record:
`packed_sdpa` (model/packed_attention.py, which also keeps a P-Tuning prefix visible to every
record) or flash-attention's varlen kernel (`attn_implementation="flash_attention_2"`). No
padding and no (row length)^2 mask is ever built.

Right-padded batches carry a 2D attention mask; padding positions are never targets (labels -100).
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

class PackedCollator:
    """Collates rows from `pack_features` into one padding-free row (see the module doc).

    Rows without "seq_lens" (e.g. dropped by the Trainer's remove_unused_columns) get them from
    their position_ids; plain records without position_ids (an unpacked eval set) are rows of one.
    """

    def __call__(self, rows: Sequence[dict]) -> dict:
        rows = [row if "position_ids" in row else concatenate_records([row]) for row in rows]
        seq_lens_per_row = [list(row["seq_lens"]) if "seq_lens" in row else seq_lens_from_position_ids(row["position_ids"])
                            for row in rows]
        for row, row_lens in zip(rows, seq_lens_per_row):
            if sum(row_lens) != len(row["input_ids"]):
                raise ValueError("PackedCollator takes unpadded rows from pack_features: a row's seq_lens "
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
        return PackedCollator()
    return DataCollatorForChatGLM(
        pad_token_id=tokenizer.pad_token_id, pad_to_multiple_of=data_args.pad_to_multiple_of,
        max_length=max_sequence_length(data_args) if data_args.pad_to_max_length else None)


__all__ = ["DataCollatorForChatGLM", "PackedCollator", "GenerationCollator", "left_pad",
           "round_up", "build_collator"]
