"""8- and 4-bit bases in the plan: bitsandbytes' storage, counted analytically.

Fake tensors cannot run bitsandbytes' kernels, so the linear layers that `--quantization_bit`
would quantize (every nn.Linear but the output layer, as transformers' bitsandbytes integration
chooses) are replaced by `QuantizedLinearStandIn`: a linear layer that holds exactly the bytes
bitsandbytes stores (8-bit: int8 weight + an fp32 scale per output row; 4-bit NF4 with double
quantization: two weights per byte + one 8-bit absmax per 64 weights + one fp32 absmax per 256
blocks + the two code tables) and whose forward and backward each dequantize the weight to the
compute dtype, as bitsandbytes' matmuls do. Everything around it (LoRA, the prefix, activations,
the loss) is simulated as usual; the plan says that these layers were counted this way.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

BLOCKSIZE_4BIT = 64      # bitsandbytes' default for NF4
BLOCKSIZE_ABSMAX = 256   # double quantization quantizes the absmax values in blocks of 256
CODE_ENTRIES_4BIT = 16
CODE_ENTRIES_8BIT = 256


def quantized_layout(out_features: int, in_features: int, bits: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """name -> (shape, dtype) of what bitsandbytes stores for one quantized linear weight."""
    numel = out_features * in_features
    if bits == 8:
        return {"weight": ((out_features, in_features), torch.int8), "SCB": ((out_features,), torch.float32)}
    if bits == 4:
        blocks = -(-numel // BLOCKSIZE_4BIT)
        return {"weight": (((numel + 1) // 2, 1), torch.uint8),
                "absmax": ((blocks,), torch.uint8),
                "absmax_absmax": ((-(-blocks // BLOCKSIZE_ABSMAX),), torch.float32),
                "absmax_code": ((CODE_ENTRIES_8BIT,), torch.float32),
                "code": ((CODE_ENTRIES_4BIT,), torch.float32)}
    raise ValueError(f"quantization bits must be 4 or 8, got {bits}")


class _DequantizingLinear(torch.autograd.Function):
    """y = x W^T + b with W dequantized to the compute dtype in the forward and again in the backward."""

    @staticmethod
    def forward(ctx, x, out_features, in_features, bias):
        ctx.shape = (out_features, in_features)
        weight = x.new_empty(ctx.shape)  # the dequantized weight, freed when the matmul is done
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_output):
        weight = grad_output.new_empty(ctx.shape)
        return grad_output @ weight, None, None, None


class QuantizedLinearStandIn(nn.Linear):
    """An nn.Linear (so LoRA and `all-linear` find it) with bitsandbytes' quantized storage."""

    def __init__(self, linear: nn.Linear, bits: int, compute_dtype: torch.dtype):
        nn.Module.__init__(self)
        self.in_features, self.out_features, self.bits = linear.in_features, linear.out_features, bits
        self.compute_dtype = compute_dtype
        layout = quantized_layout(linear.out_features, linear.in_features, bits)
        shape, dtype = layout.pop("weight")
        self.weight = nn.Parameter(torch.empty(shape, dtype=dtype, device=linear.weight.device), requires_grad=False)
        for name, (shape, dtype) in layout.items():
            self.register_buffer(name, torch.empty(shape, dtype=dtype, device=linear.weight.device))
        self.bias = linear.bias
        if self.bias is not None:
            self.bias.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Computes in the compute dtype and returns the input's dtype, as bitsandbytes' layers do."""
        bias = self.bias.to(self.compute_dtype) if self.bias is not None else None
        out = _DequantizingLinear.apply(x.to(self.compute_dtype), self.out_features, self.in_features, bias)
        return out.to(x.dtype)


def quantize_linear_layers(model: nn.Module, bits: int, compute_dtype: torch.dtype) -> int:
    """Replaces every nn.Linear but the output layer by a stand-in; marks the model as loaded in
    `bits` bits (what LoRA's k-bit preparation looks for). Returns how many layers were replaced."""
    output_layer = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and child is not output_layer:
                setattr(parent, name, QuantizedLinearStandIn(child, bits, compute_dtype))
                replaced += 1
    setattr(model, f"is_loaded_in_{bits}bit", True)
    return replaced


__all__ = ["QuantizedLinearStandIn", "quantize_linear_layers", "quantized_layout"]
