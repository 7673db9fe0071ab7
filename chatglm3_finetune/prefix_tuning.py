"""P-Tuning v2 for native transformers GLM models: a learned key/value prefix for every layer.

The base model stays frozen; a small fp32 `PrefixEncoder` produces, for each decoder layer, a key
and a value prefix of `pre_seq_len` positions that the layer's attention sees before the real
tokens. The prefix reaches the layers through the model's cache argument:

- training / plain forward: a read-only `PrefixCache`, built fresh every forward, whose `update()`
  returns cat(prefix, new keys) and stores nothing (so gradient checkpointing can replay a layer);
- generation: a fresh `DynamicCache` filled with the prefix, which generation then extends.

In both cases the 2D attention mask is extended by `pre_seq_len` ones on the left and the real
tokens' positions start at 0, as in the original ChatGLM3 code. Prefix keys get no rotary embedding.

Checkpoints hold only the prefix: `prefix_config.json` + `prefix_encoder.safetensors` (this
toolkit), or the original ChatGLM3 layout (`config.json` with `pre_seq_len` + `pytorch_model.bin`
holding `transformer.prefix_encoder.*`), which loads as is.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
from typing import Any

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import Cache, DynamicCache
from transformers.cache_utils import CacheLayerMixin
from transformers.modeling_outputs import CausalLMOutputWithPast

from .file_modes import respect_umask
from .supervised_loss import supervised_lm_loss

logger = logging.getLogger(__name__)

PREFIX_FORMAT = "chatglm3-ptuning-v2"
ORIGINAL_FORMAT = "chatglm3-original"
PREFIX_CONFIG_FILE = "prefix_config.json"
PREFIX_WEIGHTS_FILE = "prefix_encoder.safetensors"
ORIGINAL_CONFIG_FILE = "config.json"
ORIGINAL_WEIGHTS_FILES = ("pytorch_model.bin", "model.safetensors")
ORIGINAL_KEY_MARKER = "prefix_encoder."
SETTING_KEYS = ("pre_seq_len", "prefix_projection", "prefix_hidden_size", "num_layers", "num_kv_heads",
                "head_dim", "base_model_name_or_path")


class PrefixEncoder(nn.Module):
    """Maps the prefix positions 0..pre_seq_len-1 to every layer's key/value prefix.

    Same parameters as ChatGLM3's own encoder, so its checkpoints load 1:1: `embedding.weight`
    [pre_seq_len, kv_size] with kv_size = num_layers * 2 * num_kv_heads * head_dim; with
    `prefix_projection`, then `trans` = Linear(kv_size, prefix_hidden_size) - Tanh -
    Linear(prefix_hidden_size, kv_size), where prefix_hidden_size defaults to the model's
    `hidden_size` (what ChatGLM3 uses). Output: [batch, pre_seq_len, kv_size], read as
    [batch, pre_seq_len, num_layers, 2 (key, value), num_kv_heads, head_dim].
    """

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, pre_seq_len: int,
                 prefix_projection: bool = False, prefix_hidden_size: int | None = None,
                 hidden_size: int | None = None):
        super().__init__()
        if pre_seq_len < 1:
            raise ValueError(f"pre_seq_len must be a positive number of prefix positions, got {pre_seq_len}")
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.pre_seq_len = pre_seq_len
        self.prefix_projection = prefix_projection
        self.kv_size = num_layers * 2 * num_kv_heads * head_dim
        self.embedding = nn.Embedding(pre_seq_len, self.kv_size)
        self.prefix_hidden_size = None
        if prefix_projection:
            self.prefix_hidden_size = prefix_hidden_size or hidden_size
            if not self.prefix_hidden_size:
                raise ValueError("prefix_projection needs the width of its MLP: pass prefix_hidden_size "
                                 "(or hidden_size, the model's hidden size, which ChatGLM3 uses)")
            self.trans = nn.Sequential(
                nn.Linear(self.kv_size, self.prefix_hidden_size),
                nn.Tanh(),
                nn.Linear(self.prefix_hidden_size, self.kv_size),
            )
        self.register_buffer("prefix_tokens", torch.arange(pre_seq_len), persistent=False)

    def forward(self) -> torch.Tensor:
        """[1, pre_seq_len, kv_size]: the same for every row of a batch."""
        # Called through the modules (never by reading .weight) so ZeRO-3 can gather the parameters.
        prefix = self.embedding(self.prefix_tokens.unsqueeze(0))
        if self.prefix_projection:
            prefix = self.trans(prefix)
        return prefix

    def split_layers(self, prefix: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Encoder output [batch, pre_seq_len, kv_size] -> per layer (key, value), each
        [batch, num_kv_heads, pre_seq_len, head_dim]. Layer l's key is block 2l, its value 2l+1."""
        batch = prefix.shape[0]
        blocks = prefix.view(batch, self.pre_seq_len, self.num_layers * 2, self.num_kv_heads, self.head_dim)
        blocks = blocks.permute(2, 0, 3, 1, 4)  # [layers * 2, batch, kv_heads, pre_seq_len, head_dim]
        return [(blocks[2 * layer], blocks[2 * layer + 1]) for layer in range(self.num_layers)]


