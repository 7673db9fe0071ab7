"""Batches: right padding for training (dynamic, or to a fixed length as the reference did)."""

from __future__ import annotations

from .encoding import IGNORE_INDEX


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
        length = max(longest, self.max_length or 0)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        return length

    def __call__(self, features: list[dict]) -> dict:
        import torch

        length = self.padded_length(max(len(f["input_ids"]) for f in features))
        input_ids, labels, attention_mask = [], [], []
        for f in features:
            pad = length - len(f["input_ids"])
            input_ids.append(list(f["input_ids"]) + [self.pad_token_id] * pad)
            labels.append(list(f["labels"]) + [IGNORE_INDEX] * pad)
            attention_mask.append([1] * len(f["input_ids"]) + [0] * pad)
        return {"input_ids": torch.tensor(input_ids), "labels": torch.tensor(labels),
                "attention_mask": torch.tensor(attention_mask)}


def build_collator(tokenizer, data_args):
    """The training collator the data options ask for: packed rows, dynamic or fixed padding."""
    from .training_data import max_sequence_length

    if data_args.packing:
        from .packing import PackedCollator

        # One padding-free row per batch: attention runs per record (packed_sdpa or flash-attention varlen).
        return PackedCollator(pad_token_id=tokenizer.pad_token_id, padding_free=True)
    return DataCollatorForChatGLM(
        pad_token_id=tokenizer.pad_token_id, pad_to_multiple_of=data_args.pad_to_multiple_of,
        max_length=max_sequence_length(data_args) if data_args.pad_to_max_length else None)
