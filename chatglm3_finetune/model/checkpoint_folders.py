"""What a folder holds: a P-Tuning prefix (either format), a LoRA adapter, or a full model (ours or an original ChatGLM3)."""

from __future__ import annotations

import json
import os

from .ptuning.prefix_checkpoint import ORIGINAL_CONFIG_FILE, PREFIX_CONFIG_FILE, PREFIX_WEIGHTS_FILE, read_prefix_settings

PTUNING, LORA, MODEL = "ptuning", "lora", "model"
LORA_CONFIG_FILE = "adapter_config.json"
MODEL_CONFIG_FILE = "config.json"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json", PREFIX_WEIGHTS_FILE, "adapter_model.safetensors",
                "adapter_model.bin")


def folder_kind(folder: str) -> str | None:
    """PTUNING, LORA or MODEL for a folder that holds one, else None. An original-format P-Tuning
    folder is a config.json with pre_seq_len; a LoRA adapter has adapter_config.json and no config.json."""
    if not os.path.isdir(folder):
        return None
    if os.path.isfile(os.path.join(folder, PREFIX_CONFIG_FILE)) or bool(_read_json(folder, ORIGINAL_CONFIG_FILE).get("pre_seq_len")):
        return PTUNING
    if is_lora_adapter(folder) and not os.path.isfile(os.path.join(folder, MODEL_CONFIG_FILE)):
        return LORA
    if os.path.isfile(os.path.join(folder, MODEL_CONFIG_FILE)):
        return MODEL
    return None


def is_lora_adapter(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, LORA_CONFIG_FILE))


def is_original_chatglm(folder: str) -> bool:
    """A model folder of the original ChatGLM3 (remote code, `model_type` chatglm): convert it first."""
    return _read_json(folder, MODEL_CONFIG_FILE).get("model_type") == "chatglm"


def adapter_base_model(folder: str) -> str | None:
    """The base model a P-Tuning or LoRA folder names (`base_model_name_or_path`), None if it names none."""
    if folder_kind(folder) == PTUNING:
        try:
            return read_prefix_settings(folder).base_model_name_or_path
        except (OSError, ValueError):
            return None
    return _read_json(folder, LORA_CONFIG_FILE).get("base_model_name_or_path")


def holds_weights(folder: str) -> bool:
    """Whether a (Trainer checkpoint) folder holds weights: a model, a prefix, an adapter or DeepSpeed's."""
    names = os.listdir(folder)
    return any(name in WEIGHT_FILES for name in names) or any(name.startswith("global_step") for name in names)


def _read_json(folder: str, name: str) -> dict:
    try:
        with open(os.path.join(folder, name), encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


__all__ = ["PTUNING", "LORA", "MODEL", "WEIGHT_FILES", "folder_kind", "is_lora_adapter", "is_original_chatglm",
           "adapter_base_model", "holds_weights"]
