"""The final model in the output folder, written as safely as a checkpoint: into a folder aside
(`output_dir/.final-model.partial`), then moved into place file by file, then its manifest, last.
Until the manifest is there the final model counts as missing, so a save cut short (a kill, a full
disk) is never taken for a finished run.

When training ended at a checkpoint but the final save did not complete, the final model is the
checkpoint's model files: `finish_from_checkpoint` copies them (the same aside, move, manifest).
"""

from __future__ import annotations

import json
import os
import re
import shutil

from .checkpoints import weight_files
from .file_modes import respect_umask
from .manifest import MANIFEST_FILE, ManifestError, describe, read_manifest, write_manifest

ASIDE_FOLDER = ".final-model.partial"
TRAINER_STATE_FILE = "trainer_state.json"
# What a checkpoint holds only to resume training (everything else in it is the model the final save writes).
RESUME_ONLY = re.compile(r"^(optimizer\.pt|scheduler\.pt|scaler\.pt|rng_state(_\d+)?\.pth|trainer_state\.json|"
                         + re.escape(MANIFEST_FILE) + r")$")
# DeepSpeed's own checkpoint: resume state too, unless the checkpoint holds no consolidated weights.
DEEPSPEED_ONLY = re.compile(r"^(global_step\d+|latest|zero_to_fp32\.py|zero_to_torch\.py)$")


def aside_folder(output_dir: str) -> str:
    return os.path.join(output_dir, ASIDE_FOLDER)


def prepare_aside(output_dir: str) -> str:
    """An empty aside folder (a leftover of an interrupted save is removed)."""
    aside = aside_folder(output_dir)
    shutil.rmtree(aside, ignore_errors=True)
    os.makedirs(aside)
    return aside


def discard_aside(output_dir: str) -> None:
    shutil.rmtree(aside_folder(output_dir), ignore_errors=True)


def publish(output_dir: str, global_step: int) -> list[str]:
    """Moves what the aside folder holds into output_dir and writes the manifest; returns the names moved.

    The old manifest goes first, so that a stop in the middle leaves no manifest (a missing final
    model) rather than one that describes a mix of two saves. Files of the previous final model that
    this one does not have are removed.
    """
    aside = aside_folder(output_dir)
    respect_umask(aside)
    files = describe(aside)
    try:
        previous = set(read_manifest(output_dir)["files"])
    except ManifestError:
        previous = set()
    manifest = os.path.join(output_dir, MANIFEST_FILE)
    if os.path.exists(manifest):
        os.remove(manifest)
    names = sorted(os.listdir(aside))
    for name in names:
        target = os.path.join(output_dir, name)
        if os.path.isdir(os.path.join(aside, name)) and os.path.isdir(target):
            shutil.rmtree(target)
        os.replace(os.path.join(aside, name), target)
    for stale in previous - set(files):
        path = os.path.join(output_dir, stale)
        if os.path.isfile(path) and os.path.dirname(stale) == "":
            os.remove(path)
    write_manifest(output_dir, global_step, files)
    os.rmdir(aside)
    return names


def model_entries(checkpoint: str) -> list[str]:
    """The names in a checkpoint folder that make up the model (what the final save writes)."""
    names = sorted(os.listdir(checkpoint))
    consolidated = bool(weight_files(names))
    return [name for name in names if not RESUME_ONLY.match(name) and not (consolidated and DEEPSPEED_ONLY.match(name))]


def finish_from_checkpoint(checkpoint: str, output_dir: str, global_step: int) -> list[str]:
    """Writes the final model of a run whose training ended at `checkpoint` (copies, never links: the
    final model and the checkpoint stay independent copies), and its trainer state."""
    aside = prepare_aside(output_dir)
    try:
        for name in model_entries(checkpoint):
            source = os.path.join(checkpoint, name)
            if os.path.isdir(source):
                shutil.copytree(source, os.path.join(aside, name))
            else:
                shutil.copyfile(source, os.path.join(aside, name))
        names = publish(output_dir, global_step)
        state = os.path.join(output_dir, TRAINER_STATE_FILE)
        shutil.copyfile(os.path.join(checkpoint, TRAINER_STATE_FILE), state + ".tmp")
        os.replace(state + ".tmp", state)
    except BaseException:
        discard_aside(output_dir)
        raise
    return names


def run_totals_metrics(state: dict, totals_key: str) -> dict:
    """The train metrics a checkpoint's trainer state still holds (totals over the whole run)."""
    totals = state.get("stateful_callbacks", {}).get(totals_key) or {}
    step = state["global_step"]
    metrics = {"epoch": state.get("epoch"), "train_steps": step}
    if "loss_sum" in totals and step:
        metrics["train_loss"] = totals["loss_sum"] / step
    if "supervised_tokens" in totals:
        metrics["train_supervised_tokens"] = totals["supervised_tokens"]
    if state.get("num_input_tokens_seen"):
        metrics["train_num_input_tokens_seen"] = state["num_input_tokens_seen"]
    return metrics


def write_results(output_dir: str, split: str, metrics: dict) -> None:
    """{split}_results.json, and the split's entries in all_results.json (as Trainer.save_metrics)."""
    combined_path = os.path.join(output_dir, "all_results.json")
    try:
        with open(combined_path, encoding="utf-8") as f:
            combined = json.load(f)
    except (OSError, ValueError):
        combined = {}
    combined.update(metrics)
    for path, values in ((os.path.join(output_dir, f"{split}_results.json"), metrics), (combined_path, combined)):
        with open(path, "w", encoding="utf-8") as f:
            json.dump(values, f, indent=4, sort_keys=True)
