"""Packing: several short records share one training row, without seeing each other.

`pack_features` places whole records into rows of at most `max_length` tokens (best-fit
decreasing: longest record first, into the fullest row that still has room; deterministic).
Inside a row each record keeps its own positions (restarting at 0) and its first label is -100,
so no record predicts across a boundary; packed attention (model/packed_attention.py) confines
every record to itself.

Batches of packed rows (one padding-free row, no mask) are made in collation.py.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

from .encoding import IGNORE_INDEX


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

    return [concatenate_records([features[i] for i in members]) for members in pack_lengths(lengths, max_length)]


def pack_lengths(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """The rows `pack_features` makes of records of these lengths (each at most max_length), as
    lists of record indices: best-fit decreasing, each record into the row with the least room
    that still fits it."""
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
    return row_members


def concatenate_records(records: list[dict]) -> dict:
    """One packed row of these records: each keeps its positions from 0 and loses its first label."""
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


__all__ = ["pack_features", "pack_lengths", "concatenate_records", "seq_lens_from_position_ids"]
