"""P-Tuning v2 checkpoint files: the prefix settings, this toolkit's format and the original THUDM one.

This toolkit writes `prefix_config.json` (the settings + a format marker) and
`prefix_encoder.safetensors` (fp32). The original ChatGLM3 layout (`config.json` with
`pre_seq_len` + `pytorch_model.bin` holding `transformer.prefix_encoder.*`) loads as is.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ...train.file_modes import respect_umask

PREFIX_FORMAT = "chatglm3-ptuning-v2"
ORIGINAL_FORMAT = "chatglm3-original"
PREFIX_CONFIG_FILE = "prefix_config.json"
PREFIX_WEIGHTS_FILE = "prefix_encoder.safetensors"
ORIGINAL_CONFIG_FILE = "config.json"
ORIGINAL_WEIGHTS_FILES = ("pytorch_model.bin", "model.safetensors")
ORIGINAL_KEY_MARKER = "prefix_encoder."


@dataclass(frozen=True, eq=False)
class PrefixSettings(Mapping):
    """What a prefix is: its length, encoder shape and the layer geometry it was trained for.

    The fields are the JSON keys of `prefix_config.json`, in file order; reading it as a mapping
    (`dict(settings)`, `settings["pre_seq_len"]`) gives exactly those keys, plus "format" when
    the settings were read from a checkpoint (which format it was in).
    """

    pre_seq_len: int
    prefix_projection: bool
    prefix_hidden_size: int | None
    num_layers: int
    num_kv_heads: int
    head_dim: int
    base_model_name_or_path: str | None = None
    format: str | None = None

    @classmethod
    def for_model(cls, config, pre_seq_len: int, prefix_projection: bool = False,
                  prefix_hidden_size: int | None = None, base_model_name_or_path: str | None = None):
        """Settings for a new prefix on a model with this transformers config; the MLP width
        defaults to the model's hidden size (what ChatGLM3 uses)."""
        from ...compat import model_name_or_path

        return cls(pre_seq_len=pre_seq_len, prefix_projection=bool(prefix_projection),
                   prefix_hidden_size=(prefix_hidden_size or config.hidden_size) if prefix_projection else None,
                   **attention_geometry(config),
                   base_model_name_or_path=base_model_name_or_path or model_name_or_path(config))

    @property
    def kv_size(self) -> int:
        """Width of one prefix position: every layer's key and value, all KV heads."""
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim

    def shape_differences(self, other: "PrefixSettings") -> list[str]:
        """`key: checkpoint X, model Y` for every shape setting where `other` (the checkpoint) differs."""
        keys = ("pre_seq_len", "prefix_projection", "prefix_hidden_size", "num_layers", "num_kv_heads", "head_dim")
        return [f"{key}: checkpoint {other[key]!r}, model {self[key]!r}" for key in keys if other[key] != self[key]]

    def _keys(self) -> list[str]:
        names = [field.name for field in dataclasses.fields(self) if field.name != "format"]
        return names if self.format is None else ["format", *names]

    def __getitem__(self, key: str):
        if key not in self._keys():
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self):
        return iter(self._keys())

    def __len__(self) -> int:
        return len(self._keys())


SETTING_KEYS = tuple(field.name for field in dataclasses.fields(PrefixSettings) if field.name != "format")


def attention_geometry(config) -> dict[str, int]:
    """num_layers, num_kv_heads and head_dim of a transformers causal-LM config."""
    return {
        "num_layers": config.num_hidden_layers,
        "num_kv_heads": getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
        "head_dim": getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
    }


# ---- writing -----------------------------------------------------------------------------------

def save_prefix(save_directory: str, settings: PrefixSettings, state: dict[str, torch.Tensor]) -> None:
    """prefix_encoder.safetensors (the fp32 state) + prefix_config.json (format marker, settings)."""
    os.makedirs(save_directory, exist_ok=True)
    save_file(state, os.path.join(save_directory, PREFIX_WEIGHTS_FILE), metadata={"format": "pt"})
    respect_umask(save_directory)
    record = {key: settings[key] for key in SETTING_KEYS}
    with open(os.path.join(save_directory, PREFIX_CONFIG_FILE), "w", encoding="utf-8") as f:
        json.dump({"format": PREFIX_FORMAT, **record}, f, indent=2)
        f.write("\n")


# ---- reading -----------------------------------------------------------------------------------

def read_prefix_settings(checkpoint_dir: str) -> PrefixSettings:
    """The settings of a P-Tuning checkpoint (either format) without loading weights, with `format`."""
    checkpoint_dir = os.fspath(checkpoint_dir)
    if not os.path.isdir(checkpoint_dir):
        raise FileNotFoundError(f"P-Tuning checkpoint folder {checkpoint_dir} does not exist")
    ours = os.path.join(checkpoint_dir, PREFIX_CONFIG_FILE)
    if os.path.isfile(ours):
        return _read_our_settings(checkpoint_dir, ours)
    original = os.path.join(checkpoint_dir, ORIGINAL_CONFIG_FILE)
    if os.path.isfile(original):
        return _read_original_settings(checkpoint_dir, original)
    raise FileNotFoundError(
        f"{checkpoint_dir} is not a P-Tuning checkpoint: expected {PREFIX_CONFIG_FILE} + {PREFIX_WEIGHTS_FILE} "
        f"(this toolkit) or {ORIGINAL_CONFIG_FILE} with pre_seq_len + pytorch_model.bin (original ChatGLM3)")


