"""Running the project's own model code on tensors that have shapes but no memory.

- `on_meta()`: build a model (and wrap it with P-Tuning or LoRA) on the meta device: every tensor
  created or moved while it is active stays there, so a 6B model costs nothing to build.
- `to_fake(module, fake_mode)`: its parameters and buffers become FakeTensors "on the CPU", which
  operators accept (meta tensors would not mix with the real index tensors below).
- `RealIndexTensors`: under FakeTensorMode, integer and boolean tensors (token ids, labels, masks,
  positions, packed-row boundaries) stay real. The code decides things from their values (how many
  positions are targets, where a packed record starts), which fake tensors cannot answer; they are
  small. Floating-point tensors (weights, activations, logits) are fake.
"""

from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily
from torch.overrides import TorchFunctionMode
from torch.utils._device import _device_constructors
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

META = torch.device("meta")
FAKE_DEVICE = torch.device("cpu")


class _OnMeta(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in _device_constructors():
            kwargs["device"] = META
        elif func is torch.Tensor.to:
            _, dtype, _, _ = torch._C._nn._parse_to(*args[1:], **kwargs)
            return func(args[0], device=META, dtype=dtype if dtype is not None else args[0].dtype)
        elif func in (torch.Tensor.cuda, torch.Tensor.cpu):
            return args[0]
        return func(*args, **kwargs)


def on_meta() -> TorchFunctionMode:
    """A context in which every tensor created, or moved with .to/.cuda/.cpu, lands on the meta device."""
    return _OnMeta()


def to_fake(module: torch.nn.Module, fake_mode: FakeTensorMode) -> torch.nn.Module:
    """Replaces the meta parameters and buffers of `module` by FakeTensors on the CPU, in place (a
    parameter shared by two modules stays shared)."""
    converter = fake_mode.fake_tensor_converter
    done: dict[int, torch.Tensor] = {}

    def fake(tensor: torch.Tensor) -> torch.Tensor:
        if id(tensor) not in done:
            converted = converter.from_meta_and_device(fake_mode, tensor, FAKE_DEVICE)
            if isinstance(tensor, torch.nn.Parameter):
                converted = torch.nn.Parameter(converted, requires_grad=tensor.requires_grad)
            done[id(tensor)] = converted
        return done[id(tensor)]

    for submodule in module.modules():
        for name, param in list(submodule._parameters.items()):
            if param is not None and param.is_meta:
                submodule._parameters[name] = fake(param)
        for name, buffer in list(submodule._buffers.items()):
            if buffer is not None and buffer.is_meta:
                submodule._buffers[name] = fake(buffer)
    return module


def _factory_dtype(func, args, kwargs) -> torch.dtype:
    """The dtype a factory operator (no tensor inputs) will produce."""
    if kwargs.get("dtype") is not None:
        return kwargs["dtype"]
    name = func.overloadpacket.__name__
    numbers = [a for a in args if isinstance(a, (bool, int, float))]
    if name.startswith("arange") or name in ("randint", "randperm"):
        return torch.int64 if all(isinstance(a, int) for a in numbers) else torch.get_default_dtype()
    if name.startswith("full") and numbers:
        value = numbers[-1]
        return torch.bool if isinstance(value, bool) else torch.int64 if isinstance(value, int) else torch.get_default_dtype()
    return torch.get_default_dtype()


_INDEX_OPS = {torch.ops.aten.index.Tensor, torch.ops.aten.index_put.default, torch.ops.aten.index_put_.default,
              torch.ops.aten._unsafe_index.Tensor}


class RealIndexTensors(TorchDispatchMode):
    """Sits above FakeTensorMode: an operator with no fake input that works on real tensors, or a
    factory of integers or booleans, runs for real; a real boolean mask indexing a fake tensor is
    turned into the real positions it selects (so the result's shape is known)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
        has_fake = any(isinstance(t, FakeTensor) for t in tensors)
        if not has_fake and (tensors or not _factory_dtype(func, args, kwargs).is_floating_point):
            with unset_fake_temporarily():
                return func(*args, **kwargs)
        if func in _INDEX_OPS:
            args = (args[0], _positions_of_masks(args[1]), *args[2:])
        return func(*args, **kwargs)


def _positions_of_masks(indices):
    resolved = []
    for index in indices:
        if isinstance(index, torch.Tensor) and not isinstance(index, FakeTensor) and index.dtype == torch.bool:
            with unset_fake_temporarily():
                resolved.extend(index.nonzero().unbind(1))
        else:
            resolved.append(index)
    return resolved


def fake_mode() -> FakeTensorMode:
    return FakeTensorMode(allow_non_fake_inputs=True)


__all__ = ["on_meta", "to_fake", "RealIndexTensors", "fake_mode", "FAKE_DEVICE"]
