"""The run a finetune.py command would start, read into a `RunSpec` from its own parsed options.

The model's config comes from its folder (no weights are read). The rows planned for are the
data's longest after the length caps, tokenized as finetune.py tokenizes them (same functions,
same cache), or, when the data file or the tokenizer is not there yet, rows as long as the caps
(every position after the prompt a target: the most a batch can hold). The dtype is the one the
run would load on its GPU (planning happens where that GPU is not).
"""

from __future__ import annotations

import json
import math
import os
import random

import numpy as np
import torch

from ..data.encoding import IGNORE_INDEX
from .deepspeed_rules import zero_dtype
from .spec import Row, RunSpec


class PlanInputError(ValueError):
    """The run cannot be planned as given; the message says what to do."""


def read_config(model_path: str, trust_remote_code: bool = False):
    from transformers import AutoConfig

    from ..model.checkpoint_folders import is_original_chatglm

    if not os.path.isfile(os.path.join(model_path, "config.json")):
        raise PlanInputError(f"{model_path}: no config.json (the plan reads the model's shape from it)")
    if is_original_chatglm(model_path):
        raise PlanInputError(f"{model_path} is an original ChatGLM3 checkpoint: convert it once with "
                             f"`.venv/bin/python scripts/convert_chatglm3.py --input {model_path} --output <new folder>` "
                             f"and plan (and train) the converted folder")
    try:
        return AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise PlanInputError(f"{model_path}: {e}") from None


def planned_dtype(torch_dtype: str | None, frozen_base: bool, use_cpu: bool, gpu_bf16: bool = True,
                  deepspeed_dtype: torch.dtype | None = None) -> torch.dtype:
    """model.loading.resolve_dtype on the run's machine: `auto` puts a frozen base (P-Tuning, LoRA) in
    bf16 on a GPU that has it (fp16 on one that has not), trained weights under DeepSpeed in its
    bf16/fp16 (`deepspeed_dtype`), and other trained weights or any CPU run in fp32."""
    from ..model.loading import DTYPES

    if torch_dtype and torch_dtype != "auto":
        return DTYPES[torch_dtype]
    if frozen_base and not use_cpu:
        return torch.bfloat16 if gpu_bf16 else torch.float16
    if not frozen_base and deepspeed_dtype is not None and deepspeed_dtype != torch.float32:
        return deepspeed_dtype
    return torch.float32


def deepspeed_config(value) -> dict | None:
    if not value:
        return None
    if isinstance(value, dict):
        return value
    if value.lstrip().startswith("{"):
        return json.loads(value)
    with open(value, encoding="utf-8") as f:
        return json.load(f)


# ---- the rows ---------------------------------------------------------------------------------------

def cap_rows(data_args, count: int, vocab_size: int) -> tuple[list[Row], str]:
    """Rows as long as the caps allow, the most targets each can hold."""
    from ..data.training_data import caps_text, caps_to_check

    limits = caps_to_check(data_args)
    rng = random.Random(0)
    rows = []
    for _ in range(count):
        if limits.max_seq_length and (not limits.max_source_length or limits.max_seq_length >= (
                limits.max_source_length + limits.max_target_length + 1)):
            length, prompt = limits.max_seq_length, 2
        else:
            length, prompt = limits.max_source_length + limits.max_target_length + 1, limits.max_source_length
        ids = tuple(rng.randrange(3, min(vocab_size, 64789)) for _ in range(length))
        rows.append(Row(ids, (IGNORE_INDEX,) * prompt + ids[prompt:]))
    return rows, f"rows as long as the caps ({caps_text(limits)}), every answer position a target"


def _targets(labels) -> int:
    return sum(1 for label in labels[1:] if label != IGNORE_INDEX)