class _PrefixLayer(CacheLayerMixin):
    """One layer of a `PrefixCache`: hands out cat(prefix, new) and keeps nothing."""

    is_sliding = False

    def __init__(self, key_prefix: torch.Tensor, value_prefix: torch.Tensor):
        super().__init__()
        self.keys, self.values = key_prefix, value_prefix
        self.device = key_prefix.device
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:
        pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        keys = self.keys.to(key_states.device, key_states.dtype)
        values = self.values.to(value_states.device, value_states.dtype)
        return torch.cat([keys, key_states], dim=-2), torch.cat([values, value_states], dim=-2)

    def get_mask_sizes(self, query_length) -> tuple[int, int]:
        if isinstance(query_length, torch.Tensor):  # older transformers pass cache_position
            query_length = query_length.shape[0]
        return self.get_seq_length() + query_length, 0

    def get_seq_length(self) -> int:
        return self.keys.shape[-2]

    def get_max_length(self) -> int:
        return -1

    def _read_only(self, *args, **kwargs):
        raise NotImplementedError("PrefixCache is read-only and built fresh for every forward; "
                                  "generation uses a DynamicCache of the prefix instead (PrefixTuningModel.generate)")

    reset = crop = reorder_cache = batch_repeat_interleave = batch_select_indices = offload = _read_only


class PrefixCache(Cache):
    """A read-only cache holding every layer's prefix: `update()` returns cat(prefix, new keys/values)
    and stores nothing, so the same forward (or its gradient-checkpointing replay) can run twice.
    `get_seq_length()` is the prefix length, which the causal mask offsets the queries by."""

    def __init__(self, layer_prefixes: list[tuple[torch.Tensor, torch.Tensor]]):
        super().__init__(layers=[_PrefixLayer(key, value) for key, value in layer_prefixes])

    @property
    def pre_seq_len(self) -> int:
        return self.get_seq_length()


def real_token_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions 0, 1, ... of the real tokens in each row of a 2D mask (left padding gets 0)."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.clamp(min=0)


