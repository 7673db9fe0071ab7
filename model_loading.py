"""Loading models for training, inference and serving: a native transformers causal LM (what
a converted ChatGLM3 checkpoint is), optionally quantized, plus a P-Tuning v2 prefix or a LoRA
adapter. finetune.py, inference.py and api_server.py all load through here.
"""

from __future__ import annotations

import logging
import os

import torch

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ModelLoadError(RuntimeError):
    """A model that cannot be loaded as asked, with what to do about it."""


def resolve_dtype(name: str | None, frozen_base: bool, use_cpu: bool = False) -> torch.dtype:
    """`auto`: a frozen base (P-Tuning, LoRA) in half precision on a GPU (bf16 where supported,
    else fp16); trained weights and anything on the CPU in fp32."""
    if name and name != "auto":
        return DTYPES[name]
    if frozen_base and torch.cuda.is_available() and not use_cpu:
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def quantization_config(bits: int | None, compute_dtype: torch.dtype):
    if not bits:
        return None
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError as e:
        raise ModelLoadError(f"--quantization_bit {bits} needs bitsandbytes ({e}); pip install bitsandbytes") from None
    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    if bits == 4:
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype)
    raise ModelLoadError(f"--quantization_bit must be 4 or 8, got {bits}")


def load_base_model(path: str, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False,
                    quantization_bit: int | None = None, attn_implementation: str | None = None,
                    device_map=None):
    """A causal LM from a local folder through AutoModelForCausalLM (no remote code unless asked)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if not os.path.isdir(path):
        raise ModelLoadError(f"{path}: no such model folder")
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except ValueError as e:
        if "chatglm" in str(e).lower() or _is_original_chatglm(path):
            raise ModelLoadError(
                f"{path} is an original ChatGLM3 checkpoint (remote code). Convert it once with "
                f"`python scripts/convert_chatglm3.py --input {path} --output <new folder>` and train on the "
                f"converted folder, or pass --trust_remote_code if you have working remote code") from None
        raise ModelLoadError(f"{path}: {e}") from None
    kwargs = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    quant = quantization_config(quantization_bit, dtype if dtype != torch.float32 else torch.bfloat16)
    if quant is not None:
        kwargs["quantization_config"] = quant
        kwargs["device_map"] = device_map or ("auto" if torch.cuda.is_available() else "cpu")
    elif device_map is not None:
        kwargs["device_map"] = device_map
    try:
        model = AutoModelForCausalLM.from_pretrained(path, config=config, **kwargs)
    except (ImportError, RuntimeError, ValueError) as e:
        if quant is not None:
            raise ModelLoadError(f"{quantization_bit}-bit loading failed on this machine: {e}. Drop "
                                 f"--quantization_bit, or install a bitsandbytes build for this hardware") from None
        raise
    logger.info("Loaded %s (%s, %.1fM parameters, %s)", path, type(model).__name__,
                sum(p.numel() for p in model.parameters()) / 1e6, dtype)
    return model


def _is_original_chatglm(path: str) -> bool:
    import json

    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        return False
    with open(config_file) as f:
        return json.load(f).get("model_type") == "chatglm"


def add_prefix_tuning(model, model_args, base_path: str):
    """Wraps a frozen base with a P-Tuning v2 prefix: new, or continued from --ptuning_checkpoint."""
    from prefix_tuning import PrefixTuningModel

    if model_args.ptuning_checkpoint:
        logger.info("Continuing P-Tuning v2 from %s", model_args.ptuning_checkpoint)
        return PrefixTuningModel.from_pretrained(model, model_args.ptuning_checkpoint, model_args.pre_seq_len,
                                                 trainable=True, prefix_dropout=model_args.prefix_dropout)
    return PrefixTuningModel(model, model_args.pre_seq_len, model_args.prefix_projection,
                             model_args.prefix_hidden_size, model_args.prefix_dropout, base_model_name_or_path=base_path)


def add_lora(model, model_args, gradient_checkpointing: bool = False):
    """Wraps the base with peft LoRA adapters on --lora_target modules (k-bit bases prepared first)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if model_args.quantization_bit:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    targets = model_args.lora_target.strip()
    config = LoraConfig(
        r=model_args.lora_rank, lora_alpha=model_args.lora_alpha, lora_dropout=model_args.lora_dropout,
        target_modules=targets if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()],
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info("LoRA r=%d on %s: %d trainable parameters", model_args.lora_rank, targets, trainable)
    return model


def load_for_training(model_args, training_args):
    """The model finetune.py trains: full, P-Tuning v2 (prefix) or LoRA (adapters)."""
    method = model_args.tuning_method
    dtype = resolve_dtype(model_args.torch_dtype, frozen_base=method != "full", use_cpu=training_args.use_cpu)
    model = load_base_model(model_args.model_name_or_path, dtype, model_args.trust_remote_code,
                            model_args.quantization_bit, model_args.attn_implementation)
    if method == "ptuning":
        return add_prefix_tuning(model, model_args, model_args.model_name_or_path)
    if method == "lora":
        return add_lora(model, model_args, training_args.gradient_checkpointing)
    return model
