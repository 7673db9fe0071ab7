"""The simulated step: by depth equals the full simulation; quantized bases; DeepSpeed's model."""

import pytest
import torch

from chatglm3_finetune.plan.simulate import simulate, simulate_by_depth
from plan_cases import make_spec


@pytest.mark.parametrize("changes", [
    dict(method="ptuning"), dict(method="full", grad_accum=2),
    pytest.param(dict(method="ptuning", checkpointing=False, batch=2), marks=pytest.mark.slow),
    pytest.param(dict(method="lora"), marks=pytest.mark.slow),
    pytest.param(dict(method="ptuning", packing=True), marks=pytest.mark.slow),
])
def test_simulating_two_shallow_depths_gives_the_full_simulation(changes):
    spec = make_spec("tiny", **changes).replace(config=_deeper(make_spec("tiny").config, 6))
    full, by_depth = simulate(spec), simulate_by_depth(spec)
    assert by_depth.peak.total == full.peak.total
    assert by_depth.peak.parts == full.peak.parts
    assert by_depth.activation_peak.total == full.activation_peak.total
    assert (by_depth.trainable_params, by_depth.total_params) == (full.trainable_params, full.total_params)


def _deeper(config, layers):
    import copy

    config = copy.deepcopy(config)
    config.num_hidden_layers = layers
    return config


# The tiny model's linear layers (out, in) per decoder layer: q, k, v, o, gate_up, down; two layers.
LINEARS = [(64, 64), (32, 64), (32, 64), (64, 64), (256, 64), (64, 128)] * 2
EMBEDDINGS = 2 * 1024 * 64  # input and output embeddings (never quantized)
NORMS_AND_BIASES = (2 * 2 + 1) * 64 + 2 * (64 + 32 + 32)  # elements: RMSNorm weights, q/k/v biases


def _quantized_bytes(bits: int) -> int:
    from chatglm3_finetune.plan.quantized import quantized_layout

    return sum(torch.Size(shape).numel() * torch.tensor([], dtype=dtype).element_size()
               for out, inp in LINEARS for shape, dtype in quantized_layout(out, inp, bits).values())


@pytest.mark.parametrize("bits", [8, 4])
def test_a_quantized_base_holds_bitsandbytes_bytes(bits):
    ptuning = simulate(make_spec("tiny", method="ptuning", weights_dtype=torch.bfloat16, quantization_bit=bits), round_to=1)
    assert ptuning.peak.parts["weights"] == _quantized_bytes(bits) + 2 * (EMBEDDINGS + NORMS_AND_BIASES)
    # LoRA prepares the k-bit model as peft does: what is not quantized is widened to fp32
    lora = simulate(make_spec("tiny", method="lora", weights_dtype=torch.bfloat16, quantization_bit=bits), round_to=1)
    assert lora.peak.parts["weights"] == _quantized_bytes(bits) + 4 * (EMBEDDINGS + NORMS_AND_BIASES)
    assert _quantized_bytes(8) == sum(o * i for o, i in LINEARS) + 4 * sum(o for o, _ in LINEARS)


def test_ptuning_on_a_4_bit_base_counts_the_dequantized_weight():
    spec = make_spec("tiny", method="ptuning", weights_dtype=torch.bfloat16, quantization_bit=4)
    result = simulate(spec)
    assert result.peak.total > result.peak.parts["weights"]
    assert result.trainable_params == 8 * 2 * 2 * 2 * 16  # pre_seq_len x layers x (k, v) x kv heads x head dim


def test_deepspeed_runs_the_model_in_its_16_bit_dtype():
    import json

    from conftest import ROOT

    zero2 = json.loads((ROOT / "configs" / "ds_zero2.json").read_text())
    fp32 = simulate(make_spec("tiny", method="full"), round_to=1)
    sixteen = simulate(make_spec("tiny", method="full", deepspeed=zero2, mixed_precision="bf16"), round_to=1)
    assert sixteen.peak.parts["trainable"] == fp32.peak.parts["trainable"] // 2
    assert sixteen.peak.parts["optimizer_states"] == 0  # DeepSpeed's own (deepspeed_rules.py)