def load_prefix_state(checkpoint_dir: str) -> tuple[PrefixSettings, dict[str, torch.Tensor]]:
    """(settings, prefix encoder state dict in fp32) of a P-Tuning checkpoint in either format."""
    settings = read_prefix_settings(checkpoint_dir)
    if settings.format == PREFIX_FORMAT:
        state = load_file(os.path.join(checkpoint_dir, PREFIX_WEIGHTS_FILE))
    else:
        state = _load_original_prefix_weights(_original_weights_file(checkpoint_dir))
    state = fp32_cpu(state)
    _check_state_shapes(settings, state, checkpoint_dir)
    return settings, state


def check_fits_model(settings: PrefixSettings, config, checkpoint_dir: str) -> None:
    """Refuses a prefix trained for another layer geometry than this model config's."""
    mismatched = [f"{key} {settings[key]} (model: {value})" for key, value in attention_geometry(config).items()
                  if settings[key] != value]
    if mismatched:
        raise ValueError(f"the prefix in {checkpoint_dir} was trained for another model: {', '.join(mismatched)}; "
                         f"it was trained on {settings.base_model_name_or_path or 'an unnamed model'}")


def fp32_cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: value.detach().to("cpu", torch.float32).contiguous() for key, value in state.items()}


def _read_our_settings(checkpoint_dir: str, config_path: str) -> PrefixSettings:
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    if config.get("format") != PREFIX_FORMAT:
        raise ValueError(f"{config_path} has format {config.get('format')!r}, expected {PREFIX_FORMAT!r}")
    missing = [key for key in SETTING_KEYS if key not in config]
    if missing:
        raise ValueError(f"{config_path} lacks the settings {', '.join(missing)}")
    if not os.path.isfile(os.path.join(checkpoint_dir, PREFIX_WEIGHTS_FILE)):
        raise FileNotFoundError(f"{checkpoint_dir} has {PREFIX_CONFIG_FILE} but no {PREFIX_WEIGHTS_FILE}")
    return PrefixSettings(format=PREFIX_FORMAT, **{key: config[key] for key in SETTING_KEYS})


def _read_original_settings(checkpoint_dir: str, config_path: str) -> PrefixSettings:
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    if not config.get("pre_seq_len"):
        raise ValueError(f"{config_path} has no pre_seq_len: {checkpoint_dir} is a model, not a P-Tuning "
                         "checkpoint (pass it as the model, or give the folder the prefix was saved to)")
    _original_weights_file(checkpoint_dir)
    projection = bool(config.get("prefix_projection", False))
    num_layers = config.get("num_layers", config.get("num_hidden_layers"))
    num_kv_heads = config.get("multi_query_group_num") if config.get("multi_query_attention", True) else None
    num_kv_heads = num_kv_heads or config.get("num_key_value_heads") or config.get("num_attention_heads")
    head_dim = config.get("kv_channels") or config.get("head_dim")
    if head_dim is None and config.get("hidden_size") and config.get("num_attention_heads"):
        head_dim = config["hidden_size"] // config["num_attention_heads"]
    if None in (num_layers, num_kv_heads, head_dim):
        raise ValueError(f"{config_path} does not say the model's layers / KV groups / head size "
                         "(num_layers, multi_query_group_num, kv_channels)")
    return PrefixSettings(
        format=ORIGINAL_FORMAT, pre_seq_len=int(config["pre_seq_len"]), prefix_projection=projection,
        prefix_hidden_size=config.get("hidden_size") if projection else None, num_layers=int(num_layers),
        num_kv_heads=int(num_kv_heads), head_dim=int(head_dim),
        base_model_name_or_path=config.get("_name_or_path") or None)


def _original_weights_file(checkpoint_dir: str) -> str:
    for name in ORIGINAL_WEIGHTS_FILES:
        path = os.path.join(checkpoint_dir, name)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"{checkpoint_dir} has a config.json with pre_seq_len but no prefix weights "
                            f"({' or '.join(ORIGINAL_WEIGHTS_FILES)})")


def _load_original_prefix_weights(path: str) -> dict[str, torch.Tensor]:
    """`transformer.prefix_encoder.X` -> `X`; everything else in the file is ignored."""
    if path.endswith(".safetensors"):
        with safe_open(path, framework="pt") as f:
            state = {key: f.get_tensor(key) for key in f.keys() if ORIGINAL_KEY_MARKER in key}
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    prefix_state = {key.split(ORIGINAL_KEY_MARKER, 1)[1]: value for key, value in state.items()
                    if ORIGINAL_KEY_MARKER in key}
    if not prefix_state:
        raise ValueError(f"{path} holds no prefix_encoder.* weights: it is not a P-Tuning checkpoint")
    return prefix_state


def _expected_shapes(settings: PrefixSettings) -> dict[str, tuple[int, ...]]:
    shapes = {"embedding.weight": (settings.pre_seq_len, settings.kv_size)}
    if settings.prefix_projection:
        width, kv_size = settings.prefix_hidden_size, settings.kv_size
        shapes.update({"trans.0.weight": (width, kv_size), "trans.0.bias": (width,),
                       "trans.2.weight": (kv_size, width), "trans.2.bias": (kv_size,)})
    return shapes


def _check_state_shapes(settings: PrefixSettings, state: dict[str, torch.Tensor], checkpoint_dir: str) -> None:
    shapes = {key: tuple(value.shape) for key, value in state.items()}
    wanted = _expected_shapes(settings)
    if shapes != wanted:
        raise ValueError(f"the prefix weights in {checkpoint_dir} do not match its settings {dict(settings)}: "
                         f"found {shapes}, expected {wanted}")


__all__ = ["PrefixSettings", "read_prefix_settings", "load_prefix_state", "save_prefix", "check_fits_model",
           "attention_geometry", "PREFIX_FORMAT", "ORIGINAL_FORMAT", "PREFIX_CONFIG_FILE", "PREFIX_WEIGHTS_FILE"]
