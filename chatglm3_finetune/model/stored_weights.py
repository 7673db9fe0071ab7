"""A model folder's safetensors weights: the dtype they are stored in, and casting a loaded model to
another dtype one tensor at a time.

transformers loads safetensors through a memory map. When the stored dtype is the one asked for, the
parameters are views of the mapped files, read only as they are used: no copy. When it is not, every
tensor is read through the map and cast, and the pages read stay resident until the last tensor is
done: the process holds the stored copy and the cast copy together (a float16 ChatGLM3-6B loaded in
bfloat16 passes 24 GB). `load_base_model` instead loads in the stored dtype (mapped, unread) and then
casts here, reading each tensor from its file on its own, not through the map: the peak is the model
in the asked dtype plus one tensor.
"""

from __future__ import annotations

import json
import os

import torch
from safetensors import safe_open

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_FILE = "model.safetensors"
STORED_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}


def safetensors_files(folder: str) -> list[str]:
    """The folder's safetensors weight files (those its index names, or model.safetensors); [] for none."""
    index = os.path.join(folder, SAFETENSORS_INDEX)
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(folder, name) for name in names]
    single = os.path.join(folder, SAFETENSORS_FILE)
    return [single] if os.path.isfile(single) else []


def stored_dtype(folder: str) -> torch.dtype | None:
    """The one floating-point dtype the folder's safetensors weights are stored in; None when they are
    not safetensors, are missing, or mix floating-point dtypes. Reads only the file headers."""
    found = set()
    try:
        for path in safetensors_files(folder):
            with safe_open(path, framework="pt") as f:
                found |= {f.get_slice(name).get_dtype() for name in f.keys()}
    except (OSError, ValueError, KeyError):
        return None  # a damaged folder: loading it the usual way reports what is wrong
    floating = {STORED_DTYPES[name] for name in found if name in STORED_DTYPES}
    return floating.pop() if len(floating) == 1 else None


def _open_unmapped(path: str):
    """The file opened so that each tensor is read on its own (pread), not through a memory map;
    safetensors releases without the `backend` option fall back to a map of this one file."""
    try:
        return safe_open(path, framework="pt", backend="pread")
    except TypeError:
        return safe_open(path, framework="pt")


def cast_from_files(model: torch.nn.Module, folder: str, loaded: torch.dtype, dtype: torch.dtype) -> int:
    """Casts the model's parameters that were loaded in `loaded` (the stored dtype) to `dtype`, reading
    each tensor from the folder's files anew (the model's own, memory-mapped copy is never read);
    returns how many it cast. Parameters the model keeps in another dtype stay as they are; those not
    found in the files (none, for a complete checkpoint) are cast from memory."""
    parameters = {name: p for name, p in model.named_parameters() if p.dtype == loaded and loaded != dtype}
    cast = 0
    for path in safetensors_files(folder):
        with _open_unmapped(path) as f:
            for name in f.keys():
                parameter = parameters.pop(name, None)
                if parameter is None:
                    continue
                stored = f.get_tensor(name)
                if stored.shape != parameter.shape:  # reshaped on loading: cast what was loaded
                    stored = parameter.data
                parameter.data = stored.to(dtype)
                cast += 1
    for parameter in parameters.values():
        parameter.data = parameter.data.to(dtype)
        cast += 1
    if hasattr(model, "config"):
        model.config.dtype = dtype
    return cast


__all__ = ["cast_from_files", "safetensors_files", "stored_dtype"]
