"""P-Tuning v2 for native transformers GLM models: a learned key/value prefix for every layer.

The base model stays frozen; a small fp32 `PrefixEncoder` produces, for each decoder layer, a key
and a value prefix of `pre_seq_len` positions that the layer's attention sees before the real
tokens. The prefix reaches the layers through the model's cache argument:

- training / plain forward: a read-only `PrefixCache` (prefix_cache.py), built fresh every
  forward, so gradient checkpointing can replay a layer;
- generation: a fresh `DynamicCache` filled with the prefix, which generation then extends.

In both cases the 2D attention mask is extended by `pre_seq_len` ones on the left and the real
tokens' positions start at 0, as in the original ChatGLM3 code. Prefix keys get no rotary embedding.
Checkpoints hold only the prefix (prefix_checkpoint.py: this toolkit's format or the original one).
"""

from __future__ import annotations

import dataclasses
import logging

import torch
import torch.nn as nn
from transformers import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .prefix_cache import PrefixCache
from .prefix_checkpoint import PrefixSettings, check_fits_model, fp32_cpu, load_prefix_state, read_prefix_settings, save_prefix
from ...compat import (DtypeFollowingModule, cache_argument_name, checkpointed_layers, deepspeed_master_weights,
                          keep_cache_under_checkpointing, set_deepspeed_master_weights, zero3_partitioned)
from ...train.loss_switch import SupervisedLossSwitch
from ...train.supervised_loss import supervised_lm_loss

logger = logging.getLogger(__name__)


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

    @classmethod
    def from_settings(cls, settings: PrefixSettings) -> "PrefixEncoder":
        return cls(settings.num_layers, settings.num_kv_heads, settings.head_dim, settings.pre_seq_len,
                   settings.prefix_projection, settings.prefix_hidden_size)

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


def real_token_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions 0, 1, ... of the real tokens in each row of a 2D mask (left padding gets 0)."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.clamp(min=0)


