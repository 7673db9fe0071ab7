"""The model a run trains, built as finetune.py builds it (same classes, same wrapping, same
switches), with no memory behind its weights: on the meta device, then as FakeTensors.

`build_model(spec, fake_mode)` mirrors `model.loading.load_for_training` (base in its dtype,
quantized linear layers, P-Tuning v2 prefix or peft LoRA), finetune.py (`use_supervised_loss`,
`packing_attention`) and the HF Trainer (gradient checkpointing enabled as it enables it).
`build_real_model` builds the same thing with real random weights, for measuring the plan.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import torch

from .deepspeed_rules import zero_dtype
from .fake_tensors import on_meta, to_fake
from .quantized import quantize_linear_layers
from .spec import RunSpec


def _model_args(spec: RunSpec) -> SimpleNamespace:
    return SimpleNamespace(pre_seq_len=spec.pre_seq_len, prefix_projection=spec.prefix_projection,
                           prefix_hidden_size=spec.prefix_hidden_size, prefix_dropout=spec.prefix_dropout,
                           ptuning_checkpoint=None, lora_rank=spec.lora_rank, lora_alpha=spec.lora_alpha,
                           lora_dropout=spec.lora_dropout, lora_target=spec.lora_target)


def compute_dtype(spec: RunSpec) -> torch.dtype:
    """bitsandbytes' compute dtype as `load_base_model` sets it: the model dtype, bf16 for fp32."""
    return spec.weights_dtype if spec.weights_dtype != torch.float32 else torch.bfloat16


def _assemble(spec: RunSpec, num_layers: int | None = None) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    from ..model.loading import add_lora
    from ..model.packed_attention import packing_attention
    from ..model.ptuning.prefix_model import PrefixTuningModel

    config = copy.deepcopy(spec.config)
    if num_layers is not None:
        config.num_hidden_layers = num_layers
    attention = packing_attention(spec.attn_implementation) if spec.packing else spec.attn_implementation
    kwargs = {"dtype": spec.weights_dtype}
    if attention:
        kwargs["attn_implementation"] = attention
    base = AutoModelForCausalLM.from_config(config, **kwargs)
    if spec.quantization_bit:
        quantize_linear_layers(base, spec.quantization_bit, compute_dtype(spec))
    if spec.method == "ptuning":
        model = PrefixTuningModel(base, spec.pre_seq_len, spec.prefix_projection, spec.prefix_hidden_size,
                                  spec.prefix_dropout, base_model_name_or_path=spec.model_path)
    elif spec.method == "lora":
        model = add_lora(base, _model_args(spec), spec.gradient_checkpointing, {"use_reentrant": False})
    else:
        model = base
    if spec.deepspeed:  # DeepSpeed's engine converts the whole module (a prefix or adapters too)
        model = model.to(zero_dtype(spec.deepspeed, spec.mixed_precision))
    return model


def prepare_for_training(model: torch.nn.Module, spec: RunSpec) -> torch.nn.Module:
    """What finetune.py and the Trainer do to the loaded model before the first step."""
    from ..train.loss_switch import use_supervised_loss

    if spec.loss_on_targets_only:
        use_supervised_loss(model, chunk_size=spec.loss_chunk_size)
    if spec.gradient_checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


def build_model(spec: RunSpec, fake_mode, num_layers: int | None = None) -> torch.nn.Module:
    """The run's model with FakeTensor weights (no memory), ready for a training step.
    `num_layers`: build that many decoder layers instead of the config's."""
    with on_meta():
        model = _assemble(spec, num_layers)
    return prepare_for_training(to_fake(model, fake_mode), spec)


def build_real_model(spec: RunSpec, seed: int = 0) -> torch.nn.Module:
    """The same model with random real weights on the CPU (not for quantized bases)."""
    if spec.quantization_bit:
        raise ValueError("a real quantized model needs bitsandbytes' kernels: measure quantized runs on a GPU")
    torch.manual_seed(seed)
    return prepare_for_training(_assemble(spec), spec)


__all__ = ["build_model", "build_real_model", "prepare_for_training", "compute_dtype"]