class TokenizedRecords:
    """Lengths and target counts of a tokenized `datasets.Dataset`, read from its Arrow data in
    batches (a large data set never becomes Python lists), and the few rows a plan needs."""

    def __init__(self, dataset, batch_size: int = 4096):
        self.dataset = dataset
        lengths, targets = [], []
        for table in dataset.with_format("arrow").iter(batch_size=batch_size):
            labels = table.column("labels").combine_chunks()
            offsets = labels.offsets.to_numpy()
            flat = labels.flatten().to_numpy()
            row_lengths = np.diff(offsets)
            supervised = flat != IGNORE_INDEX
            starts = offsets[:-1] - offsets[0]
            supervised[starts] = False  # label 0 of a record is never a target (the shift)
            lengths.append(row_lengths)
            targets.append(np.add.reduceat(supervised, starts) if len(starts) else np.zeros(0, dtype=np.int64))
        self.lengths = np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.int64)
        self.targets = np.concatenate(targets) if targets else np.zeros(0, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.lengths)

    def rows(self, indices: list[int]) -> list[dict]:
        picked = self.dataset.select(indices)
        return [{"input_ids": list(r["input_ids"]), "labels": list(r["labels"])} for r in picked]

    def typical(self) -> dict:
        lengths = self.lengths.astype(np.float64)
        return {"tokens": float(lengths.mean()), "targets": float(self.targets.mean()),
                "square": float((lengths ** 2).mean()), "records": len(self)}

    def longest_rows(self, count: int) -> list[Row]:
        """The `count` longest records (more targets first among equals): the batch that needs most."""
        order = np.lexsort((-self.targets, -self.lengths))[:count]
        return [Row(tuple(r["input_ids"]), tuple(r["labels"])) for r in self.rows([int(i) for i in order])]

    def packed_rows(self, row_length: int, count: int) -> list[Row]:
        """The records packed as finetune.py packs them (data.packing); the `count` fullest rows."""
        from ..data.packing import concatenate_records, pack_lengths

        members = pack_lengths(self.lengths.tolist(), row_length)
        members.sort(key=lambda row: (-int(self.lengths[row].sum()), -int(self.targets[row].sum())))
        rows = [concatenate_records(self.rows(row)) for row in members[:count]]
        return [Row(tuple(r["input_ids"]), tuple(r["labels"]), tuple(r["position_ids"]), tuple(r["seq_lens"]))
                for r in rows]


def data_records(model_args, data_args, training_args) -> tuple[TokenizedRecords | None, str]:
    """The training records tokenized as finetune.py does, or (None, why not)."""
    from ..data.records import DataError
    from ..data.training_data import load_split, read_split_records
    from ..format.tokenizer import load_tokenizer

    if not data_args.train_file or not os.path.exists(data_args.train_file):
        return None, f"{data_args.train_file or 'no --train_file'}: not there yet"
    tokenizer_path = model_args.tokenizer_name or model_args.model_name_or_path
    try:
        tokenizer = load_tokenizer(tokenizer_path)
    except FileNotFoundError as e:
        return None, f"no tokenizer to read the data with ({e})"
    do_train = training_args.do_train
    training_args.do_train = True  # the plan reads the training split whatever the command does
    try:
        source, records = read_split_records(data_args, training_args)["train"]
        dataset, _ = load_split(source, None, tokenizer, data_args, training_args, "training", records=records)
    except DataError as e:
        raise PlanInputError(str(e)) from None
    finally:
        training_args.do_train = do_train
    return TokenizedRecords(dataset), f"{source}: {len(dataset)} records"


def typical_record(features: list[dict]) -> dict:
    """Per record: mean tokens, mean supervised targets and mean squared length (for attention)."""
    lengths = [len(f["input_ids"]) for f in features]
    n = max(len(lengths), 1)
    return {"tokens": sum(lengths) / n, "targets": sum(_targets(f["labels"]) for f in features) / n,
            "square": sum(x * x for x in lengths) / n, "records": len(lengths)}


def _record_format(data_args) -> str | None:
    from ..data.formats import FIXED_RECORD_FORMAT

    return getattr(data_args, "resolved_format", None) or FIXED_RECORD_FORMAT.get(data_args.train_format)


# ---- the whole run ----------------------------------------------------------------------------------

