"""What DeepSpeed ZeRO keeps on each GPU (and in host memory), by DeepSpeed's own rules.

The simulation runs the model without DeepSpeed; under ZeRO the model states (16-bit parameters,
gradients, fp32 master weights and Adam moments) are DeepSpeed's, partitioned over the processes,
and replace the simulation's. Per trainable parameter and GPU, with N processes and 16-bit width d:
  stage 1: d (parameter) + d (gradient) + 12/N (fp32 master, m, v)
  stage 2: d + d/N + 12/N
  stage 3: d/N + d/N + 12/N, plus the parameters gathered while layers run: at most
           stage3_max_live_parameters (DeepSpeed releases above it) and the prefetch bucket
and, during the optimizer step only (the activations are gone by then), 4/N for the fp32 copy of
the gradient partition: ZeRO-2 at the step is then exactly DeepSpeed's own estimate
(`estimate_zero2_model_states_mem_needs`: 2 + 18/N bytes). offload_optimizer moves gradients,
master weights and moments to host memory; offload_param (stage 3) the 16-bit parameter
partitions as well. Frozen parameters (P-Tuning, LoRA) are 16-bit weights, partitioned under
stage 3. Buffers: the gradient reduce buckets during the backward (reduce_bucket_size elements,
two with overlap_comm in stages 1-2), the allgather bucket at the step (stages 1-2). "auto" values are filled as the HF Trainer fills them (reduce_bucket_size =
hidden^2, stage3_prefetch_bucket_size = 0.9 hidden^2, stage3_param_persistence_threshold =
10 hidden); unset ones take DeepSpeed's defaults.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

# DeepSpeed 0.19's DeepSpeedZeroConfig defaults (read from deepspeed when it is installed).
ZERO_DEFAULTS = {"reduce_bucket_size": int(5e8), "allgather_bucket_size": int(5e8),
                 "stage3_prefetch_bucket_size": int(5e7), "stage3_max_live_parameters": int(1e9),
                 "stage3_param_persistence_threshold": int(1e5), "contiguous_gradients": True}
HOST_BUFFER_FACTOR = 1.5  # DeepSpeed's estimators' additional_buffer_factor for pinned host buffers


@dataclass
class ZeroSettings:
    stage: int
    dtype_bytes: int  # 2 for bf16/fp16, 4 without either
    offload_optimizer: bool
    offload_param: bool
    reduce_bucket_size: int
    allgather_bucket_size: int
    prefetch_bucket_size: int
    max_live_parameters: int
    persistence_threshold: int
    overlap_comm: bool
    notes: list[str] = field(default_factory=list)


def _defaults() -> dict:
    try:
        from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    except Exception:  # not installed here (planning on a laptop): the documented defaults above
        return dict(ZERO_DEFAULTS)
    config = DeepSpeedZeroConfig()
    return {"reduce_bucket_size": config.reduce_bucket_size, "allgather_bucket_size": config.allgather_bucket_size,
            "stage3_prefetch_bucket_size": config.prefetch_bucket_size,
            "stage3_max_live_parameters": config.max_live_parameters,
            "stage3_param_persistence_threshold": config.param_persistence_threshold,
            "contiguous_gradients": config.contiguous_gradients}


def _enabled(section, mixed_precision: str | None, name: str) -> bool:
    value = (section or {}).get("enabled", False)
    return mixed_precision == name if value == "auto" else bool(value)


def zero_settings(config: dict, hidden_size: int, mixed_precision: str | None) -> ZeroSettings:
    """The ZeRO settings a DeepSpeed config means for a model of this hidden size."""
    zero = dict(config.get("zero_optimization", {}))
    stage = int(zero.get("stage", 0))
    defaults = _defaults()
    auto = {"reduce_bucket_size": hidden_size * hidden_size,
            "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
            "stage3_param_persistence_threshold": 10 * hidden_size}

    def value(key):
        raw = zero.get(key, defaults.get(key))
        if raw == "auto":
            raw = auto.get(key, defaults.get(key))
        return int(float(raw))

    sixteen = _enabled(config.get("bf16"), mixed_precision, "bf16") or _enabled(config.get("fp16"), mixed_precision, "fp16")
    offload = lambda key: (zero.get(key) or {}).get("device", "none") not in ("none", None)  # noqa: E731
    overlap = zero.get("overlap_comm")
    return ZeroSettings(
        stage=stage, dtype_bytes=2 if sixteen else 4,
        offload_optimizer=offload("offload_optimizer"), offload_param=stage == 3 and offload("offload_param"),
        reduce_bucket_size=value("reduce_bucket_size"), allgather_bucket_size=value("allgather_bucket_size"),
        prefetch_bucket_size=value("stage3_prefetch_bucket_size"), max_live_parameters=value("stage3_max_live_parameters"),
        persistence_threshold=value("stage3_param_persistence_threshold"),
        overlap_comm=bool(overlap) if overlap is not None else stage == 3)


def zero_dtype(config: dict, mixed_precision: str | None) -> torch.dtype:
    """The dtype DeepSpeed's engine converts the model to."""
    if _enabled(config.get("bf16"), mixed_precision, "bf16"):
        return torch.bfloat16
    if _enabled(config.get("fp16"), mixed_precision, "fp16"):
        return torch.float16
    return torch.float32


