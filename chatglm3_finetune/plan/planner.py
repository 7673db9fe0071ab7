"""A run's plan: the simulated step (simulate.py) turned into one GPU's peak with its parts, DeepSpeed's
share (deepspeed_rules.py), stated allowances, the verdict for a card, time, host memory and disk.

`make_plan(spec, card)` is the whole plan; `planned_peak(spec)` only the peak, for re-planning
the advice's candidates (simulated by depth: fast, and equal to the full simulation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .cards import CARDS, GIB, VERDICT_CARDS, Card
from .deepspeed_rules import zero_memory, zero_settings
from .flops import batch_flops, model_shape, recompute_flops
from .host_disk import checkpoint_bytes, host_memory_at_load, run_disk
from .ledger import ACTIVATION_PARTS
from .simulate import StepMemory, simulate, simulate_by_depth
from .spec import RunSpec

# Memory on a GPU that is not a tensor of the step (torch.cuda.max_memory_allocated does not see it).
CUDA_CONTEXT = 512 * 2 ** 20  # the CUDA context with lazily loaded kernels (torch 2.x, CUDA 12)
CUBLAS_WORKSPACES = 64 * 2 ** 20  # cuBLAS and cuBLASLt workspaces, 32 MiB each on Hopper
NCCL_BUFFERS = 512 * 2 ** 20  # NCCL's communicator buffers, with more than one process
FRAGMENTATION = 0.05  # the caching allocator's rounding and fragmentation, of the tensor peak
CLEARLY_OVER = 1.10  # a run stops before loading when the plan exceeds the card by more than this


@dataclass
class Plan:
    spec: RunSpec
    peak_bytes: int  # what must fit on one GPU: tensors + allowances
    tensor_peak_bytes: int  # the step's tensors alone (compare with torch.cuda.max_memory_allocated)
    parts: dict[str, int]
    moment: str
    card: Card | None  # what the verdict is for (None: a CPU run)
    card_source: str
    memory_bytes: int
    params: dict[str, int]
    step: StepMemory
    deepspeed_notes: list[str] = field(default_factory=list)
    time: dict = field(default_factory=dict)
    host: dict = field(default_factory=dict)
    disk: dict = field(default_factory=dict)
    cards: list[dict] = field(default_factory=list)
    advice: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.memory_bytes

    @property
    def clearly_over(self) -> bool:
        return self.peak_bytes > CLEARLY_OVER * self.memory_bytes


def allowances(spec: RunSpec, tensor_peak: int) -> dict[str, int]:
    if spec.use_cpu:
        return {}
    parts = {"CUDA context": CUDA_CONTEXT, "cuBLAS workspaces": CUBLAS_WORKSPACES}
    if spec.world_size > 1:
        parts["NCCL buffers"] = NCCL_BUFFERS
    parts["allocator fragmentation (5%)"] = int(FRAGMENTATION * tensor_peak)
    return parts


def _simulated(spec: RunSpec, full: bool) -> StepMemory:
    return simulate(spec) if full else simulate_by_depth(spec)


def tensor_parts(spec: RunSpec, step: StepMemory) -> tuple[dict[str, int], str, list[str]]:
    """The step's tensor bytes per part at the peak, DeepSpeed's model states in place of the
    simulation's under ZeRO; the moment of the peak; DeepSpeed's notes."""
    if not spec.deepspeed:
        return dict(step.peak.parts), step.peak.moment, []
    zero = _zero(spec, step)
    activations = {part: step.activation_peak.parts[part] for part in ("inputs", *ACTIVATION_PARTS)}
    backward = {**zero.backward, **activations}
    at_step = {**zero.step, "inputs": activations["inputs"]}
    notes = [f"ZeRO-{spec.zero_stage} over {spec.world_size} processes"] + zero.notes
    if sum(at_step.values()) > sum(backward.values()):
        return at_step, "optimizer step (DeepSpeed's fp32 gradient partition)", notes
    return backward, step.activation_peak.moment, notes


def _zero(spec: RunSpec, step: StepMemory):
    settings = zero_settings(spec.deepspeed, spec.config.hidden_size, spec.mixed_precision)
    return zero_memory(settings, step.trainable_params, step.peak.parts["weights"], step.total_params,
                       spec.world_size, spec.gpus_per_node)


def planned_peak(spec: RunSpec, full: bool = False) -> tuple[int, int]:
    """(peak bytes with allowances, tensor peak bytes) of a run, simulated by depth unless `full`."""
    parts, _, _ = tensor_parts(spec, _simulated(spec, full))
    tensors = sum(parts.values())
    return tensors + sum(allowances(spec, tensors).values()), tensors


# ---- time -------------------------------------------------------------------------------------------

def _plain_shape(spec: RunSpec) -> dict:
    """The FLOPs formula's shape, from an unquantized meta build of the base (no memory)."""
    from transformers import AutoModelForCausalLM

    from .fake_tensors import on_meta

    with on_meta():
        return model_shape(AutoModelForCausalLM.from_config(spec.config))


