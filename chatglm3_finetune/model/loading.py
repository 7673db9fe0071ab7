"""Loading models for training, inference and serving: a native transformers causal LM (what
a converted ChatGLM3 checkpoint is), optionally quantized, plus a P-Tuning v2 prefix or a LoRA
adapter. finetune.py, inference.py and api_server.py all load through here.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings

import torch

from .checkpoint_folders import is_original_chatglm
from .stored_weights import cast_from_files, stored_dtype
from ..compat import unpack_4bit_for_training

logger = logging.getLogger(__name__)
# bitsandbytes (imported by peft) warns at import, on every CPU run, about an optional kernel download.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}  # what users may name


class ModelLoadError(RuntimeError):
    """A model that cannot be loaded as asked, with what to do about it."""


def resolve_dtype(name: str | None, frozen_base: bool, use_cpu: bool = False,
                  deepspeed_dtype: torch.dtype | None = None) -> torch.dtype:
    """`auto`: a frozen base (P-Tuning, LoRA) in half precision on a GPU (bf16 where supported,
    else fp16); trained weights in `deepspeed_dtype` when DeepSpeed trains them in half precision (its
    engine casts them to it anyway, and ZeRO keeps the fp32 master copy in the optimizer's partitions);
    otherwise trained weights, and anything on the CPU, in fp32."""
    if name and name != "auto":
        return DTYPES[name]
    if frozen_base and torch.cuda.is_available() and not use_cpu:
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if not frozen_base and deepspeed_dtype is not None:
        return deepspeed_dtype
    return torch.float32


def deepspeed_dtype(training_args) -> torch.dtype | None:
    """bf16 or fp16 when --deepspeed trains in that precision (its config, "auto" values filled from
    --bf16/--fp16), else None."""
    config = getattr(training_args, "hf_deepspeed_config", None) if training_args.deepspeed else None
    if config is None:
        return None
    if config.is_true("bf16.enabled") or config.is_true("bfloat16.enabled"):
        return torch.bfloat16
    if config.is_true("fp16.enabled"):
        return torch.float16
    return None


def quantization_config(bits: int | None, compute_dtype: torch.dtype, quant_storage: torch.dtype | None = None):
    """A bitsandbytes config for an 8-bit or 4-bit (NF4, double-quantized) frozen base, or None.
    `quant_storage` packs 4-bit weights in that dtype (what DeepSpeed ZeRO-3 needs to shard them)."""
    if not bits:
        return None
    if bits not in (4, 8):
        raise ModelLoadError(f"--quantization_bit must be 4 or 8, got {bits}")
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError as e:
        raise ModelLoadError(f"--quantization_bit {bits} needs bitsandbytes ({e}): pip install bitsandbytes, "
                             f"or drop --quantization_bit") from None
    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    extra = {"bnb_4bit_quant_storage": quant_storage} if quant_storage is not None else {}
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype, **extra)


def default_device_map(use_cpu: bool = False, training: bool = False):
    """Where a quantized model goes (bitsandbytes places weights while loading): the CPU without a GPU;
    for training, this process's own GPU (one whole copy per data-parallel rank); else spread by accelerate."""
    if use_cpu or not torch.cuda.is_available():
        return "cpu"
    if training:
        return {"": int(os.environ.get("LOCAL_RANK", 0))}
    return "auto"


def load_base_model(path: str, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False,
                    quantization_bit: int | None = None, attn_implementation: str | None = None,
                    device_map=None, remote_code_flag: str = "--trust_remote_code"):
    """A causal LM from a local folder through AutoModelForCausalLM (no remote code unless asked).
    With `quantization_bit` the linear layers are loaded in 8 or 4 bits (frozen; compute in `dtype`,
    bf16 when that is fp32). `remote_code_flag`: how the caller spells its trust-remote-code flag."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.integrations import is_deepspeed_zero3_enabled

    if not os.path.isdir(path):
        raise ModelLoadError(f"{path}: missing (no such folder)")
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except ValueError as e:
        if "chatglm" in str(e).lower() or is_original_chatglm(path):
            raise ModelLoadError(
                f"{path} is an original ChatGLM3 checkpoint (remote code). Convert it once with "
                f"`python scripts/convert_chatglm3.py --input {path} --output <new folder>` and train on the "
                f"converted folder, or pass {remote_code_flag} if you have working remote code") from None
        raise ModelLoadError(f"{path}: {e}") from None
    kwargs = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    compute_dtype = dtype if dtype != torch.float32 else torch.bfloat16
    sharded = quantization_bit and is_deepspeed_zero3_enabled()
    quant = quantization_config(quantization_bit, compute_dtype, quant_storage=compute_dtype if sharded else None)
    if quant is not None:
        kwargs["quantization_config"] = quant
        if not sharded:  # ZeRO-3 places (and shards) the weights itself and refuses a device_map
            kwargs["device_map"] = device_map or default_device_map()
    elif device_map is not None:
        kwargs["device_map"] = device_map
    stored = stored_dtype(path) if quant is None and device_map in (None, "cpu") else None
    cast = stored is not None and stored != dtype and not is_deepspeed_zero3_enabled()
    if cast:  # load the stored dtype, memory-mapped, then cast one tensor at a time (stored_weights)
        kwargs["dtype"] = stored
    try:
        model = AutoModelForCausalLM.from_pretrained(path, config=config, **kwargs)
    except (ImportError, RuntimeError, ValueError) as e:
        if quant is not None:
            raise ModelLoadError(f"{quantization_bit}-bit loading failed on this machine: {e}. Drop "
                                 f"--quantization_bit, or install a bitsandbytes build for this hardware") from None
        if isinstance(e, ImportError) and attn_implementation:
            raise ModelLoadError(f"--attn_implementation {attn_implementation} cannot run on this machine: {e} "
                                 f"Use --attn_implementation sdpa (the default)") from None
        raise
    if cast:
        cast_from_files(model, path, stored, dtype)
    partitioned = any(hasattr(p, "ds_id") for p in model.parameters())
    logger.info("Loaded %s (%s, %.1fM parameters, %s%s%s)", path, type(model).__name__,
                sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters()) / 1e6, dtype,
                f", linear layers in {quantization_bit} bits" if quant is not None else "",
                ", partitioned across the ranks by ZeRO-3 as it loaded" if partitioned else "")
    return model


def is_quantized(model) -> bool:
    return bool(getattr(model, "is_loaded_in_8bit", False) or getattr(model, "is_loaded_in_4bit", False))


def keep_4bit_layers_trainable(model) -> int:
    """Stops bitsandbytes from repacking 4-bit weights for its CPU inference kernel; returns how many
    layers it had already repacked (they are unpacked).

    bitsandbytes 0.50 repacks a Linear4bit's weight on CPUs with AVX512-BF16 the first time it runs
    in eval mode without gradients (an evaluation, `generate`). From then on the layer uses a kernel
    that adds the bias in place, and any backward through it fails ("a view of a leaf Variable that
    requires grad is being used in an in-place operation") - on GLM every q/k/v projection has a
    bias. Layers that keep the standard layout train, evaluate and generate correctly.
    """
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:
        return 0
    unpacked = sum(unpack_4bit_for_training(module) for module in model.modules() if isinstance(module, Linear4bit))
    if unpacked:
        logger.warning("Unpacked %d 4-bit layers that had been repacked for CPU inference", unpacked)
    return unpacked


def add_prefix_tuning(model, model_args, base_path: str):
    """Wraps a frozen base with a P-Tuning v2 prefix: new, or continued from --ptuning_checkpoint."""
    from .ptuning.prefix_model import PrefixTuningModel

    keep_4bit_layers_trainable(model)
    if model_args.ptuning_checkpoint:
        logger.info("Continuing P-Tuning v2 from %s", model_args.ptuning_checkpoint)
        # The prefix now belongs to the base trained here, whatever the checkpoint named (an original
        # checkpoint names the hub id or the folder it was made in).
        return PrefixTuningModel.from_pretrained(model, model_args.ptuning_checkpoint, model_args.pre_seq_len,
                                                 trainable=True, prefix_dropout=model_args.prefix_dropout,
                                                 base_model_name_or_path=base_path)
    return PrefixTuningModel(model, model_args.pre_seq_len, model_args.prefix_projection,
                             model_args.prefix_hidden_size, model_args.prefix_dropout,
                             base_model_name_or_path=base_path)


def lora_target_modules(lora_target: str) -> str | list[str]:
    """`all-linear` (every linear layer but the output layer) or a list of module names."""
    target = lora_target.strip()
    if target == "all-linear":
        return target
    names = [name.strip() for name in target.split(",") if name.strip()]
    if not names:
        raise ModelLoadError("--lora_target is empty: name modules (e.g. q_proj,v_proj) or use all-linear")
    return names


def linear_module_names(model) -> list[str]:
    """The distinct names of the linear layers LoRA can adapt (quantized ones included), sorted."""
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                   if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head")})


@contextlib.contextmanager
def peft_deprecations_silenced():
    """peft 0.21 calls transformers' deprecated checkpointing names (a FutureWarning on every LoRA run)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"`(gradient_checkpointing_enable|is_gradient_checkpointing)` is deprecated",
                                FutureWarning)
        yield


def add_lora(model, model_args, gradient_checkpointing: bool = False,
             gradient_checkpointing_kwargs: dict | None = None):
    """Wraps a frozen base with peft LoRA adapters on --lora_target modules (a quantized base is
    prepared for k-bit training first: norms and embeddings in fp32, inputs that carry gradients)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if model_args.lora_rank < 1:
        raise ModelLoadError(f"--lora_rank must be at least 1, got {model_args.lora_rank}")
    if not 0 <= model_args.lora_dropout < 1:
        raise ModelLoadError(f"--lora_dropout must be in [0, 1), got {model_args.lora_dropout}")
    targets = lora_target_modules(model_args.lora_target)
    if is_quantized(model):
        keep_4bit_layers_trainable(model)
        with peft_deprecations_silenced():
            model = prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=gradient_checkpointing,
                gradient_checkpointing_kwargs=gradient_checkpointing_kwargs or {"use_reentrant": False})
    config = LoraConfig(r=model_args.lora_rank, lora_alpha=model_args.lora_alpha, lora_dropout=model_args.lora_dropout,
                        target_modules=targets, task_type="CAUSAL_LM")
    try:
        with peft_deprecations_silenced():
            model = get_peft_model(model, config)
    except ValueError as e:
        if "not found in the base model" not in str(e):
            raise
        raise ModelLoadError(f"--lora_target {model_args.lora_target}: no such module in this model; its linear "
                             f"layers are {','.join(linear_module_names(model))} (or use all-linear)") from None
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info("LoRA r=%d alpha=%g on %s: %d trainable parameters", model_args.lora_rank, model_args.lora_alpha,
                targets if isinstance(targets, str) else ",".join(targets), trainable)
    return model


def load_for_training(model_args, training_args):
    """The model finetune.py trains: full, P-Tuning v2 (prefix) or LoRA (adapters)."""
    method = model_args.tuning_method
    dtype = resolve_dtype(model_args.torch_dtype, frozen_base=method != "full", use_cpu=training_args.use_cpu,
                          deepspeed_dtype=deepspeed_dtype(training_args))
    device_map = default_device_map(training_args.use_cpu, training=True) if model_args.quantization_bit else None
    model = load_base_model(model_args.model_name_or_path, dtype, model_args.trust_remote_code,
                            model_args.quantization_bit, model_args.attn_implementation, device_map=device_map)
    if method == "ptuning":
        return add_prefix_tuning(model, model_args, model_args.model_name_or_path)
    if method == "lora":
        return add_lora(model, model_args, training_args.activation_checkpointing,
                        training_args.activation_checkpointing_kwargs)
    return model