@dataclass
class ZeroMemory:
    """Per GPU, in bytes: the model states and DeepSpeed's buffers during the backward (when the
    activations peak) and during the optimizer step (when the fp32 gradient partition exists and
    the activations are gone); per node: DeepSpeed's host memory (offload)."""
    backward: dict[str, int]
    step: dict[str, int]
    host_per_node: int
    notes: list[str]


def zero_memory(settings: ZeroSettings, trainable: int, frozen_bytes: int, total_params: int,
                world_size: int, gpus_per_node: int) -> ZeroMemory:
    """`trainable`: trainable parameters; `frozen_bytes`: bytes of the frozen weights as stored on
    the GPU (16-bit, or bitsandbytes' layout); `total_params`: all parameters."""
    d, n, stage = settings.dtype_bytes, world_size, settings.stage
    offload = settings.offload_optimizer
    states = {
        "weights": frozen_bytes / n if stage == 3 else frozen_bytes,
        "trainable": d * trainable / n if stage == 3 else d * trainable,
        # 16-bit gradients: whole in stage 1, this process's partition in stages 2-3 (in host memory with offload)
        "gradients": 0 if offload else d * trainable if stage <= 1 else d * trainable / n,
        "optimizer_states": 0 if offload else 12 * trainable / n,  # fp32 master weights, Adam's m and v
    }
    notes = []
    if settings.offload_param:
        states["weights"] = states["trainable"] = 0
        notes.append("offload_param: the 16-bit parameter partitions live in host memory")
    backward = {**states, "DeepSpeed reduce buckets":
                settings.reduce_bucket_size * d * (2 if settings.overlap_comm and stage < 3 else 1)}
    if stage == 3:
        backward["DeepSpeed gathered parameters (stage3_max_live_parameters)"] = min(settings.max_live_parameters, total_params) * d
        backward["DeepSpeed prefetch bucket"] = min(settings.prefetch_bucket_size, total_params) * d
    step = {**states, "gradients": states["gradients"] + (0 if offload else 4 * trainable / n)}  # + fp32 partition
    if stage < 3:
        step["DeepSpeed allgather bucket"] = settings.allgather_bucket_size * d
    host = 0
    if offload:
        host += 16 * trainable / n * gpus_per_node * HOST_BUFFER_FACTOR
        notes.append("offload_optimizer: gradients, fp32 master weights and Adam moments live in host memory")
    if settings.offload_param:
        host += (frozen_bytes + d * trainable) / n * gpus_per_node * HOST_BUFFER_FACTOR
    as_int = lambda parts: {k: int(v) for k, v in parts.items()}  # noqa: E731
    return ZeroMemory(as_int(backward), as_int(step), int(host), notes)


__all__ = ["ZeroSettings", "ZeroMemory", "zero_settings", "zero_dtype", "zero_memory"]
