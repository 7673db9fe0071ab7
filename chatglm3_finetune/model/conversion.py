"""Converts an original THUDM ChatGLM3 checkpoint into a native transformers `GlmForCausalLM` folder.

ChatGLM3's block is the native `glm` block (DESIGN.md decision 1), so conversion is renaming plus one
split: the fused `query_key_value` rows are `[q | k | v]`. `dense_h_to_4h` is `[gate | up]`, the same
layout as Glm's `gate_up_proj`, and ChatGLM3's rotary (on the first half of each head, interleaved
pairs, base 10000 * rope_ratio) is Glm's `partial_rotary_factor` 0.5.

Conversion goes shard by shard: each input shard is read (memory-mapped), converted and written as
one output safetensors shard, so peak memory is about one shard. Every tensor converts on its own,
so a layer whose tensors lie in different shards is fine.

    convert_checkpoint("chatglm3-6b", "chatglm3-6b-glm")  # bfloat16 weights; dtype="float16" keeps the original's
    convert_ptuning("original-ptuning-checkpoint", "prefix", base_dir="chatglm3-6b-glm")  # P-Tuning v2 prefix
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import GenerationConfig, GlmConfig

from ..train.file_modes import respect_umask
from .loading import DTYPES
from ..format.tokenizer import TOKENIZER_MODEL_FILE, load_tokenizer

logger = logging.getLogger(__name__)

INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")
DROPPED_TENSORS = ("transformer.rotary_pos_emb.inv_freq",)
LAYER_TENSOR = re.compile(r"transformer\.encoder\.layers\.(\d+)\.(.+)")
LAYER_RENAMES = {
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attention.dense.weight": "self_attn.o_proj.weight",
    "post_attention_layernorm.weight": "post_attention_layernorm.weight",
    "mlp.dense_h_to_4h.weight": "mlp.gate_up_proj.weight",
    "mlp.dense_4h_to_h.weight": "mlp.down_proj.weight",
}
TOP_RENAMES = {
    "transformer.embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "transformer.encoder.final_layernorm.weight": "model.norm.weight",
    "transformer.output_layer.weight": "lm_head.weight",
}
# (setting, value native Glm needs, what the user is told)
UNSUPPORTED_SETTINGS = (
    ("rmsnorm", True, "LayerNorm blocks (rmsnorm false); native Glm uses RMSNorm"),
    ("add_bias_linear", False, "biases on the dense/MLP layers (add_bias_linear true); native Glm has none"),
    ("apply_residual_connection_post_layernorm", False,
     "residuals taken after the layer norm (apply_residual_connection_post_layernorm true)"),
    ("post_layer_norm", True, "no final layer norm (post_layer_norm false); native Glm always has one"),
)


class ConversionError(ValueError):
    """A checkpoint that cannot be converted; the message says why and what to do."""


@dataclass(frozen=True)
class AttentionShape:
    num_heads: int
    num_kv_heads: int
    head_dim: int

    def split_rows(self) -> tuple[int, int, int]:
        kv_rows = self.num_kv_heads * self.head_dim
        return self.num_heads * self.head_dim, kv_rows, kv_rows


# --- config ---------------------------------------------------------------------------------------
def read_original_config(input_dir: str) -> dict:
    path = os.path.join(input_dir, "config.json")
    if not os.path.isdir(input_dir):
        raise ConversionError(f"{input_dir}: missing (no such folder)")
    if not os.path.isfile(path):
        raise ConversionError(f"{input_dir}: no config.json; --input must be an original ChatGLM3 model folder")
    with open(path) as f:
        config = json.load(f)
    check_convertible(config, input_dir)
    return config


def check_convertible(config: dict, where: str = "config.json") -> None:
    """Raises ConversionError for what native Glm cannot express."""
    if config.get("model_type") != "chatglm":
        raise ConversionError(f"{where}: model_type is {config.get('model_type')!r}, not 'chatglm'; this "
                              f"converter reads original THUDM ChatGLM3 checkpoints only")
    missing = [key for key in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                               "kv_channels", "padded_vocab_size", "seq_length") if key not in config]
    if missing:
        raise ConversionError(f"{where}: missing {', '.join(missing)}; this is not a ChatGLM2/3-layout config "
                              f"(ChatGLM-6B v1 is a different architecture and is not supported)")
    if config.get("quantization_bit"):
        raise ConversionError(f"{where}: quantization_bit is {config['quantization_bit']}; quantized weights "
                              f"cannot be converted. Convert the unquantized checkpoint, then quantize the "
                              f"converted model (e.g. with bitsandbytes when loading it)")
    for key, needed, what in UNSUPPORTED_SETTINGS:
        if config.get(key, needed) != needed:
            raise ConversionError(f"{where}: {what}; native GlmForCausalLM cannot express this model")
    heads, kv_heads = config["num_attention_heads"], attention_shape(config).num_kv_heads
    if heads % kv_heads:
        raise ConversionError(f"{where}: {heads} attention heads do not split into {kv_heads} KV groups")


def attention_shape(config: dict) -> AttentionShape:
    heads = config["num_attention_heads"]
    kv_heads = config.get("multi_query_group_num", heads) if config.get("multi_query_attention") else heads
    return AttentionShape(heads, kv_heads, config["kv_channels"])


def glm_config(original: dict, eos_token_ids: list[int], pad_token_id: int, dtype: torch.dtype) -> GlmConfig:
    shape = attention_shape(original)
    config = GlmConfig(
        vocab_size=original["padded_vocab_size"],
        hidden_size=original["hidden_size"],
        intermediate_size=original["ffn_hidden_size"],
        num_hidden_layers=original["num_layers"],
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads,
        head_dim=shape.head_dim,
        max_position_embeddings=original["seq_length"],
        rms_norm_eps=original.get("layernorm_epsilon", 1e-5),
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0 * original.get("rope_ratio", 1),
                         "partial_rotary_factor": 0.5},
        attention_bias=original.get("add_qkv_bias", False),
        attention_dropout=original.get("attention_dropout", 0.0),
        hidden_act="silu",
        eos_token_id=eos_token_ids,
        pad_token_id=pad_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
        use_cache=True,
    )
    config.architectures = ["GlmForCausalLM"]
    config.dtype = dtype
    return config


# What training and inference load by default (Ampere or newer): a converted folder in this dtype loads
# without a conversion pass. The original ChatGLM3-6B checkpoint is float16; `--dtype float16` keeps it exact.
DEFAULT_DTYPE = torch.bfloat16


# --- tensors --------------------------------------------------------------------------------------
def convert_tensor(name: str, tensor: torch.Tensor, shape: AttentionShape) -> dict[str, torch.Tensor]:
    """The native tensors for one original tensor (none for dropped buffers)."""
    if name in DROPPED_TENSORS:
        return {}
    if tensor.dtype in (torch.int8, torch.uint8) or name.endswith("_scale"):
        raise ConversionError(f"{name} is quantized ({tensor.dtype}); convert the unquantized checkpoint")
    if name in TOP_RENAMES:
        return {TOP_RENAMES[name]: tensor}
    match = LAYER_TENSOR.fullmatch(name)
    if match is None:
        raise ConversionError(f"unexpected tensor {name!r}: not part of a ChatGLM3 model (a P-Tuning prefix "
                              f"converts with --ptuning, from its own folder)")
    layer, part = match.groups()
    prefix = f"model.layers.{layer}."
    if part in LAYER_RENAMES:
        return {prefix + LAYER_RENAMES[part]: tensor}
    if part in ("self_attention.query_key_value.weight", "self_attention.query_key_value.bias"):
        rows = shape.split_rows()
        if tensor.shape[0] != sum(rows):
            raise ConversionError(f"{name} has {tensor.shape[0]} rows, expected {sum(rows)} "
                                  f"(q {rows[0]} + k {rows[1]} + v {rows[2]}) from config.json")
        kind = part.rsplit(".", 1)[1]
        q, k, v = torch.split(tensor, rows, dim=0)
        return {f"{prefix}self_attn.{proj}.{kind}": t.clone() for proj, t in (("q_proj", q), ("k_proj", k),
                                                                              ("v_proj", v))}
    raise ConversionError(f"unexpected tensor {name!r} in layer {layer}: this ChatGLM variant is not supported")


def convert_state(state: dict[str, torch.Tensor], shape: AttentionShape, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    converted = {}
    for name, tensor in state.items():
        for new_name, new_tensor in convert_tensor(name, tensor, shape).items():
            converted[new_name] = new_tensor.to(dtype).contiguous()
    return converted


# --- files ----------------------------------------------------------------------------------------
def list_shards(input_dir: str) -> dict[str, list[str]]:
    """Shard file -> tensor names in it (names unknown, empty list, for a single unindexed file)."""
    for index_name in INDEX_FILES:
        index_path = os.path.join(input_dir, index_name)
        if os.path.isfile(index_path):
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]
            shards: dict[str, list[str]] = {}
            for name, shard in weight_map.items():
                shards.setdefault(shard, []).append(name)
            absent = [shard for shard in shards if not os.path.isfile(os.path.join(input_dir, shard))]
            if absent:
                raise ConversionError(f"{input_dir}: {index_name} names missing shard(s) {', '.join(sorted(absent))}; "
                                      f"download the complete checkpoint")
            return dict(sorted(shards.items()))
    for single in SINGLE_FILES:
        if os.path.isfile(os.path.join(input_dir, single)):
            return {single: []}
    raise ConversionError(f"{input_dir}: no weights (expected {' or '.join(INDEX_FILES)} with its shards, "
                          f"or {' or '.join(SINGLE_FILES)})")


def load_shard(path: str) -> dict[str, torch.Tensor]:
    if path.endswith(".safetensors"):
        with safe_open(path, framework="pt") as f:
            return {name: f.get_tensor(name) for name in f.keys()}
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as error:  # legacy (pre-zip) torch.save files cannot be memory-mapped
        if "mmap" not in str(error):
            raise
        return torch.load(path, map_location="cpu", weights_only=True)


def output_shard_names(count: int) -> list[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def convert_weights(input_dir: str, output_dir: str, shape: AttentionShape, dtype: torch.dtype) -> dict[str, str]:
    """Writes the converted shards (+ index when several); returns native tensor name -> shard file."""
    shards = list_shards(input_dir)
    kept = [shard for shard, names in shards.items() if not names or set(names) - set(DROPPED_TENSORS)]
    quantized = [name for names in shards.values() for name in names if name.endswith("_scale")]
    if quantized:
        raise ConversionError(f"{input_dir}: quantized weights ({quantized[0]}, ...); convert the unquantized checkpoint")
    weight_map: dict[str, str] = {}
    total_bytes = 0
    for shard, out_name in zip(kept, output_shard_names(len(kept))):
        logger.info("converting %s -> %s", shard, out_name)
        try:
            state = load_shard(os.path.join(input_dir, shard))
        except Exception as error:  # a damaged or foreign file: say which one, without a traceback
            raise ConversionError(f"{os.path.join(input_dir, shard)}: cannot read the weights ({error})") from error
        converted = convert_state(state, shape, dtype)
        del state
        clash = set(converted) & set(weight_map)
        if clash:
            raise ConversionError(f"{input_dir}: {sorted(clash)[0]} appears in more than one shard")
        save_file(converted, os.path.join(output_dir, out_name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(converted, out_name))
        total_bytes += sum(t.numel() * t.element_size() for t in converted.values())
        del converted
    if len(kept) > 1:
        index = {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        with open(os.path.join(output_dir, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=2)
    return weight_map


def expected_tensor_names(config: GlmConfig) -> set[str]:
    per_layer = [f"self_attn.{p}.weight" for p in ("q_proj", "k_proj", "v_proj", "o_proj")] + [
        "mlp.gate_up_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight", "post_attention_layernorm.weight"]
    if config.attention_bias:
        per_layer += [f"self_attn.{p}.bias" for p in ("q_proj", "k_proj", "v_proj")]
    names = {f"model.layers.{i}.{part}" for i in range(config.num_hidden_layers) for part in per_layer}
    return names | set(TOP_RENAMES.values())


def convert_checkpoint(input_dir: str, output_dir: str, dtype: str | torch.dtype | None = None) -> str:
    """Converts an original ChatGLM3 folder into a native GlmForCausalLM folder; returns output_dir."""
    original = read_original_config(input_dir)
    if not os.path.isfile(os.path.join(input_dir, TOKENIZER_MODEL_FILE)):
        raise ConversionError(f"{input_dir}: no {TOKENIZER_MODEL_FILE}; copy the original tokenizer.model "
                              f"next to the weights")
    if os.path.isdir(output_dir) and os.listdir(output_dir):
        raise ConversionError(f"{output_dir} is not empty; choose a new --output folder")
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ConversionError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    dtype = dtype or DEFAULT_DTYPE
    tokenizer = load_tokenizer(input_dir)
    config = glm_config(original, tokenizer.stop_token_ids, tokenizer.pad_token_id, dtype)
    if len(tokenizer) > config.vocab_size:
        raise ConversionError(f"{input_dir}: the tokenizer has {len(tokenizer)} tokens but the model only "
                              f"{config.vocab_size} embeddings; tokenizer.model does not belong to this model")

    os.makedirs(output_dir, exist_ok=True)
    try:
        weight_map = convert_weights(input_dir, output_dir, attention_shape(original), dtype)
        missing = expected_tensor_names(config) - set(weight_map)
        if missing:
            raise ConversionError(f"{input_dir}: the checkpoint lacks {len(missing)} tensors, "
                                  f"e.g. {sorted(missing)[0]}")
    except ConversionError:
        shutil.rmtree(output_dir)  # it was empty or absent before: leave no half-converted model behind
        raise
    config.save_pretrained(output_dir)
    GenerationConfig(eos_token_id=tokenizer.stop_token_ids, pad_token_id=tokenizer.pad_token_id).save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    respect_umask(output_dir)
    logger.info("converted %s -> %s (%d tensors, %s)", input_dir, output_dir, len(weight_map), dtype)
    return output_dir


# --- P-Tuning v2 prefixes ----------------------------------------------------------------------------
def convert_ptuning(ptuning_dir: str, output_dir: str, base_dir: str | None = None) -> str:
    """Rewrites an ORIGINAL ChatGLM3 P-Tuning checkpoint (config.json with pre_seq_len + pytorch_model.bin
    holding transformer.prefix_encoder.*) in this toolkit's prefix format; returns output_dir.

    The prefix is checked against `base_dir` (a converted model folder, recorded as the prefix's base)
    or else against the model config stored in the P-Tuning folder. No base weights are loaded.
    """
    from transformers import AutoConfig, GlmForCausalLM

    from .ptuning.prefix_checkpoint import ORIGINAL_FORMAT, load_prefix_state
    from .ptuning.prefix_model import PrefixTuningModel

    try:
        settings, _ = load_prefix_state(ptuning_dir)
    except (ValueError, FileNotFoundError) as error:
        raise ConversionError(str(error)) from error
    if settings.format != ORIGINAL_FORMAT:
        raise ConversionError(f"{ptuning_dir} is already a prefix in this toolkit's format; load it as it is")
    if os.path.isdir(output_dir) and os.listdir(output_dir):
        raise ConversionError(f"{output_dir} is not empty; choose a new --output folder")
    if base_dir is not None:
        if not os.path.isdir(base_dir):
            raise ConversionError(f"--base {base_dir}: missing (no such folder)")
        if not os.path.isfile(os.path.join(base_dir, "config.json")):
            raise ConversionError(f"--base {base_dir}: no config.json; give the converted model folder")
        config = AutoConfig.from_pretrained(base_dir)
    else:
        original = read_original_config(ptuning_dir)
        config = glm_config(original, [2], 0, torch.float32)
    with torch.device("meta"):  # the shapes are all the prefix needs
        base = GlmForCausalLM(config)
    try:
        model = PrefixTuningModel.from_pretrained(base, ptuning_dir)
    except ValueError as error:
        raise ConversionError(str(error)) from error
    if base_dir is not None:
        model.record_base_model(base_dir)
    model.save_pretrained(output_dir)
    logger.info("converted the P-Tuning prefix %s -> %s (pre_seq_len %d, prefix_projection %s)", ptuning_dir,
                output_dir, settings.pre_seq_len, settings.prefix_projection)
    return output_dir


__all__ = ["convert_ptuning", "ConversionError", "DEFAULT_DTYPE", "DTYPES", "attention_shape", "check_convertible", "convert_checkpoint",
           "convert_state", "convert_tensor", "glm_config", "list_shards"]
