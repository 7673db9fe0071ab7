"""The read-only transformers `Cache` that hands every decoder layer its P-Tuning prefix.

`update()` returns cat(prefix, new keys/values) and stores nothing, so the same forward (or its
gradient-checkpointing replay) can run twice. It adapts to the layer protocol of transformers'
`Cache` (tested with the version `compat` checks); generation uses a plain `DynamicCache`
filled with the prefix instead (`PrefixTuningModel.generate`).
"""

from __future__ import annotations

import torch
from transformers import Cache, CacheLayerMixin

from ...compat import check_version


class _PrefixLayer(CacheLayerMixin):
    """One layer of a `PrefixCache`: hands out cat(prefix, new) and keeps nothing."""

    is_sliding = False

    def __init__(self, key_prefix: torch.Tensor, value_prefix: torch.Tensor):
        super().__init__()
        self.keys, self.values = key_prefix, value_prefix
        self.device = key_prefix.device
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:
        pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        keys = self.keys.to(key_states.device, key_states.dtype)
        values = self.values.to(value_states.device, value_states.dtype)
        return torch.cat([keys, key_states], dim=-2), torch.cat([values, value_states], dim=-2)

    def get_mask_sizes(self, query_length) -> tuple[int, int]:
        if isinstance(query_length, torch.Tensor):  # older transformers pass cache_position
            query_length = query_length.shape[0]
        return self.get_seq_length() + query_length, 0

    def get_seq_length(self) -> int:
        return self.keys.shape[-2]

    def get_max_length(self) -> int:
        return -1

    def _read_only(self, *args, **kwargs):
        raise NotImplementedError("PrefixCache is read-only and built fresh for every forward; "
                                  "generation uses a DynamicCache of the prefix instead (PrefixTuningModel.generate)")

    reset = crop = reorder_cache = batch_repeat_interleave = batch_select_indices = offload = _read_only


class PrefixCache(Cache):
    """A read-only cache holding every layer's prefix. `get_seq_length()` is the prefix length,
    which the causal mask offsets the queries by."""

    def __init__(self, layer_prefixes: list[tuple[torch.Tensor, torch.Tensor]]):
        check_version("transformers")
        super().__init__(layers=[_PrefixLayer(key, value) for key, value in layer_prefixes])

    @property
    def pre_seq_len(self) -> int:
        return self.get_seq_length()


__all__ = ["PrefixCache"]
