"""What a plan needs to know about a run, as plain data (`RunSpec`), and the batch it plans for.

`inputs.run_spec` reads it from finetune.py's own options; the advice re-plans changed copies
(`dataclasses.replace`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from ..data.encoding import IGNORE_INDEX


@dataclass(frozen=True)
class Row:
    """One tokenized record (or packed row) as the collator receives it."""
    input_ids: tuple[int, ...]
    labels: tuple[int, ...]
    position_ids: tuple[int, ...] | None = None  # packed rows: positions restart per record
    seq_lens: tuple[int, ...] | None = None

    def as_feature(self) -> dict:
        feature = {"input_ids": list(self.input_ids), "labels": list(self.labels)}
        if self.position_ids is not None:
            feature.update(position_ids=list(self.position_ids), seq_lens=list(self.seq_lens))
        return feature

    def cut(self, length: int) -> "Row":
        if self.position_ids is not None or len(self.input_ids) <= length:
            return self
        return Row(self.input_ids[:length], self.labels[:length])


@dataclass(frozen=True)
class RunSpec:
    """One training run as the plan sees it (per GPU: one data-parallel rank)."""
    model_path: str
    config: object  # a transformers PretrainedConfig, read from the model folder
    method: str  # full, ptuning or lora
    weights_dtype: torch.dtype  # the dtype the base model is loaded in
    mixed_precision: str | None  # bf16 or fp16 autocast (the Trainer's, not under DeepSpeed), or None
    rows: tuple[Row, ...]  # the micro-batch planned for: the longest rows of the data (or the caps)
    rows_source: str  # where the rows came from, for the report
    micro_batch: int = 1
    grad_accum: int = 1
    packing: bool = False
    pad_to_multiple_of: int | None = None
    pad_to_length: int | None = None  # --pad_to_max_length: every batch padded to the cap
    pad_token_id: int = 0
    attn_implementation: str | None = None
    gradient_checkpointing: bool = False
    loss_on_targets_only: bool = True
    loss_chunk_size: int = 4096
    pre_seq_len: int | None = None
    prefix_projection: bool = False
    prefix_hidden_size: int | None = None
    prefix_dropout: float = 0.1
    lora_rank: int | None = None
    lora_alpha: float = 32.0
    lora_dropout: float = 0.1
    lora_target: str = "q_proj,k_proj,v_proj,o_proj"
    quantization_bit: int | None = None
    optim: str = "adamw_torch_fused"
    max_grad_norm: float = 1.0
    deepspeed: dict | None = None  # the DeepSpeed config (JSON), "auto" values as given
    gpus_per_node: int = 1
    nodes: int = 1
    steps: int | None = 1  # optimizer steps of the whole run (None: unknown, no data and no --max_steps)
    save_steps: int | None = None  # a checkpoint every N steps (None: none saved by steps)
    save_total_limit: int | None = None
    save_every_minutes: float = 0
    caps: dict = field(default_factory=dict)  # the length caps, for the advice (name -> value)
    typical: dict = field(default_factory=dict)  # per record: mean tokens, targets, squared length; records
    use_cpu: bool = False  # --use_cpu: a CPU run (no GPU to fit)

    @property
    def world_size(self) -> int:
        return self.gpus_per_node * self.nodes

    @property
    def zero_stage(self) -> int | None:
        if not self.deepspeed:
            return None
        return int(self.deepspeed.get("zero_optimization", {}).get("stage", 0))

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    def replace(self, **changes) -> "RunSpec":
        return dataclasses.replace(self, **changes)


def micro_batch_features(spec: RunSpec) -> list[dict]:
    """The features of the micro-batch planned for: the first `micro_batch` rows (the longest)."""
    return [row.as_feature() for row in spec.rows[:spec.micro_batch]]


def collate(spec: RunSpec) -> dict:
    """The micro-batch as finetune.py's collator builds it (real integer tensors)."""
    from ..data.collation import DataCollatorForChatGLM, PackedCollator

    features = micro_batch_features(spec)
    if spec.packing:
        return PackedCollator()(features)
    collator = DataCollatorForChatGLM(pad_token_id=spec.pad_token_id, pad_to_multiple_of=spec.pad_to_multiple_of,
                                      max_length=spec.pad_to_length)
    return collator(features)


def batch_summary(batch: dict) -> dict:
    """Tokens, padded positions, supervised targets and record lengths of a collated batch."""
    input_ids, labels = batch["input_ids"], batch["labels"]
    if "cu_seq_lens_q" in batch:
        bounds = batch["cu_seq_lens_q"].tolist()
        lengths = [end - start for start, end in zip(bounds, bounds[1:])]
    else:
        lengths = batch["attention_mask"].sum(-1).tolist()
    targets = int((labels[:, 1:] != IGNORE_INDEX).sum())
    return {"rows": input_ids.shape[0], "padded_length": input_ids.shape[1], "positions": input_ids.numel(),
            "real_tokens": sum(lengths), "record_lengths": lengths, "supervised_tokens": targets}


__all__ = ["Row", "RunSpec", "collate", "batch_summary", "micro_batch_features"]