class PrefixTuningModel(SupervisedLossSwitch, DtypeFollowingModule):
    """A frozen causal LM plus a trainable fp32 prefix encoder (P-Tuning v2)."""

    supports_gradient_checkpointing = True
    main_input_name = "input_ids"

    def __init__(self, base_model: nn.Module, pre_seq_len: int, prefix_projection: bool = False,
                 prefix_hidden_size: int | None = None, prefix_dropout: float = 0.1,
                 base_model_name_or_path: str | None = None):
        super().__init__()
        self.base_model = base_model
        self.config = base_model.config
        self.settings = PrefixSettings.for_model(self.config, pre_seq_len, prefix_projection, prefix_hidden_size,
                                                 base_model_name_or_path)
        self.base_model.requires_grad_(False)
        self.prefix_encoder = PrefixEncoder.from_settings(self.settings).to(_first_device(base_model), torch.float32)
        self.prefix_dropout = nn.Dropout(prefix_dropout)
        # Read once here: under ZeRO-3 a base parameter is an empty shard at forward time.
        self._base_dtype = _first_float_dtype(base_model)
        self._cache_argument = cache_argument_name(base_model)

    @property
    def pre_seq_len(self) -> int:
        return self.settings.pre_seq_len

    @property
    def generation_config(self):
        return getattr(self.base_model, "generation_config", None)

    @property
    def device(self) -> torch.device:
        return self.prefix_encoder.prefix_tokens.device

    def _after_apply(self) -> None:
        # .to(dtype) / .half() / .bfloat16() change the base dtype the prefix is cast to.
        self._base_dtype = _first_float_dtype(self.base_model)

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
        """The one call into the base model (loss included). In training, with the supervised loss
        switched on, the output layer only runs at supervised positions (supervised_loss.py)."""
        if self.uses_supervised_loss(labels):
            loss, _ = supervised_lm_loss(self.base_model, labels, kwargs.pop("num_items_in_batch", None),
                                         chunk_size=self.loss_chunk_size, input_ids=input_ids, attention_mask=attention_mask,
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
        # The prefix cache only reads, so a replayed layer sees the same keys: safe to keep it.
        keep_cache_under_checkpointing(self._checkpointed_layers(), keep=True)
        enable = getattr(self.base_model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs=options, **kwargs)
        else:
            self.base_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options, **kwargs)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **kwargs):
        self.activation_checkpointing_enable(activation_checkpointing_kwargs=gradient_checkpointing_kwargs, **kwargs)

    def gradient_checkpointing_disable(self):
        disable = getattr(self.base_model, "activation_checkpointing_disable", None)
        (disable or self.base_model.gradient_checkpointing_disable)()
        keep_cache_under_checkpointing(self._checkpointed_layers(), keep=False)

    activation_checkpointing_disable = gradient_checkpointing_disable

    def _checkpointed_layers(self) -> list[nn.Module]:
        return checkpointed_layers(self.base_model)

    # ---- saving and loading ------------------------------------------------------------------

    def prefix_state_dict(self) -> dict[str, torch.Tensor]:
        """The prefix encoder's weights, fp32 on CPU; while DeepSpeed trains them, its optimizer's fp32
        master copy (under fp16/bf16 ZeRO-1/2 the module itself holds only their rounding). Under
        DeepSpeed this gathers the ranks' parts: call it on every rank."""
        masters = deepspeed_master_weights(self.prefix_encoder)
        if masters is not None:
            return fp32_cpu(masters)
        params = list(self.prefix_encoder.parameters())
        if zero3_partitioned(params):
            import deepspeed

            with deepspeed.zero.GatheredParameters(params):
                return fp32_cpu(self.prefix_encoder.state_dict())
        return fp32_cpu(self.prefix_encoder.state_dict())

    def save_pretrained(self, save_directory: str, is_main_process: bool = True, **_ignored) -> None:
        """Writes only the prefix: prefix_config.json (settings + format marker) and
        prefix_encoder.safetensors (fp32). Under ZeRO-3 call it on every rank."""
        state = self.prefix_state_dict()
        if not is_main_process:
            return
        save_prefix(save_directory, self.settings, state)
        logger.info("Saved the P-Tuning v2 prefix (%d positions) to %s", self.pre_seq_len, save_directory)

    def load_prefix(self, checkpoint_dir: str) -> None:
        """Loads a prefix checkpoint (either format) into this model's encoder (and into the fp32 master copy
        of a DeepSpeed optimizer that trains it); its settings must match. Under DeepSpeed call it on every rank."""
        settings, state = load_prefix_state(checkpoint_dir)
        mismatched = self.settings.shape_differences(settings)
        if mismatched:
            raise ValueError(f"{checkpoint_dir} does not fit this prefix model ({'; '.join(mismatched)})")
        params = list(self.prefix_encoder.parameters())
        if zero3_partitioned(params):  # fill the gathered weights, re-partition
            import deepspeed

            with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
                self.prefix_encoder.load_state_dict(state)
        else:
            self.prefix_encoder.load_state_dict(state)
        set_deepspeed_master_weights(self.prefix_encoder, state)  # the fp32 copy a DeepSpeed optimizer trains

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """As nn.Module's, except that the frozen base may be missing: it comes from its own folder, and
        what DeepSpeed checkpoints of this model hold is the prefix alone (trainer.py)."""
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        missing = [key for key in result.missing_keys if not key.startswith("base_model.")]
        if strict and (missing or result.unexpected_keys):
            raise RuntimeError(f"Error(s) in loading state_dict for {type(self).__name__}: missing keys {missing}, "
                               f"unexpected keys {result.unexpected_keys}")
        return result

    def record_base_model(self, base_model_name_or_path: str) -> None:
        """Names the base model this prefix belongs to in what save_pretrained writes."""
        self.settings = dataclasses.replace(self.settings, base_model_name_or_path=base_model_name_or_path)

    @classmethod
    def from_pretrained(cls, base_model: nn.Module, checkpoint_dir: str, pre_seq_len: int | None = None,
                        trainable: bool = False, prefix_dropout: float = 0.1,
                        base_model_name_or_path: str | None = None) -> "PrefixTuningModel":
        """The base model plus the prefix saved in `checkpoint_dir` (this toolkit's format or the
        original ChatGLM3 one); all settings come from the checkpoint. Frozen and in eval mode
        unless `trainable`. `base_model_name_or_path` is the base recorded when it is saved again
        (default: the one the checkpoint names)."""
        settings = read_prefix_settings(checkpoint_dir)
        if pre_seq_len is not None and pre_seq_len != settings.pre_seq_len:
            raise ValueError(f"pre_seq_len {pre_seq_len} was asked for, but the checkpoint {checkpoint_dir} was "
                             f"trained with pre_seq_len {settings.pre_seq_len}; drop the option (it is read "
                             "from the checkpoint) or pass the matching value")
        check_fits_model(settings, base_model.config, checkpoint_dir)
        model = cls(base_model, settings.pre_seq_len, settings.prefix_projection, settings.prefix_hidden_size,
                    prefix_dropout=prefix_dropout,
                    base_model_name_or_path=base_model_name_or_path or settings.base_model_name_or_path)
        model.load_prefix(checkpoint_dir)
        if not trainable:
            model.prefix_encoder.requires_grad_(False)
            model.eval()
        return model


def _first_float_dtype(model: nn.Module) -> torch.dtype:
    for param in model.parameters():
        if param.is_floating_point():
            return param.dtype
    return torch.float32


def _first_device(model: nn.Module) -> torch.device:
    device = next((param.device for param in model.parameters()), torch.device("cpu"))
    return torch.device("cpu") if device.type == "meta" else device


__all__ = ["PrefixEncoder", "PrefixTuningModel", "real_token_positions"]