def step_flops(spec: RunSpec, shape: dict | None = None) -> float:
    """FLOPs of one optimizer step on one GPU at the data's typical record (the caps' rows when there
    is no data yet), recomputation included; padding is not counted (a lower bound)."""
    typical = spec.typical
    tokens = spec.pad_to_length or typical["tokens"]
    square = spec.pad_to_length ** 2 if spec.pad_to_length else typical["square"]
    per_micro_batch = spec.micro_batch  # records
    if spec.packing:
        row_tokens = sum(len(row.input_ids) for row in spec.rows[:spec.micro_batch])
        per_micro_batch = row_tokens / max(typical["tokens"], 1)
    record = {"real_tokens": tokens, "record_lengths": [math.sqrt(square)], "supervised_tokens": typical["targets"]}
    shape = shape or _plain_shape(spec)
    prefix = spec.pre_seq_len or 0
    one = batch_flops(shape, record, trains_weights=spec.method == "full",
                      full_logits=not spec.loss_on_targets_only, prefix_len=prefix)
    one += recompute_flops(shape, record, spec.gradient_checkpointing, None, prefix)
    targets = per_micro_batch * typical["targets"]
    chunks = recompute_flops(shape, {**record, "supervised_tokens": targets}, False,
                             spec.loss_chunk_size if spec.loss_on_targets_only else None)
    return spec.grad_accum * (per_micro_batch * one + chunks)


def time_on(card: Card, flops: float, steps: int | None) -> dict:
    per_step = flops / card.bf16_flops
    return {"card": card.name, "matmul_tflops": card.bf16_flops / 1e12, "rate_source": card.rate_source,
            "seconds_per_step": per_step, "seconds_for_run": per_step * steps if steps else None}


# ---- the whole plan ---------------------------------------------------------------------------------

def make_plan(spec: RunSpec, card: Card | None, card_source: str, memory_bytes: int | None = None,
              full: bool = True) -> Plan:
    """The plan of `spec` for one GPU `card` (its memory, or `memory_bytes` when given)."""
    step = _simulated(spec, full)
    parts, moment, ds_notes = tensor_parts(spec, step)
    tensors = sum(parts.values())
    extra = allowances(spec, tensors)
    peak = tensors + sum(extra.values())
    memory = memory_bytes if memory_bytes is not None else (card.memory_bytes if card else 0)
    shape = _plain_shape(spec)
    params = {"total": shape["params"] + (step.trainable_params if spec.method != "full" else 0),
              "trainable": step.trainable_params}
    plan = Plan(spec=spec, peak_bytes=peak, tensor_peak_bytes=tensors, parts={**parts, **extra}, moment=moment,
                card=card, card_source=card_source, memory_bytes=memory, params=params, step=step,
                deepspeed_notes=ds_notes)
    if spec.quantization_bit:
        plan.notes.append(f"{spec.quantization_bit}-bit linear layers: counted as bitsandbytes stores them, with one "
                          f"dequantized weight per matmul (fake tensors cannot run its kernels); the rest simulated")
    flops = step_flops(spec, shape)
    plan.time = {"flops_per_step": flops, "steps": spec.steps,
                 "planned": time_on(card, flops, spec.steps) if card else None}
    plan.cards = [{"card": c.name, "memory_bytes": c.memory_bytes, "fits": peak <= c.memory_bytes,
                   "spare_bytes": c.memory_bytes - peak, **time_on(c, flops, spec.steps)}
                  for c in CARDS if c.name in VERDICT_CARDS]
    plan.host = host_memory_at_load(spec.model_path, spec.config, shape["params"], spec.weights_dtype,
                                    bool(spec.quantization_bit), spec.zero_stage, spec.gpus_per_node,
                                    spec.world_size)
    if spec.deepspeed:
        plan.host["offload_per_node_bytes"] = _zero(spec, step).host_per_node
    dtype_bytes = torch.tensor([], dtype=spec.weights_dtype).element_size()
    per_checkpoint = checkpoint_bytes(spec.method, step.trainable_params, shape["params"], dtype_bytes,
                                      spec.zero_stage)
    final = per_checkpoint["weights"]
    plan.disk = {"per_checkpoint": per_checkpoint, "per_checkpoint_bytes": sum(per_checkpoint.values()),
                 "final_model_bytes": final, "save_every_minutes": spec.save_every_minutes,
                 **run_disk(sum(per_checkpoint.values()), final, spec.steps or 0, spec.save_steps, spec.save_total_limit)}
    return plan


__all__ = ["Plan", "make_plan", "planned_peak", "step_flops", "allowances", "tensor_parts", "CLEARLY_OVER", "GIB"]