def _world(training_args, gpus_per_node: int | None, nodes: int | None) -> tuple[int, int]:
    if gpus_per_node:
        return gpus_per_node, nodes or 1
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    return local, max(world // max(local, 1), 1)


def _steps(training_args, records: int, micro_batch: int, world: int) -> int | None:
    """Optimizer steps of the run: --max_steps, else the epochs over the records (None: no data to count)."""
    if training_args.max_steps and training_args.max_steps > 0:
        return training_args.max_steps
    if not records:
        return None
    per_epoch = math.ceil(records / max(micro_batch * world, 1))
    return max(math.ceil(per_epoch / training_args.gradient_accumulation_steps) * math.ceil(training_args.num_train_epochs), 1)


def _save_steps(training_args, steps: int | None) -> int | None:
    strategy = getattr(training_args.save_strategy, "value", training_args.save_strategy)
    if strategy != "steps" or (steps is None and training_args.save_steps < 1):
        return None
    value = training_args.save_steps
    return max(int(math.ceil(value * steps)), 1) if value < 1 else int(value)


def run_spec(model_args, data_args, training_args, gpus_per_node: int | None = None, nodes: int | None = None,
             gpu_bf16: bool = True, dataset=None) -> RunSpec:
    """The RunSpec of the run these parsed finetune.py options describe. `dataset`: the training
    split finetune.py already tokenized (before packing); read here when not given."""
    from ..data.training_data import max_sequence_length, packing_row_length

    config = read_config(model_args.model_name_or_path, model_args.trust_remote_code)
    method = model_args.tuning_method
    pre_seq_len, projection, prefix_hidden = model_args.pre_seq_len, model_args.prefix_projection, model_args.prefix_hidden_size
    if model_args.ptuning_checkpoint:
        from ..model.ptuning.prefix_checkpoint import read_prefix_settings

        settings = read_prefix_settings(model_args.ptuning_checkpoint)
        pre_seq_len, projection, prefix_hidden = settings.pre_seq_len, settings.prefix_projection, settings.prefix_hidden_size
    gpus, node_count = _world(training_args, gpus_per_node, nodes)
    micro_batch = training_args.per_device_train_batch_size
    if dataset is None:
        records, why = data_records(model_args, data_args, training_args)
    else:
        records, why = TokenizedRecords(dataset), f"{data_args.train_file}: {len(dataset)} records"
    if records is not None and len(records):
        if data_args.packing:
            row_length = packing_row_length(data_args, int(records.lengths.max()))
            rows = records.packed_rows(row_length, micro_batch)
            source = f"{why}, packed into rows of {row_length} tokens: the {len(rows)} fullest"
        else:
            rows = records.longest_rows(micro_batch)
            source = f"{why}: the {len(rows)} longest after the caps ({len(rows[0].input_ids)} tokens)"
        typical = records.typical()
    else:
        rows, source = cap_rows(data_args, micro_batch, config.vocab_size)
        source = f"{source} ({why})"
        typical = {**typical_record([r.as_feature() for r in rows]), "records": 0}
        if data_args.packing:
            from ..data.packing import pack_features

            row_length = packing_row_length(data_args, len(rows[0].input_ids))
            copies = [r.as_feature() for r in rows] * max(row_length // len(rows[0].input_ids), 1)
            rows = [Row(tuple(r["input_ids"]), tuple(r["labels"]), tuple(r["position_ids"]), tuple(r["seq_lens"]))
                    for r in pack_features(copies, row_length)[:micro_batch]]
    mixed = "bf16" if training_args.bf16 else "fp16" if training_args.fp16 else None
    deepspeed = deepspeed_config(training_args.deepspeed)
    use_cpu = bool(getattr(training_args, "use_cpu", False))
    dtype = planned_dtype(model_args.torch_dtype, method != "full", use_cpu, gpu_bf16,
                          zero_dtype(deepspeed, mixed) if deepspeed is not None else None)
    world = gpus * node_count
    steps = _steps(training_args, typical["records"], micro_batch, world)
    caps = {"max_seq_length": data_args.max_seq_length, "max_source_length": data_args.max_source_length,
            "max_target_length": data_args.max_target_length, "format": _record_format(data_args)}
    return RunSpec(
        model_path=model_args.model_name_or_path, config=config, method=method, weights_dtype=dtype,
        mixed_precision=mixed, rows=tuple(rows), rows_source=source, micro_batch=micro_batch,
        grad_accum=training_args.gradient_accumulation_steps, packing=data_args.packing,
        pad_to_multiple_of=data_args.pad_to_multiple_of,
        pad_to_length=max_sequence_length(data_args) if data_args.pad_to_max_length else None,
        attn_implementation=model_args.attn_implementation,
        gradient_checkpointing=bool(training_args.activation_checkpointing),
        loss_on_targets_only=data_args.loss_on_targets_only, loss_chunk_size=data_args.loss_chunk_size,
        pre_seq_len=pre_seq_len, prefix_projection=projection, prefix_hidden_size=prefix_hidden,
        prefix_dropout=model_args.prefix_dropout, lora_rank=model_args.lora_rank, lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout, lora_target=model_args.lora_target,
        quantization_bit=model_args.quantization_bit, optim=getattr(training_args.optim, "value", training_args.optim),
        max_grad_norm=training_args.max_grad_norm or 0.0, deepspeed=deepspeed, gpus_per_node=gpus, nodes=node_count,
        steps=steps, save_steps=_save_steps(training_args, steps), save_total_limit=training_args.save_total_limit,
        save_every_minutes=getattr(training_args, "save_every_minutes", 0) or 0, caps=caps, typical=typical,
        use_cpu=use_cpu)


__all__ = ["PlanInputError", "run_spec", "read_config", "planned_dtype", "cap_rows", "TokenizedRecords"]