class PrefixTuningModel(nn.Module):
    """A frozen causal LM plus a trainable fp32 prefix encoder (P-Tuning v2)."""

    supports_gradient_checkpointing = True
    main_input_name = "input_ids"

    def __init__(self, base_model: nn.Module, pre_seq_len: int, prefix_projection: bool = False,
                 prefix_hidden_size: int | None = None, prefix_dropout: float = 0.1,
                 base_model_name_or_path: str | None = None):
        super().__init__()
        config = base_model.config
        num_layers = config.num_hidden_layers
        num_kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        if prefix_projection and not prefix_hidden_size:
            prefix_hidden_size = config.hidden_size
        if not prefix_projection:
            prefix_hidden_size = None

        self.base_model = base_model
        self.config = config
        self.base_model.requires_grad_(False)
        self.prefix_encoder = PrefixEncoder(num_layers, num_kv_heads, head_dim, pre_seq_len, prefix_projection,
                                            prefix_hidden_size).to(_first_device(base_model), torch.float32)
        self.prefix_dropout = nn.Dropout(prefix_dropout)
        self.settings = {
            "pre_seq_len": pre_seq_len,
            "prefix_projection": bool(prefix_projection),
            "prefix_hidden_size": prefix_hidden_size,
            "num_layers": num_layers,
            "num_kv_heads": num_kv_heads,
            "head_dim": head_dim,
            "base_model_name_or_path": base_model_name_or_path or getattr(config, "_name_or_path", None) or None,
        }
        # Read once here: under ZeRO-3 a base parameter is an empty shard at forward time.
        self._base_dtype = _first_float_dtype(base_model)
        self._cache_argument = _cache_argument_name(base_model)
        self.supervised_loss = False  # set by efficient_loss.use_supervised_loss

    @property
    def pre_seq_len(self) -> int:
        return self.settings["pre_seq_len"]

    @property
    def generation_config(self):
        return getattr(self.base_model, "generation_config", None)

    @property
    def device(self) -> torch.device:
        return self.prefix_encoder.prefix_tokens.device

    def _apply(self, fn, *args, **kwargs):
        # .to(dtype) / .half() / .bfloat16() change the base dtype the prefix is cast to.
        result = super()._apply(fn, *args, **kwargs)
        self._base_dtype = _first_float_dtype(self.base_model)
        return result

    # ---- the prefix --------------------------------------------------------------------------

    def prefix_key_values(self, batch_size: int,
                          dropout: bool | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Every layer's (key, value) prefix, [batch_size, num_kv_heads, pre_seq_len, head_dim] each,
        in the base model's dtype; dropout applies in training unless `dropout` says otherwise."""
        # As in ChatGLM3: cast to the model's dtype, then dropout (independent per row).
        prefix = self.prefix_encoder().to(self._base_dtype).expand(batch_size, -1, -1)
        if dropout is not False:
            prefix = self.prefix_dropout(prefix)
        return self.prefix_encoder.split_layers(prefix)

    def _extend_attention_mask(self, attention_mask: torch.Tensor | None, batch_size: int, seq_len: int):
        if attention_mask is None:
            return None
        if attention_mask.dim() == 4:
            if attention_mask.shape[-1] == seq_len:  # packed rows: every record sees the whole prefix
                visible = 0 if attention_mask.is_floating_point() else 1  # additive float, or bool/int keep-masks
                prefix_columns = attention_mask.new_full((*attention_mask.shape[:-1], self.pre_seq_len), visible)
                return torch.cat([prefix_columns, attention_mask], dim=-1)
            if attention_mask.shape[-1] != self.pre_seq_len + seq_len:
                raise ValueError(f"a 4D attention_mask must cover the {seq_len} tokens, or the {self.pre_seq_len} "
                                 f"prefix positions plus the tokens ({self.pre_seq_len + seq_len} keys), "
                                 f"got {attention_mask.shape[-1]}")
            return attention_mask
        if attention_mask.shape[-1] != seq_len:
            raise ValueError(f"attention_mask covers {attention_mask.shape[-1]} positions but there are {seq_len} "
                             "tokens; pass the mask of the tokens only (the prefix positions are added here)")
        prefix_mask = attention_mask.new_ones((batch_size, self.pre_seq_len))
        return torch.cat([prefix_mask, attention_mask], dim=-1)

    # ---- forward -----------------------------------------------------------------------------

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                **kwargs) -> CausalLMOutputWithPast:
        tokens = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
        if tokens is None:
            raise ValueError("forward needs input_ids (or inputs_embeds)")
        batch_size, seq_len = tokens.shape[:2]
        if position_ids is None:
            if attention_mask is not None and attention_mask.dim() == 2:
                position_ids = real_token_positions(attention_mask)
            else:
                position_ids = torch.arange(seq_len, device=tokens.device).unsqueeze(0).expand(batch_size, -1)
        cache = PrefixCache(self.prefix_key_values(batch_size))
        attention_mask = self._extend_attention_mask(attention_mask, batch_size, seq_len)
        kwargs.pop("use_cache", None)
        kwargs.pop("return_dict", None)
        return self._forward_base(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                  cache=cache, labels=labels, **kwargs)

    def _forward_base(self, input_ids, attention_mask, position_ids, cache, labels, **kwargs) -> CausalLMOutputWithPast:
        """The one call into the base model (loss included). In training, with `supervised_loss`
        on, the output layer only runs at supervised positions (`efficient_loss`)."""
        if labels is not None and self.training and self.supervised_loss:
            loss, _ = supervised_lm_loss(self.base_model, labels, kwargs.pop("num_items_in_batch", None),
                                         input_ids=input_ids, attention_mask=attention_mask,
                                         position_ids=position_ids, **{self._cache_argument: cache}, **kwargs)
            return CausalLMOutputWithPast(loss=loss)
        outputs = self.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                  labels=labels, use_cache=False, return_dict=True,
                                  **{self._cache_argument: cache}, **kwargs)
        # The read-only prefix cache is of no use to callers (and the Trainer would try to gather it).
        return CausalLMOutputWithPast(loss=outputs.loss, logits=outputs.logits,
                                      hidden_states=outputs.hidden_states, attentions=outputs.attentions)

    # ---- generation --------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **generate_kwargs):
        """The base model's `generate` with the prefix: extended mask, positions from 0, a fresh
        DynamicCache of the prefix for batch * max(num_beams, num_return_sequences) rows.
        Returns what the base `generate` returns (prompt + new tokens)."""
        for name in ("cache", "past_key_values", "position_ids", "inputs_embeds"):
            if generate_kwargs.get(name) is not None:
                raise ValueError(f"generate() with a prefix builds its own {name}; do not pass it")
        if generate_kwargs.get("use_cache") is False:
            raise ValueError("generate() with a prefix needs use_cache=True: the prefix lives in the cache")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        batch_size, seq_len = input_ids.shape
        position_ids = real_token_positions(attention_mask)
        rows = batch_size * self._generate_expand_size(generate_kwargs)
        cache = DynamicCache()
        for layer, (key, value) in enumerate(self.prefix_key_values(rows, dropout=False)):
            cache.update(key.contiguous(), value.contiguous(), layer)
        extended_mask = self._extend_attention_mask(attention_mask, batch_size, seq_len)
        return self.base_model.generate(input_ids=input_ids, attention_mask=extended_mask, position_ids=position_ids,
                                        **{self._cache_argument: cache}, **generate_kwargs)

    def _generate_expand_size(self, generate_kwargs: dict) -> int:
        """How many rows `generate` makes of each input row (it expands by this, the cache must match)."""
        config = generate_kwargs.get("generation_config") or self.generation_config
        num_beams = generate_kwargs.get("num_beams") or getattr(config, "num_beams", None) or 1
        num_return = (generate_kwargs.get("num_return_sequences")
                      or getattr(config, "num_return_sequences", None) or 1)
        return max(num_beams, num_return)

    # ---- training helpers the HF Trainer calls -----------------------------------------------

    def get_input_embeddings(self) -> nn.Module:
        return self.base_model.get_input_embeddings()

    def enable_input_require_grads(self):
        return self.base_model.enable_input_require_grads()

    @property
    def is_activation_checkpointing(self) -> bool:
        return any(layer.gradient_checkpointing for layer in self._checkpointed_layers())

    is_gradient_checkpointing = is_activation_checkpointing

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None, **kwargs):
        """Non-reentrant checkpointing of the base model's decoder layers, keeping the prefix cache."""
        options = dict(activation_checkpointing_kwargs or {})
        if options.get("use_reentrant", False):
            raise ValueError("P-Tuning v2 needs non-reentrant gradient checkpointing: set "
                             "gradient_checkpointing_kwargs={'use_reentrant': False} (reentrant checkpointing "
                             "would backpropagate through the prefix encoder once per layer, and breaks ZeRO-3)")
        options["use_reentrant"] = False
        layers = self._checkpointed_layers()
        if layers and not hasattr(type(layers[0]), "_can_checkpoint_with_cache"):
            raise RuntimeError("this transformers version drops the cache in checkpointed layers, which loses the "
                               "prefix; install the pinned transformers (see requirements.txt)")
        enable = getattr(self.base_model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs=options, **kwargs)
        else:
            self.base_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options, **kwargs)
        # The prefix cache only reads, so a replayed layer sees the same keys: safe to keep it.
        for layer in layers:
            layer._can_checkpoint_with_cache = True

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **kwargs):
        self.activation_checkpointing_enable(activation_checkpointing_kwargs=gradient_checkpointing_kwargs, **kwargs)

    def gradient_checkpointing_disable(self):
        disable = getattr(self.base_model, "activation_checkpointing_disable", None)
        (disable or self.base_model.gradient_checkpointing_disable)()
        for layer in self._checkpointed_layers():
            layer.__dict__.pop("_can_checkpoint_with_cache", None)

    activation_checkpointing_disable = gradient_checkpointing_disable

    def _checkpointed_layers(self) -> list[nn.Module]:
        from transformers.modeling_layers import GradientCheckpointingLayer

        return [module for module in self.base_model.modules() if isinstance(module, GradientCheckpointingLayer)]

    # ---- saving and loading ------------------------------------------------------------------

    def prefix_state_dict(self) -> dict[str, torch.Tensor]:
        """The prefix encoder's weights, fp32 on CPU. Under ZeRO-3 this gathers the partitioned
        parameters: call it on every rank."""
        params = list(self.prefix_encoder.parameters())
        if any(hasattr(param, "ds_id") for param in params):
            import deepspeed

            with deepspeed.zero.GatheredParameters(params):
                return _fp32_cpu(self.prefix_encoder.state_dict())
        return _fp32_cpu(self.prefix_encoder.state_dict())

    def save_pretrained(self, save_directory: str, is_main_process: bool = True, **_ignored) -> None:
        """Writes only the prefix: prefix_config.json (settings + format marker) and
        prefix_encoder.safetensors (fp32). Under ZeRO-3 call it on every rank."""
        state = self.prefix_state_dict()
        if not is_main_process:
            return
        os.makedirs(save_directory, exist_ok=True)
        save_file(state, os.path.join(save_directory, PREFIX_WEIGHTS_FILE), metadata={"format": "pt"})
        respect_umask(save_directory)
        with open(os.path.join(save_directory, PREFIX_CONFIG_FILE), "w", encoding="utf-8") as f:
            json.dump({"format": PREFIX_FORMAT, **self.settings}, f, indent=2)
            f.write("\n")
        logger.info("Saved the P-Tuning v2 prefix (%d positions) to %s", self.pre_seq_len, save_directory)

    def load_prefix(self, checkpoint_dir: str) -> None:
        """Loads a prefix checkpoint (either format) into this model's encoder; its settings must match.
        Under ZeRO-3 call it on every rank."""
        settings, state = load_prefix_state(checkpoint_dir)
        mismatched = [f"{key}: checkpoint {settings[key]!r}, model {self.settings[key]!r}"
                      for key in ("pre_seq_len", "prefix_projection", "prefix_hidden_size", "num_layers",
                                  "num_kv_heads", "head_dim") if settings[key] != self.settings[key]]
        if mismatched:
            raise ValueError(f"{checkpoint_dir} does not fit this prefix model ({'; '.join(mismatched)})")
        params = list(self.prefix_encoder.parameters())
        if any(hasattr(param, "ds_id") for param in params):  # ZeRO-3: fill the gathered weights, re-partition
            import deepspeed

            with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
                self.prefix_encoder.load_state_dict(state)
        else:
            self.prefix_encoder.load_state_dict(state)

    @classmethod
    def from_pretrained(cls, base_model: nn.Module, checkpoint_dir: str, pre_seq_len: int | None = None,
                        trainable: bool = False, prefix_dropout: float = 0.1,
                        base_model_name_or_path: str | None = None) -> "PrefixTuningModel":
        """The base model plus the prefix saved in `checkpoint_dir` (this toolkit's format or the
        original ChatGLM3 one); all settings come from the checkpoint. Frozen and in eval mode
        unless `trainable`. `base_model_name_or_path` is the base recorded when it is saved again
        (default: the one the checkpoint names)."""
        settings = read_prefix_settings(checkpoint_dir)
        if pre_seq_len is not None and pre_seq_len != settings["pre_seq_len"]:
            raise ValueError(f"pre_seq_len {pre_seq_len} was asked for, but the checkpoint {checkpoint_dir} was "
                             f"trained with pre_seq_len {settings['pre_seq_len']}; drop the option (it is read "
                             "from the checkpoint) or pass the matching value")
        _check_fits_base(settings, base_model.config, checkpoint_dir)
        model = cls(base_model, settings["pre_seq_len"], settings["prefix_projection"],
                    settings["prefix_hidden_size"], prefix_dropout=prefix_dropout,
                    base_model_name_or_path=base_model_name_or_path or settings.get("base_model_name_or_path"))
        model.load_prefix(checkpoint_dir)
        if not trainable:
            model.prefix_encoder.requires_grad_(False)
            model.eval()
        return model


