"""Host memory at load and disk for checkpoints: what a run needs besides its GPUs.

Host memory, per node, while the model loads: transformers builds the model on the meta device
and fills it from the checkpoint files on the CPU, before the Trainer moves it to the GPU. Stored in
the load dtype, the weights are memory-mapped safetensors: the processes of a node share one copy
(the page cache). Stored in another dtype (a 16-bit checkpoint widened to fp32 for full
fine-tuning without DeepSpeed, a fp16 one loaded in bf16), each process casts its own copy
(model.stored_weights), and a node holds one per process. Exceptions: a quantized base is placed on
its GPU while it loads (device_map), and under ZeRO-3 (zero.Init) each process materializes only its
partition, reading the checkpoint one file at a time. DeepSpeed's CPU offload adds its host-side
states for the whole run (deepspeed_rules.py).

Disk per checkpoint (checkpoint-N/): what the Trainer saves (the prefix or adapter, or the whole
model in its training dtype), the optimizer's states (optimizer.pt: two fp32 moments per trainable
parameter; under DeepSpeed its partitioned fp32 master weights and moments, plus the 16-bit
model), and small files. The run keeps at most save_total_limit of them, and writes the final
model into the output folder.
"""

from __future__ import annotations

import glob
import os

import torch

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "fp32": 4, "fp16": 2, "bf16": 2}
SMALL_FILES = 2 * 2 ** 20  # trainer_state, scheduler, rng state, training args, tokenizer files


def checkpoint_files(model_path: str) -> tuple[int, int]:
    """(bytes of the weight files in the model folder, bytes of its largest file); zeros when it
    holds only a config."""
    sizes = [os.path.getsize(path) for pattern in ("*.safetensors", "*.bin") for path in
             glob.glob(os.path.join(glob.escape(model_path), pattern))]
    return sum(sizes), max(sizes, default=0)


def checkpoint_dtype(config) -> str | None:
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return str(value).replace("torch.", "") if value is not None else None


def host_memory_at_load(model_path: str, config, total_params: int, load_dtype: torch.dtype,
                        quantized: bool, zero_stage: int | None, gpus_per_node: int, world_size: int) -> dict:
    """Host bytes per process and per node while the model loads, and how they were reckoned."""
    files, largest = checkpoint_files(model_path)
    saved = checkpoint_dtype(config)
    load_bytes = total_params * torch.tensor([], dtype=load_dtype).element_size()
    if quantized:
        per_process = largest
        how = ("the base goes to its GPU while it loads, one checkpoint file at a time in host memory"
               + ("" if files else "; the folder holds no weight files to size"))
    elif zero_stage == 3:
        per_process = largest + load_bytes // max(world_size, 1)
        how = ("ZeRO-3 materializes each process's partition, reading one checkpoint file at a time"
               + ("" if files else "; the folder holds no weight files to size"))
    elif saved == str(load_dtype).replace("torch.", ""):  # bf16 and fp16 are the same size, not the same values
        per_process = load_bytes
        how = (f"each process maps the whole model from the checkpoint files ({saved}, the load dtype): "
               f"the processes of a node share one copy"
               + ("" if files else f"; the folder holds no weight files: planned as stored in {saved}, "
                                   f"as its config says"))
        return {"per_process_bytes": int(per_process), "per_node_bytes": int(per_process),
                "checkpoint_files_bytes": files, "checkpoint_dtype": saved, "how": how}
    else:
        per_process = load_bytes
        widened = f" (the checkpoint is {saved}: widened)" if saved and DTYPE_BYTES.get(saved, 0) < load_bytes / max(total_params, 1) else ""
        how = f"each process builds the whole model on the CPU in {str(load_dtype).replace('torch.', '')}{widened}"
    return {"per_process_bytes": int(per_process), "per_node_bytes": int(per_process * gpus_per_node),
            "checkpoint_files_bytes": files, "checkpoint_dtype": saved, "how": how}


def checkpoint_bytes(method: str, trainable: int, total_params: int, training_dtype_bytes: int,
                     zero_stage: int | None, adapter_dtype_bytes: int = 4) -> dict:
    """Bytes of one checkpoint-N folder, by part."""
    if method in ("ptuning", "lora"):
        weights = trainable * adapter_dtype_bytes
    else:
        weights = total_params * (2 if zero_stage is not None else training_dtype_bytes)
    parts = {"weights": weights}
    if zero_stage is not None:
        parts["deepspeed optimizer partitions"] = 12 * trainable  # fp32 master + Adam moments, all ranks
        if zero_stage < 3:
            parts["deepspeed model states"] = 2 * total_params if method == "full" else 2 * trainable
    else:
        parts["optimizer.pt"] = 8 * trainable  # Adam's two fp32 moments
    parts["small files"] = SMALL_FILES
    return {key: int(value) for key, value in parts.items()}


def run_disk(per_checkpoint: int, final_model: int, steps: int, save_steps: int | None,
             save_total_limit: int | None) -> dict:
    """Checkpoints the run writes and keeps, and the disk they and the final model take."""
    written = steps // save_steps if save_steps else 0
    kept = min(written, save_total_limit) if save_total_limit else written
    return {"checkpoints_written": written, "checkpoints_kept": kept,
            "run_bytes": int(kept * per_checkpoint + final_model)}


__all__ = ["host_memory_at_load", "checkpoint_bytes", "run_disk", "checkpoint_files", "checkpoint_dtype"]
