"""Attention over packed rows at the cost of their records alone: `packed_sdpa`, one sdpa call per record.

A padding-free batch (`PackedCollator(padding_free=True)`: every record in one row, positions
restarting at 0, `cu_seq_lens_q` marking where each record starts) reaches this attention function
through transformers' attention interface. Each record's queries attend, with sdpa's causal
kernel, to its own keys only: no (row length)^2 mask is built and no masked block is computed, on
the CPU or the GPU. A P-Tuning prefix (keys the cache puts before the row's) stays visible to every
record. Batches that carry an attention mask (evaluation, generation, padded batches) and rows
without `cu_seq_lens_q` take transformers' own sdpa path, so a model loaded with
`attn_implementation="packed_sdpa"` behaves like an sdpa model everywhere else.

`use_packed_sdpa()` registers the name; `packing_attention()` picks the implementation for --packing.
"""

from __future__ import annotations

import torch

PACKED_SDPA = "packed_sdpa"

_VARLEN_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def _sdpa(module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, **kwargs)[0]


def _record_attention(module, query, key, value, prefix_len: int, dropout: float, scaling, **kwargs):
    """Causal attention of one record [batch, heads, n, dim] over the prefix and its own keys."""
    if not prefix_len:
        return _sdpa(module, query, key, value, None, dropout, scaling, True, **kwargs)
    n = query.shape[2]
    # The prefix columns, then the causal triangle: sdpa's own is_causal aligns top-left, which is wrong here.
    allowed = torch.ones(n, prefix_len + n, dtype=torch.bool, device=query.device)
    allowed[:, prefix_len:] = torch.ones(n, n, dtype=torch.bool, device=query.device).tril()
    return _sdpa(module, query, key, value, allowed[None, None], dropout, scaling, False, **kwargs)


_last_bounds: list = [None, None]  # (cu_seq_lens tensor, its list): every layer reads the same one


def _record_bounds(cu_seq_lens: torch.Tensor) -> list[int]:
    """cu_seq_lens as Python ints, read once per batch: on a GPU each read waits for the device."""
    if _last_bounds[0] is not cu_seq_lens:
        _last_bounds[:] = [cu_seq_lens, cu_seq_lens.tolist()]
    return _last_bounds[1]


def packed_sdpa_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                          cu_seq_lens_q: torch.Tensor | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers attention-interface function: query [batch, heads, q, dim], key/value
    [batch, kv_heads, prefix + q, dim]; returns ([batch, q, heads, dim], None)."""
    for name in _VARLEN_KEYS[1:]:
        kwargs.pop(name, None)
    if attention_mask is not None:
        return _sdpa(module, query, key, value, attention_mask, dropout, scaling, None, **kwargs), None
    q_len = query.shape[2]
    prefix_len = key.shape[2] - q_len
    if cu_seq_lens_q is None:
        bounds = [0, q_len]
    else:
        if query.shape[0] != 1:
            raise ValueError(f"cu_seq_lens_q describes one padding-free row; the batch has {query.shape[0]} rows")
        bounds = _record_bounds(cu_seq_lens_q)
        if bounds[0] != 0 or bounds[-1] != q_len:
            raise ValueError(f"cu_seq_lens_q {bounds} does not cover the {q_len} tokens of the row")
    prefix = (key[:, :, :prefix_len], value[:, :, :prefix_len])
    outputs = []
    for start, end in zip(bounds, bounds[1:]):
        own = slice(prefix_len + start, prefix_len + end)
        record_key, record_value = key[:, :, own], value[:, :, own]
        if prefix_len:
            record_key = torch.cat([prefix[0], record_key], dim=2)
            record_value = torch.cat([prefix[1], record_value], dim=2)
        outputs.append(_record_attention(module, query[:, :, start:end], record_key, record_value, prefix_len,
                                         dropout, scaling, **kwargs))
    return (outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)), None


def packed_sdpa_mask(*args, attention_mask=None, **kwargs):
    """Mask-interface function: no mask at all for unpadded rows (the attention function knows the
    records), and transformers' sdpa mask wherever there is padding to hide."""
    from transformers.masking_utils import sdpa_mask

    if attention_mask is None:
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def use_packed_sdpa() -> str:
    """Registers `packed_sdpa` with transformers (idempotent); returns the name to load models with."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(PACKED_SDPA, packed_sdpa_attention)
    AttentionMaskInterface.register(PACKED_SDPA, packed_sdpa_mask)
    return PACKED_SDPA


def packing_attention(requested: str | None) -> str:
    """The attention implementation packed training runs with: flash_attention_2 when asked for
    (its variable-length kernel reads cu_seq_lens itself), packed_sdpa otherwise."""
    return requested if requested == "flash_attention_2" else use_packed_sdpa()


__all__ = ["PACKED_SDPA", "packed_sdpa_attention", "packed_sdpa_mask", "use_packed_sdpa", "packing_attention"]
