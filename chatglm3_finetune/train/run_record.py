"""The run record (output_dir/run_record.json): what a run trains, the history of its starts, and
whether it finished, so that a rerun into the same folder never mixes two different runs, and a run
whose final save was cut short is finished from its last checkpoint."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field

from ..data.paths import data_source_problem
from ..data.records import DataError

logger = logging.getLogger(__name__)

RECORD_FILE = "run_record.json"
SCHEDULE = ("max_steps", "num_train_epochs")  # may change on resume: applied and logged
# Settings compared only when the record holds them: records written before they were added lack them.
ALL_STEPS = 1 << 62
LATER_SETTINGS = ("max_grad_norm", "adam_beta1", "adam_beta2", "adam_epsilon")


class ResumeRefused(ValueError):
    """A rerun whose settings would change what the run in output_dir trains."""


@dataclass
class RunPlan:
    finished: bool = False  # the run in output_dir already completed this schedule: nothing to do
    finish_from_checkpoint: bool = False  # training ended at the checkpoint; only its final save is missing
    notes: list[str] = field(default_factory=list)  # schedule changes applied, logged once training starts
    record: dict | None = None  # the record with this start added, for `save_start`

    def save_start(self, output_dir: str) -> None:
        """Writes the record with this start (once training is about to start: a try that fails
        earlier leaves no trace)."""
        if self.record is not None:
            write_record(output_dir, self.record)


def data_digest(path: str) -> str:
    """A content hash of a data file, or of every file (and its name) in a dataset folder. The path
    is checked first (a device or a named pipe would never finish hashing): DataError if it is not
    a regular file or a dataset folder of regular files."""
    problem = data_source_problem(path)
    if problem:
        raise DataError(problem)
    if os.path.isdir(path):
        files = sorted(os.path.join(root, name) for root, _, names in os.walk(path) for name in names)
    else:
        files = [path]
    digest = hashlib.sha256()
    for file in files:
        digest.update(os.path.relpath(file, path).encode("utf-8", "surrogateescape"))
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def deepspeed_stage(deepspeed) -> int | None:
    if not deepspeed:
        return None
    config = deepspeed
    if isinstance(deepspeed, str):
        with open(deepspeed, encoding="utf-8") as f:
            config = json.load(f)
    return int(config.get("zero_optimization", {}).get("stage", 0))


def trained_settings(model_args, data_args, training_args) -> dict:
    """Every setting that changes what is trained; a resume must not change any of them."""
    method = model_args.tuning_method
    settings = {
        "data": f"{os.path.abspath(data_args.train_file)} (sha256 {data_digest(data_args.train_file)})",
        "train_split": getattr(data_args, "train_split", None),
        "val_size": getattr(data_args, "val_size", None),
        "max_train_samples": data_args.max_train_samples,
        "train_format": data_args.train_format,
        "model": os.path.abspath(model_args.model_name_or_path),
        "tokenizer": model_args.tokenizer_name and os.path.abspath(model_args.tokenizer_name),
        "method": method,
        "quantization_bit": model_args.quantization_bit,
        "length caps": [data_args.max_seq_length, data_args.max_source_length, data_args.max_target_length],
        "truncation_policy": data_args.truncation_policy,
        "packing": data_args.packing,
        "deepspeed stage": deepspeed_stage(training_args.deepspeed),
        "batch size (per device x accumulation x processes)": training_args.per_device_train_batch_size
        * training_args.gradient_accumulation_steps * training_args.world_size,
        "seed": training_args.seed,
        "learning_rate": training_args.learning_rate,
        "lr_scheduler_type": getattr(training_args.lr_scheduler_type, "value", training_args.lr_scheduler_type),
        "warmup": [training_args.warmup_steps, getattr(training_args, "warmup_ratio", None)],
        "weight_decay": training_args.weight_decay,
        "max_grad_norm": training_args.max_grad_norm,
        "adam_beta1": training_args.adam_beta1,
        "adam_beta2": training_args.adam_beta2,
        "adam_epsilon": training_args.adam_epsilon,
        "optim": getattr(training_args.optim, "value", training_args.optim),
    }
    if method == "ptuning":
        settings.update(pre_seq_len=model_args.pre_seq_len, prefix_projection=model_args.prefix_projection,
                        prefix_hidden_size=model_args.prefix_hidden_size,
                        ptuning_checkpoint=model_args.ptuning_checkpoint)
    if method == "lora":
        settings.update(lora_rank=model_args.lora_rank, lora_alpha=model_args.lora_alpha,
                        lora_dropout=model_args.lora_dropout, lora_target=model_args.lora_target)
    return json.loads(json.dumps(settings, default=str))


def read_record(output_dir: str) -> dict | None:
    path = os.path.join(output_dir, RECORD_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise ResumeRefused(f"{path}: unreadable run record ({e}): use --overwrite_output_dir to start over, or "
                            f"a new --output_dir") from None


def write_record(output_dir: str, record: dict) -> None:
    """Written aside, then renamed: readers on other ranks never see half a record."""
    path = os.path.join(output_dir, RECORD_FILE)
    aside = f"{path}.{os.getpid()}.tmp"
    with open(aside, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2, ensure_ascii=False)
    os.replace(aside, path)


def _differences(old: dict, new: dict) -> list[str]:
    keys = sorted(key for key in set(old) | set(new) if key in old or key not in LATER_SETTINGS)
    return [f"{key} {old.get(key)!r} -> {new.get(key)!r}" for key in keys if old.get(key) != new.get(key)]


def _refuse(output_dir: str, what: str) -> ResumeRefused:
    return ResumeRefused(f"--output_dir {output_dir} holds a run that {what}. Use a new --output_dir, or "
                         f"--overwrite_output_dir to start over (this removes its checkpoints)")


def plan_run(output_dir: str, settings: dict, schedule: dict, checkpoint_step: int | None,
             write: bool, start_over: bool = False, checkpoint_at_end: bool = False) -> RunPlan:
    """Compares this start with the record in output_dir; raises ResumeRefused, or returns the plan.

    `checkpoint_step` is the global step of the checkpoint this start resumes from (None: a fresh
    start) and `checkpoint_at_end` whether that checkpoint holds the last step of its schedule;
    `start_over` ignores the old record. The plan's record (this start added) is written now with
    `write`, else by `plan.save_start`.
    """
    record = None if start_over else read_record(output_dir)
    plan = RunPlan()
    if record is not None and (checkpoint_step is not None or record.get("finished")):
        changed = _differences(record["trained"], settings)
        if changed:
            raise _refuse(output_dir, f"trained with other settings ({'; '.join(changed)})")
        last = record["starts"][-1]["schedule"] if record.get("starts") else schedule
        finished = record.get("finished")
        if finished and final_model_step(output_dir) != finished["global_step"]:
            finished = None  # its final model is gone or damaged: finish it again, as if interrupted
        if finished and schedule == finished["schedule"]:
            plan.finished = True
            return plan
        if checkpoint_at_end and schedule == last:
            plan.finish_from_checkpoint = True
        elif finished and checkpoint_step is None:
            raise _refuse(output_dir, f"finished at step {finished['global_step']} and kept no checkpoint to "
                                      f"continue from with another schedule")
        else:
            done = max(checkpoint_step or 0, finished["global_step"] if finished else 0)
            if 0 < schedule["max_steps"] <= done:
                raise _refuse(output_dir, f"already trained {done} steps, so --max_steps {schedule['max_steps']} "
                                          f"leaves nothing to train; pass a larger --max_steps to continue it")
            plan.notes = [f"{key} {last[key]} -> {schedule[key]}: applied from step {checkpoint_step or 0} on (the "
                          f"learning-rate schedule now runs to the new end)"
                          for key in SCHEDULE if last[key] != schedule[key]]
    elif record is None and checkpoint_step is not None:
        logger.warning("%s has checkpoints but no %s (an older version wrote it): resuming without comparing "
                       "settings", output_dir, RECORD_FILE)
    if record is None or checkpoint_step is None:  # a fresh start: this run's settings become the record
        record = {"trained": settings, "starts": (record or {}).get("starts", []), "finished": None,
                  "manifests_from_step": 0}
    record.setdefault("manifests_from_step", checkpoint_step or 0)
    record["starts"].append({"time": time.strftime("%Y-%m-%d %H:%M:%S"), "command": sys.argv,
                             "resumed_from_step": checkpoint_step, "schedule": schedule})
    plan.record = record
    if write:
        plan.save_start(output_dir)
    return plan


def legacy_checkpoints_up_to(output_dir: str) -> int | None:
    """Checkpoints up to this step may lack a manifest: they were written before manifests were (the
    record says from which step on they are; a record without it, or none, predates them)."""
    try:
        record = read_record(output_dir)
    except ResumeRefused:
        return None  # plan_run reports the unreadable record
    if record is None or "manifests_from_step" not in record:
        return ALL_STEPS
    return record["manifests_from_step"]


def final_model_step(output_dir: str) -> int | None:
    """The step of the final model in output_dir when it is complete (its manifest matches), else None."""
    from .manifest import ManifestError, check_folder

    try:
        return check_folder(output_dir).get("global_step")
    except ManifestError:
        return None


def mark_finished(output_dir: str, global_step: int, schedule: dict) -> None:
    record = read_record(output_dir)
    if record is not None:
        record["finished"] = {"global_step": global_step, "schedule": schedule,
                              "time": time.strftime("%Y-%m-%d %H:%M:%S")}
        write_record(output_dir, record)
