"""Storage-level accounting of the tensors a step keeps: live bytes per part, their peak, and when it falls.

`StorageLedger` is a TorchDispatchMode that sees every tensor an operator returns and books its
*untyped storage* once (a view, a reshape or an in-place result shares its base's storage, so it
is never counted twice). A weak-reference finalizer gives the bytes back when the last tensor on
that storage dies, which is exactly when an allocator would get the memory back. Parameters,
optimizer states, gradients and inputs are booked by the caller under their own parts; what the
operators allocate is booked by the phase of the step (forward: activations kept for the backward;
backward and the optimizer step: transients) or, for anything as wide as the vocabulary, as logits.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

# The parts of a step's memory, in the order a report lists them.
PARTS = ("weights", "trainable", "gradients", "optimizer_states", "inputs", "activations_saved",
         "activations_transient", "logits_and_loss")
MODEL = "the model"  # the name the module stack gives the outermost module
ACTIVATION_PARTS = ("activations_saved", "activations_transient", "logits_and_loss")
PHASE_PARTS = {"forward": "activations_saved", "backward": "activations_transient",
               "optimizer step": "activations_transient"}


@dataclass
class Peak:
    """The most bytes live at once, its parts, and the moment of the step it fell in."""
    total: int = 0
    parts: dict[str, int] = field(default_factory=dict)
    moment: str = "before the step"


class _Entry:
    __slots__ = ("nbytes", "part")

    def __init__(self, nbytes: int, part: str):
        self.nbytes, self.part = nbytes, part


class StorageLedger(TorchDispatchMode):
    """Live bytes per part (PARTS), keyed on untyped storages; `peak` over everything and
    `activation_peak` over the activation parts alone (what a DeepSpeed plan adds to its own
    model states). `vocab_size`: tensors whose last dimension is this wide are logits.
    `round_to`: allocation granularity (the CUDA caching allocator rounds every block up to 512 bytes).
    """

    def __init__(self, vocab_size: int | None = None, round_to: int = 1):
        super().__init__()
        self.vocab_size = vocab_size
        self.round_to = max(1, round_to)
        self.phase = "setup"
        self.module_stack: list[str] = []  # the modules running now (forward, or recomputed in the backward)
        self.backward_module: str | None = None  # the module whose backward started last
        self._entries: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.live = dict.fromkeys(PARTS, 0)
        self.total = 0
        self.peak = Peak(parts=dict(self.live))
        self.activation_peak = Peak(parts=dict(self.live))

    # ---- booking -------------------------------------------------------------------------------

    def _size(self, storage) -> int:
        n = storage.nbytes()
        return -(-n // self.round_to) * self.round_to

    def book(self, tensor: torch.Tensor, part: str) -> None:
        """Counts the storage under `tensor` as `part` (once; a storage booked before moves to `part`)."""
        storage = tensor.untyped_storage()
        entry = self._entries.get(storage)
        if entry is not None:
            self._move(entry, part)
            return
        entry = _Entry(self._size(storage), part)
        self._entries[storage] = entry
        weakref.finalize(storage, self._release, entry)
        self.live[part] += entry.nbytes
        self.total += entry.nbytes
        self._note_peak()

    def _move(self, entry: _Entry, part: str) -> None:
        if entry.part != part:
            self.live[entry.part] -= entry.nbytes
            self.live[part] += entry.nbytes
            entry.part = part

    def _release(self, entry: _Entry) -> None:
        self.live[entry.part] -= entry.nbytes
        self.total -= entry.nbytes

    def _resized(self, storage, entry: _Entry) -> None:
        size = self._size(storage)
        if size != entry.nbytes:
            self.live[entry.part] += size - entry.nbytes
            self.total += size - entry.nbytes
            entry.nbytes = size
            self._note_peak()

    def moment(self) -> str:
        where = self.module_stack[-1] if self.module_stack else None
        if self.phase == "backward":
            if where:
                return f"backward, recomputing {where}"
            if self.backward_module == MODEL:
                return "start of the backward (output layer and loss)"
            return f"backward, in {self.backward_module}" if self.backward_module else "backward"
        return f"{self.phase}, in {where}" if where else self.phase

    def _note_peak(self) -> None:
        if self.total > self.peak.total:
            self.peak = Peak(self.total, dict(self.live), self.moment())
        activations = sum(self.live[part] for part in ACTIVATION_PARTS)
        if activations > self.activation_peak.total:
            self.activation_peak = Peak(activations, dict(self.live), self.moment())

    # ---- what the operators allocate ------------------------------------------------------------

    def part_of_new(self, tensor: torch.Tensor) -> str:
        if self.vocab_size and tensor.dim() and tensor.shape[-1] == self.vocab_size:
            return "logits_and_loss"
        return PHASE_PARTS.get(self.phase, "activations_transient")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                entry = self._entries.get(storage)
                if entry is None:
                    self.book(tensor, self.part_of_new(tensor))
                else:
                    self._resized(storage, entry)
        return out


__all__ = ["PARTS", "ACTIVATION_PARTS", "MODEL", "Peak", "StorageLedger"]
