"""Attention over packed rows at the cost of their records alone: `packed_sdpa`, causal sdpa per record.

A padding-free batch (`PackedCollator()`: every record in one row, positions
restarting at 0, `cu_seq_lens_q` marking where each record starts) reaches this attention function
through transformers' attention interface. Each record's queries attend, with sdpa's causal
kernel, to its own keys only (records of similar length share one call, right-padded to the
longest of them): no (row length)^2 mask is built and no block of another record is computed, on
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


# Records of similar length are attended together, right-padded to the longest of their group: with
# a causal mask a real query never reaches the padding after it, and one sdpa call per group beats
# one per record (short records leave a kernel call mostly overhead). A group grows while its
# padded size stays within MAX_GROUP_WASTE of its real tokens.
MAX_GROUP_WASTE = 1.25


class _Groups:
    """How a padding-free row's records are gathered into padded groups, and put back in order."""

    def __init__(self, bounds: list[int], device: torch.device):
        lengths = [end - start for start, end in zip(bounds, bounds[1:])]
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        self.groups = []  # (gather index [count * width], real-position mask [count * width], count, width)
        placed = []
        i = 0
        while i < len(order):
            width, members = lengths[order[i]], [order[i]]
            while (i + len(members) < len(order) and (len(members) + 1) * width
                   <= MAX_GROUP_WASTE * (sum(lengths[m] for m in members) + lengths[order[i + len(members)]])):
                members.append(order[i + len(members)])
            gather, real = [], []
            for m in members:
                gather += list(range(bounds[m], bounds[m + 1])) + [bounds[m]] * (width - lengths[m])
                real += [True] * lengths[m] + [False] * (width - lengths[m])
                placed += range(bounds[m], bounds[m + 1])
            self.groups.append((torch.tensor(gather, device=device), torch.tensor(real, device=device),
                                len(members), width))
            i += len(members)
        inverse = torch.empty(len(placed), dtype=torch.long)
        inverse[torch.tensor(placed)] = torch.arange(len(placed))
        self.restore = inverse.to(device)  # packed position -> index in the groups' concatenated output


_last_groups: list = [None, None]  # (cu_seq_lens tensor, its _Groups): every layer reads the same one


def _groups_for(cu_seq_lens: torch.Tensor, q_len: int) -> _Groups:
    """The grouping of a batch, computed once: on a GPU reading cu_seq_lens waits for the device."""
    if _last_groups[0] is not cu_seq_lens:
        bounds = cu_seq_lens.tolist()
        if bounds[0] != 0 or bounds[-1] != q_len:
            raise ValueError(f"cu_seq_lens_q {bounds} does not cover the {q_len} tokens of the row")
        _last_groups[:] = [cu_seq_lens, _Groups(bounds, cu_seq_lens.device)]
    return _last_groups[1]


def _group_attention(module, query, key, value, prefix, width: int, dropout: float, scaling, **kwargs):
    """Causal attention of right-padded records [count, heads, width, dim] over the prefix and themselves."""
    if prefix is None:
        return _sdpa(module, query, key, value, None, dropout, scaling, True, **kwargs)
    prefix_len = prefix[0].shape[2]
    count = query.shape[0]
    key = torch.cat([prefix[0].expand(count, -1, -1, -1), key], dim=2)
    value = torch.cat([prefix[1].expand(count, -1, -1, -1), value], dim=2)
    # The prefix columns, then the causal triangle: sdpa's own is_causal aligns top-left, which is wrong here.
    allowed = torch.ones(width, prefix_len + width, dtype=torch.bool, device=query.device)
    allowed[:, prefix_len:] = torch.ones(width, width, dtype=torch.bool, device=query.device).tril()
    return _sdpa(module, query, key, value, allowed[None, None], dropout, scaling, False, **kwargs)


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
    prefix = (key[:, :, :prefix_len], value[:, :, :prefix_len]) if prefix_len else None
    if cu_seq_lens_q is None:  # one sequence per row
        return _group_attention(module, query, key[:, :, prefix_len:], value[:, :, prefix_len:], prefix, q_len,
                                dropout, scaling, **kwargs), None
    if query.shape[0] != 1:
        raise ValueError(f"cu_seq_lens_q describes one padding-free row; the batch has {query.shape[0]} rows")
    groups = _groups_for(cu_seq_lens_q, q_len)
    key, value = key[0, :, prefix_len:], value[0, :, prefix_len:]
    outputs = []
    for gather, real, count, width in groups.groups:
        def padded(states):  # [heads, q, dim] -> [count, heads, width, dim]
            return states.index_select(1, gather).unflatten(1, (count, width)).transpose(0, 1)

        out = _group_attention(module, padded(query[0]), padded(key), padded(value), prefix, width, dropout,
                               scaling, **kwargs)  # [count, width, heads, dim]
        outputs.append(out.flatten(0, 1)[real])
    output = outputs[0] if len(outputs) == 1 else torch.cat(outputs)
    return output.index_select(0, groups.restore).unsqueeze(0), None


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
