"""The switch that makes a model's training forward use the targets-only loss, and the loss
contract with the HF Trainer (`accepts_loss_kwargs`, the label shift in `supervised_loss.shift_labels`).

`use_supervised_loss(model)` turns it on: a model class that reads the switch
(`SupervisedLossSwitch`, e.g. the P-Tuning wrapper) computes the loss inside its own forward; a
transformers causal LM is given the switch by a class swap to a cached same-name subclass.
"""

from __future__ import annotations

import functools

import torch
from transformers.modeling_outputs import CausalLMOutputWithPast

from .supervised_loss import DEFAULT_CHUNK_SIZE, supervised_lm_loss


class SupervisedLossSwitch:
    """A model whose forward reads the switch `supervised_loss`: in training, with labels and the
    switch on, the loss is `supervised_lm_loss` and the output holds only the loss.

    The loss contract with the HF Trainer: `accepts_loss_kwargs` (forward takes
    `num_items_in_batch`, the target count over all micro-batches and ranks, and divides the
    summed loss by it) and the label shift (`shift_labels`), which the Trainer is told about
    (`compat.declare_causal_label_shift`) so it counts targets the same way for every model.
    """

    supervised_loss = False
    loss_chunk_size = DEFAULT_CHUNK_SIZE  # targets per output-layer call (--loss_chunk_size)
    accepts_loss_kwargs = True

    def uses_supervised_loss(self, labels) -> bool:
        return labels is not None and self.training and self.supervised_loss


class SupervisedLossForward(SupervisedLossSwitch):
    """Gives a transformers causal LM class the switch: placed before it in the MRO by
    `use_supervised_loss`; everything but a supervised training forward is the class's own."""

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, labels=None, **kwargs):
        if not self.uses_supervised_loss(labels) or kwargs.get("inputs_embeds") is not None:
            return super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                   labels=labels, **kwargs)
        for unused in ("return_dict", "output_attentions", "output_hidden_states", "logits_to_keep"):
            kwargs.pop(unused, None)
        loss, _ = supervised_lm_loss(self, labels, kwargs.pop("num_items_in_batch", None),
                                     chunk_size=self.loss_chunk_size, input_ids=input_ids,
                                     attention_mask=attention_mask, position_ids=position_ids, **kwargs)
        return CausalLMOutputWithPast(loss=loss)


@functools.lru_cache(maxsize=None)
def with_supervised_loss(model_class: type) -> type:
    """`model_class` with the switch: same name and module (so saved configs name the original
    architecture), SupervisedLossForward first in its MRO."""
    return type(model_class.__name__, (SupervisedLossForward, model_class),
                {"__module__": model_class.__module__, "__qualname__": model_class.__qualname__})


def use_supervised_loss(model: torch.nn.Module, enabled: bool = True, chunk_size: int | None = None) -> torch.nn.Module:
    """Turns the supervised loss on (or off) for a model's TRAINING forward with labels, its output
    layer in chunks of `chunk_size` targets (default DEFAULT_CHUNK_SIZE); returns the model.

    A model that reads the switch (the P-Tuning wrapper) gets it set. A transformers causal LM (or
    the one inside a peft model) becomes an instance of `with_supervised_loss(its class)`, a subclass
    that reads it; evaluation, generation and saving stay the class's own. The loss runs inside
    the model's forward, so DDP and DeepSpeed wrappers see a normal call.
    """
    target = model if isinstance(model, SupervisedLossSwitch) else (
        model.get_base_model() if hasattr(model, "get_base_model") else model)
    if not isinstance(target, SupervisedLossSwitch):
        target.__class__ = with_supervised_loss(type(target))
    target.supervised_loss = enabled
    if chunk_size is not None:
        target.loss_chunk_size = chunk_size
    return model


__all__ = ["SupervisedLossSwitch", "SupervisedLossForward", "with_supervised_loss", "use_supervised_loss"]
