"""Models for generation (inference.py, evaluation, the server): a base model plus a P-Tuning v2
prefix or a merged LoRA adapter, or a fully fine-tuned model, with the tokenizer that goes with it."""

from __future__ import annotations

import logging
import os

import torch

from .checkpoint_folders import LORA, PTUNING, adapter_base_model, folder_kind, is_lora_adapter
from .loading import ModelLoadError, load_base_model, peft_deprecations_silenced, resolve_dtype

logger = logging.getLogger(__name__)


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"--device {device}: no CUDA GPU is available here; use --device cpu")
    return device


def load_for_inference(model: str | None, tokenizer: str | None = None, pt_checkpoint: str | None = None,
                       pt_pre_seq_len: int | None = None, lora: str | None = None, device: str = "auto",
                       dtype: str = "auto", trust_remote_code: bool = False):
    """(model on its device, tokenizer) from folders: a base model plus a P-Tuning v2 prefix (this toolkit's format or
    the original ChatGLM3 one) or a LoRA adapter (merged), or a fully fine-tuned model.

    The tokenizer comes from `tokenizer`, else the first of the model, prefix and adapter folders
    that holds one. Without `model`, or with a prefix or adapter folder as `model`, the base model
    is the one the prefix or adapter names (its `base_model_name_or_path`).
    Raises ModelLoadError with what to do when something does not fit.
    """
    from ..format.tokenizer import load_tokenizer

    if pt_checkpoint and lora:
        raise ModelLoadError("choose one of a P-Tuning checkpoint and a LoRA adapter, not both")
    model, pt_checkpoint, lora = _resolve_adapter_given_as_model(model, pt_checkpoint, lora)
    for name, path in (("model", model), ("P-Tuning checkpoint", pt_checkpoint), ("LoRA adapter", lora),
                       ("tokenizer", tokenizer)):
        if path and not os.path.exists(path):
            raise ModelLoadError(f"{name} {path}: no such folder")
    tokenizer_dir = tokenizer or _first_tokenizer_folder([model, pt_checkpoint, lora])
    try:
        chat_tokenizer = load_tokenizer(tokenizer_dir or model)
    except FileNotFoundError:
        raise ModelLoadError(f"no tokenizer.model in {tokenizer or model}: pass --tokenizer with the base "
                             f"model's folder") from None
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, frozen_base=True, use_cpu=device == "cpu")
    base = load_base_model(model, torch_dtype, trust_remote_code, device_map=device if device != "cpu" else None,
                           remote_code_flag="--trust-remote-code")
    if pt_checkpoint:
        loaded = _with_prefix(base, pt_checkpoint, pt_pre_seq_len)
    elif lora:
        loaded = _with_lora(base, lora)
    else:
        if pt_pre_seq_len is not None:
            raise ModelLoadError("--pt-pre-seq-len needs --pt-checkpoint")
        loaded = base
    return loaded.to(device), chat_tokenizer


def _resolve_adapter_given_as_model(model: str | None, pt_checkpoint: str | None, lora: str | None):
    """No model, or `--model PREFIX_DIR` / `--model ADAPTER_DIR`: use the base the prefix or adapter names."""
    if model is None:
        source = pt_checkpoint or lora
        found = _adapter_checkpoint(source) if source and os.path.isdir(source) else None
        if found is None or not found[1] or not os.path.isdir(found[1]):
            named = f" ({source} names {found[1]!r})" if found else ""
            raise ModelLoadError(f"no base model folder{named}: pass --model BASE")
        return found[1], pt_checkpoint, lora
    found = _adapter_checkpoint(model) if os.path.isdir(model) else None
    if found is None:
        return model, pt_checkpoint, lora
    kind, base = found
    slot_free = pt_checkpoint is None if kind == PTUNING else lora is None
    if slot_free and base and os.path.isdir(base):
        logger.info("%s is a %s checkpoint of %s", model, "P-Tuning" if kind == PTUNING else "LoRA", base)
        return (base, model, lora) if kind == PTUNING else (base, pt_checkpoint, model)
    flag, what = ("--pt-checkpoint", "a P-Tuning checkpoint") if kind == PTUNING else ("--lora", "a LoRA adapter")
    raise ModelLoadError(f"{model} is {what}, not a model: pass it as {flag} {model} and the base model "
                         f"as --model BASE")


def _adapter_checkpoint(folder: str) -> tuple[str, str | None] | None:
    """(PTUNING or LORA, the base model it names) for a prefix or adapter folder, None for a model."""
    kind = folder_kind(folder)
    return (kind, adapter_base_model(folder)) if kind in (PTUNING, LORA) else None


def _first_tokenizer_folder(folders: list[str | None]) -> str | None:
    for folder in folders:
        if folder and os.path.isfile(os.path.join(folder, "tokenizer.model")):
            return folder
    return None


def _with_prefix(base, checkpoint: str, pre_seq_len: int | None):
    from .ptuning.prefix_model import PrefixTuningModel

    try:
        return PrefixTuningModel.from_pretrained(base, checkpoint, pre_seq_len=pre_seq_len)
    except (ValueError, FileNotFoundError) as e:
        raise ModelLoadError(str(e)) from None


def _with_lora(base, adapter: str):
    if not is_lora_adapter(adapter):
        raise ModelLoadError(f"{adapter} is not a LoRA adapter folder (no adapter_config.json)")
    from peft import PeftModel

    with peft_deprecations_silenced():
        return PeftModel.from_pretrained(base, adapter).merge_and_unload()
