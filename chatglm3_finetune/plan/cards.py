"""GPUs the plan compares with: their memory and bf16 matmul rate, from a short table or measured.

Table rates are the dense bf16 tensor-core peaks of the vendors' data sheets (no sparsity); a
square bf16 matmul reaches about 80% of them and a training step less, so times computed from
them are lower bounds. Memory is what
`torch.cuda.get_device_properties(i).total_memory` reports on those cards (a "24 GB" A10 holds
22.5 GiB). When a GPU is present its memory is read and its matmul rate measured (about a second).
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

GIB = 2 ** 30


@dataclass(frozen=True)
class Card:
    name: str
    memory_bytes: int
    bf16_flops: float  # matmul FLOP/s
    rate_source: str  # "data sheet" or "measured"


_TABLE = json.loads((Path(__file__).with_name("cards.json")).read_text())
CARDS = tuple(Card(card["name"], int(card["memory_gib"] * GIB), card["bf16_tflops"] * 1e12, "data sheet")
              for card in _TABLE["cards"])
VERDICT_CARDS = tuple(_TABLE["verdicts"])
DEFAULT_CARD = _TABLE["default"]  # planned for when no GPU is visible and none is named


def card_named(name: str) -> Card:
    return next(card for card in CARDS if card.name == name)


_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(gib|gb|g|mib|mb|m)?\s*$", re.IGNORECASE)


def parse_memory(text: str) -> int:
    """'24GB', '24GiB', '24', '80 GB', '24000MB' -> bytes. GB means 2^30 bytes, as card sizes do."""
    match = _SIZE.match(str(text))
    if not match:
        raise ValueError(f"{text!r} is not a memory size: write it like 24GB (2^30 bytes per GB) or 24000MB")
    number, unit = float(match.group(1)), (match.group(2) or "gb").lower()
    value = number * (2 ** 20 if unit.startswith("m") else GIB)
    if value <= 0:
        raise ValueError(f"{text!r}: a GPU's memory must be more than zero")
    return int(value)


def closest_card(memory_bytes: int) -> Card:
    """The table's card whose memory is nearest (for the rate when only a size is given)."""
    return min(CARDS, key=lambda card: abs(card.memory_bytes - memory_bytes))


def visible_gpu(local_rank: int = 0) -> Card | None:
    """The GPU this process would train on (its memory; rate measured), or None without one."""
    import torch

    if not torch.cuda.is_available():
        return None
    index = local_rank % torch.cuda.device_count()
    properties = torch.cuda.get_device_properties(index)
    return Card(properties.name, properties.total_memory, measured_matmul_rate(index), "measured")


def measured_matmul_rate(device_index: int = 0, size: int = 8192, repeats: int = 10) -> float:
    """bf16 FLOP/s of a square matmul on the GPU (the best of three timings of `repeats` matmuls)."""
    import torch

    device = torch.device("cuda", device_index)
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(3):
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(repeats):
            torch.mm(a, b)
        torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    del a, b
    torch.cuda.empty_cache()
    return 2 * size ** 3 * repeats / best


__all__ = ["Card", "CARDS", "VERDICT_CARDS", "DEFAULT_CARD", "GIB", "card_named", "parse_memory", "closest_card",
           "visible_gpu", "measured_matmul_rate"]