# ---- checkpoint files ------------------------------------------------------------------------

def read_prefix_settings(checkpoint_dir: str) -> dict[str, Any]:
    """The settings of a P-Tuning checkpoint (either format) without loading weights, plus "format"."""
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


def load_prefix_state(checkpoint_dir: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(settings, prefix encoder state dict in fp32) of a P-Tuning checkpoint in either format."""
    settings = read_prefix_settings(checkpoint_dir)
    if settings["format"] == PREFIX_FORMAT:
        state = load_file(os.path.join(checkpoint_dir, PREFIX_WEIGHTS_FILE))
    else:
        state = _load_original_prefix_weights(_original_weights_file(checkpoint_dir))
    state = _fp32_cpu(state)
    _check_state_shapes(settings, state, checkpoint_dir)
    return settings, state


def _read_our_settings(checkpoint_dir: str, config_path: str) -> dict[str, Any]:
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    if config.get("format") != PREFIX_FORMAT:
        raise ValueError(f"{config_path} has format {config.get('format')!r}, expected {PREFIX_FORMAT!r}")
    missing = [key for key in SETTING_KEYS if key not in config]
    if missing:
        raise ValueError(f"{config_path} lacks the settings {', '.join(missing)}")
    if not os.path.isfile(os.path.join(checkpoint_dir, PREFIX_WEIGHTS_FILE)):
        raise FileNotFoundError(f"{checkpoint_dir} has {PREFIX_CONFIG_FILE} but no {PREFIX_WEIGHTS_FILE}")
    return {"format": PREFIX_FORMAT, **{key: config[key] for key in SETTING_KEYS}}


def _read_original_settings(checkpoint_dir: str, config_path: str) -> dict[str, Any]:
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
    return {
        "format": ORIGINAL_FORMAT,
        "pre_seq_len": int(config["pre_seq_len"]),
        "prefix_projection": projection,
        "prefix_hidden_size": config.get("hidden_size") if projection else None,
        "num_layers": int(num_layers),
        "num_kv_heads": int(num_kv_heads),
        "head_dim": int(head_dim),
        "base_model_name_or_path": config.get("_name_or_path") or None,
    }


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


def _expected_shapes(settings: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    kv_size = settings["num_layers"] * 2 * settings["num_kv_heads"] * settings["head_dim"]
    shapes = {"embedding.weight": (settings["pre_seq_len"], kv_size)}
    if settings["prefix_projection"]:
        width = settings["prefix_hidden_size"]
        shapes.update({"trans.0.weight": (width, kv_size), "trans.0.bias": (width,),
                       "trans.2.weight": (kv_size, width), "trans.2.bias": (kv_size,)})
    return shapes


def _check_state_shapes(settings: dict[str, Any], state: dict[str, torch.Tensor], checkpoint_dir: str) -> None:
    shapes = {key: tuple(value.shape) for key, value in state.items()}
    wanted = _expected_shapes(settings)
    if shapes != wanted:
        raise ValueError(f"the prefix weights in {checkpoint_dir} do not match its settings {settings}: "
                         f"found {shapes}, expected {wanted}")


def _check_fits_base(settings: dict[str, Any], config, checkpoint_dir: str) -> None:
    model_dims = {
        "num_layers": config.num_hidden_layers,
        "num_kv_heads": getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
        "head_dim": getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
    }
    mismatched = [f"{key} {settings[key]} (model: {value})" for key, value in model_dims.items()
                  if settings[key] != value]
    if mismatched:
        raise ValueError(f"the prefix in {checkpoint_dir} was trained for another model: {', '.join(mismatched)}; "
                         f"it was trained on {settings.get('base_model_name_or_path') or 'an unnamed model'}")


def _fp32_cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: value.detach().to("cpu", torch.float32).contiguous() for key, value in state.items()}


def _first_float_dtype(model: nn.Module) -> torch.dtype:
    for param in model.parameters():
        if param.is_floating_point():
            return param.dtype
    return torch.float32


def _first_device(model: nn.Module) -> torch.device:
    device = next((param.device for param in model.parameters()), torch.device("cpu"))
    return torch.device("cpu") if device.type == "meta" else device


def _cache_argument_name(model: nn.Module) -> str:
    """`cache` in transformers >= 5.2x, `past_key_values` before (a wrong name would be silently ignored)."""
    parameters = inspect.signature(model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


__all__ = ["PrefixEncoder", "PrefixCache", "PrefixTuningModel", "read_prefix_settings", "load_prefix_state",
           "real_token_positions", "PREFIX_FORMAT", "ORIGINAL_FORMAT"]
