"""What to change when a run does not fit: the cheapest changes first, each re-planned on its own.

Candidates, in the order of what they cost (time, quality, money): the targets-only loss (free),
smaller loss chunks (a little recomputation), a smaller micro-batch with more accumulation (the
same effective batch), gradient checkpointing (a third more compute), ZeRO-3 (communication),
an 8- or 4-bit base (quality), CPU offload (much slower steps), shorter length caps (data cut),
more GPUs. Each applicable one is re-planned (`planner.planned_peak`); the first few that fit are
the advice. When none fits alone, they are combined in the same order until the run fits.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .spec import RunSpec

ENOUGH = 3  # advice lists at most this many changes that fit
SMALL_CHUNK = 1024
CONFIGS = Path(__file__).resolve().parents[2] / "configs"  # the project's DeepSpeed configs


@dataclass
class Change:
    what: str  # in words
    how: str  # the flags or launcher variables
    spec: RunSpec


def _config(name: str) -> dict | None:
    path = CONFIGS / name
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _max_targets(spec: RunSpec) -> int:
    return sum(sum(1 for label in row.labels[1:] if label != -100) for row in spec.rows[:spec.micro_batch])


def _length_flags(spec: RunSpec, length: int) -> str:
    caps = spec.caps
    if caps.get("format") == "input-output":
        target = caps.get("max_target_length") or 0
        if length - target - 1 >= 3:
            return f"--max_source_length {length - target - 1} (MAX_SOURCE_LEN)"
        return f"--max_source_length {max(length // 2, 3)} --max_target_length {max(length - length // 2 - 1, 1)}"
    return f"--max_seq_length {length} (MAX_SEQ_LEN)"


def candidates(spec: RunSpec) -> list[Change]:
    """The changes that apply to this run, cheapest first."""
    changes = []
    if not spec.loss_on_targets_only:
        changes.append(Change("the output layer and loss at targets only", "drop --no_loss_on_targets_only",
                              spec.replace(loss_on_targets_only=True)))
    if spec.loss_on_targets_only and _max_targets(spec) > SMALL_CHUNK and spec.loss_chunk_size > SMALL_CHUNK:
        changes.append(Change(f"loss chunks of {SMALL_CHUNK} targets", f"--loss_chunk_size {SMALL_CHUNK}",
                              spec.replace(loss_chunk_size=SMALL_CHUNK)))
    batch = spec.micro_batch // 2
    while batch >= 1:
        accumulation = spec.grad_accum * spec.micro_batch // batch
        changes.append(Change(f"micro-batch {batch} with accumulation {accumulation} (same effective batch)",
                              f"--per_device_train_batch_size {batch} --gradient_accumulation_steps {accumulation} "
                              f"(DEV_BATCH_SIZE={batch} GRAD_ACCUMULARION_STEPS={accumulation})",
                              spec.replace(micro_batch=batch, grad_accum=accumulation)))
        batch //= 2
    if not spec.gradient_checkpointing:
        changes.append(Change("gradient checkpointing", "--activation_checkpointing",
                              spec.replace(gradient_checkpointing=True)))
    zero3 = _config("ds_zero3.json")
    if zero3 and spec.world_size > 1 and spec.zero_stage != 3 and not spec.quantization_bit:
        changes.append(Change(f"DeepSpeed ZeRO-3 over the {spec.world_size} GPUs", "--deepspeed configs/ds_zero3.json "
                              "(DS_CONFIG=configs/ds_zero3.json)", spec.replace(deepspeed=zero3)))
    if spec.method != "full" and not spec.quantization_bit and not spec.deepspeed:
        for bits in (8, 4):
            changes.append(Change(f"{'an' if bits == 8 else 'a'} {bits}-bit base", f"--quantization_bit {bits}",
                                  spec.replace(quantization_bit=bits)))
    offload = _config("ds_zero3_offload.json")
    if offload and not spec.quantization_bit and not _offloads(spec.deepspeed):
        changes.append(Change("DeepSpeed ZeRO-3 with CPU offload (parameters and optimizer states in host memory)",
                              "--deepspeed configs/ds_zero3_offload.json (DS_CONFIG=configs/ds_zero3_offload.json)",
                              spec.replace(deepspeed=offload)))
    longest = max(len(row.input_ids) for row in spec.rows)
    for fraction in (0.75, 0.5):
        length = int(longest * fraction)
        if length >= 64 and not spec.packing:
            changes.append(Change(f"rows of at most {length} tokens (shorter caps)", _length_flags(spec, length),
                                  spec.replace(rows=tuple(row.cut(length) for row in spec.rows),
                                               pad_to_length=min(spec.pad_to_length, length) if spec.pad_to_length else None)))
    if spec.deepspeed and spec.gpus_per_node < 8:
        gpus = min(spec.gpus_per_node * 2, 8)
        changes.append(Change(f"{gpus} GPUs per node (ZeRO partitions over more processes)", f"NUM_GPUS={gpus}",
                              spec.replace(gpus_per_node=gpus)))
    return changes


def _offloads(config: dict | None) -> bool:
    zero = (config or {}).get("zero_optimization", {})
    return any((zero.get(key) or {}).get("device", "none") != "none" for key in ("offload_optimizer", "offload_param"))


def advise(spec: RunSpec, memory_bytes: int, peak_of: Callable[[RunSpec], int],
           enough: int = ENOUGH) -> list[dict]:
    """Changes that make `spec` fit in `memory_bytes`, cheapest first, each with its own planned peak."""
    found, tried = [], []
    for change in candidates(spec):
        peak = peak_of(change.spec)
        tried.append((change, peak))
        if peak <= memory_bytes:
            found.append({"change": change.what, "how": change.how, "peak_bytes": peak})
            if len(found) >= enough:
                return found
    if found or not tried:
        return found
    combined, names, hows = spec, [], []
    for change, _ in tried:
        if change.what.startswith(("micro-batch", "rows of")) and any(n.startswith(change.what.split()[0]) for n in names):
            continue  # one micro-batch size and one cap at a time
        combined = _apply(combined, spec, change.spec)
        names.append(change.what)
        hows.append(change.how)
        peak = peak_of(combined)
        if peak <= memory_bytes:
            return [{"change": " + ".join(names), "how": "; ".join(hows), "peak_bytes": peak}]
    return []


def _apply(current: RunSpec, original: RunSpec, changed: RunSpec) -> RunSpec:
    """`current` with the fields in which `changed` differs from `original`."""
    fields = {name: getattr(changed, name) for name in original.__dataclass_fields__
              if getattr(changed, name) is not getattr(original, name)}
    return current.replace(**fields)


__all__ = ["Change", "candidates", "advise"]
