"""Which checkpoint a rerun resumes from: the newest complete one (its manifest matches every file),
with each newer one that is not reported; and the rotation that keeps --save_total_limit of them.

A checkpoint without a manifest was interrupted while being saved: it is skipped. One whose manifest
no longer matches its files (removed, truncated, zeroed) is damaged: it is skipped too, and moved to
`damaged-checkpoint-N` when an older one is resumed from, so that the rerun can write step N again.
When checkpoints are there but none is complete and one of them is damaged, nothing is chosen: a
fresh start would silently throw away the run (`NoGoodCheckpoint`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, field

from .manifest import MANIFEST_FILE, ManifestError, check_folder

logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
DAMAGED_PREFIX = "damaged-"
TRAINER_STATE_FILE = "trainer_state.json"


class NoGoodCheckpoint(ValueError):
    """Checkpoints are there, some were complete once, but none is complete now."""


@dataclass
class Choice:
    path: str | None = None  # the checkpoint to resume from; None: a fresh start
    global_step: int | None = None
    max_steps: int | None = None  # what that checkpoint's run was to train: global_step >= max_steps is its end
    damaged: list[tuple[str, str]] = field(default_factory=list)  # newer checkpoints (path, problem) not resumable
    incomplete: list[tuple[str, str]] = field(default_factory=list)

    @property
    def at_end(self) -> bool:
        """The checkpoint holds the last step of its run's schedule (only the final save can be missing)."""
        return self.path is not None and bool(self.max_steps) and self.global_step >= self.max_steps


def checkpoint_folders(output_dir: str) -> list[tuple[int, str]]:
    """(step, path) of every checkpoint-N folder in output_dir, newest first."""
    if not os.path.isdir(output_dir):
        return []
    found = [(int(match.group(1)), os.path.join(output_dir, name)) for name in os.listdir(output_dir)
             if (match := CHECKPOINT_PATTERN.match(name)) and os.path.isdir(os.path.join(output_dir, name))]
    return sorted(found, reverse=True)


def weight_files(names: list[str]) -> list[str]:
    """The weight files among a folder's top-level names (a model, a prefix, an adapter; not DeepSpeed's)."""
    return [name for name in names if name.endswith((".safetensors", ".bin")) and name != "training_args.bin"]


def checkpoint_step(path: str) -> int:
    """The step a checkpoint folder holds: from its name (checkpoint-N), else from its trainer state."""
    match = CHECKPOINT_PATTERN.match(os.path.basename(os.path.normpath(path)))
    if match:
        return int(match.group(1))
    try:
        return read_trainer_state(path)["global_step"]
    except (OSError, ValueError):
        return 0


def read_trainer_state(path: str) -> dict:
    with open(os.path.join(path, TRAINER_STATE_FILE), encoding="utf-8") as f:
        state = json.load(f)
    if not isinstance(state, dict) or not isinstance(state.get("global_step"), int):
        raise ValueError(f"{TRAINER_STATE_FILE} holds no global_step")
    return state


def legacy_problem(path: str) -> str | None:
    """For a checkpoint written before manifests: the files a resume needs are there."""
    try:
        read_trainer_state(path)
    except (OSError, ValueError) as e:
        return f"{TRAINER_STATE_FILE} is missing or unreadable ({e})"
    names = os.listdir(path)
    deepspeed = any(name.startswith("global_step") for name in names)
    if not weight_files(names) and not deepspeed:
        return "it holds no weights"
    if not deepspeed:
        missing = [name for name in ("optimizer.pt", "scheduler.pt") if name not in names]
        if missing:
            return f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing"
    return None


def checkpoint_problem(path: str, legacy: bool = False) -> tuple[str, str] | None:
    """None for a checkpoint that can be resumed from, else (kind, what is wrong): kind "incomplete"
    (its save never finished) or "damaged" (it was complete, a file changed since). `legacy`: written
    before manifests, so its files are only checked for presence when it has none."""
    if not os.path.isdir(path):
        return "incomplete", "no such folder"
    if legacy and not os.path.exists(os.path.join(path, MANIFEST_FILE)):
        problem = legacy_problem(path)
        return ("incomplete", problem) if problem else None
    try:
        check_folder(path)
    except ManifestError as e:
        kind = "incomplete" if not os.path.exists(os.path.join(path, MANIFEST_FILE)) else "damaged"
        return kind, str(e)
    try:
        read_trainer_state(path)
    except (OSError, ValueError) as e:
        return "damaged", f"{TRAINER_STATE_FILE} is unreadable ({e})"
    return None


def choose_checkpoint(output_dir: str, legacy_up_to_step: int | None = None) -> Choice:
    """The newest checkpoint in output_dir that can be resumed from, and the newer ones that cannot.
    Checkpoints up to `legacy_up_to_step` may lack a manifest (written before manifests)."""
    choice = Choice()
    for step, path in checkpoint_folders(output_dir):
        problem = checkpoint_problem(path, legacy=legacy_up_to_step is not None and step <= legacy_up_to_step)
        if problem is None:
            state = read_trainer_state(path)
            choice.path, choice.global_step, choice.max_steps = path, state["global_step"], state.get("max_steps")
            return choice
        kind, what = problem
        (choice.damaged if kind == "damaged" else choice.incomplete).append((path, what))
    if choice.damaged:
        listed = "; ".join(f"{os.path.basename(path)}: {what}" for path, what in choice.damaged + choice.incomplete)
        raise NoGoodCheckpoint(
            f"--output_dir {output_dir} holds no checkpoint that can be resumed from ({listed}). Nothing was changed: "
            f"restore those files, or start over with --overwrite_output_dir (this removes its checkpoints)")
    return choice


def set_damaged_aside(choice: Choice) -> list[str]:
    """Moves the damaged checkpoints newer than the chosen one to damaged-checkpoint-N (kept for a
    look, out of the way of the rerun's own step N); returns one message per checkpoint skipped."""
    notes = []
    for path, what in choice.damaged:
        target = os.path.join(os.path.dirname(path), DAMAGED_PREFIX + os.path.basename(path))
        if os.path.exists(target):
            shutil.rmtree(target)
        os.rename(path, target)
        notes.append(f"Not resuming from {path}: it is damaged ({what}); moved it to {target}")
    notes += [f"Not resuming from {path}: it is incomplete ({what})" for path, what in choice.incomplete]
    return notes


def rotate(output_dir: str, limit: int | None, keep: tuple[str | None, ...] = ()) -> None:
    """Keeps at most `limit` checkpoints: removes the incomplete ones first (no manifest), then the
    oldest complete ones, never those in `keep` (the one just saved, the best one)."""
    if not limit or limit <= 0:
        return
    folders = checkpoint_folders(output_dir)
    kept = {os.path.abspath(path) for path in keep if path}
    removable = [path for _, path in reversed(folders) if os.path.abspath(path) not in kept]
    removable.sort(key=lambda path: os.path.exists(os.path.join(path, MANIFEST_FILE)))  # stable: oldest first
    for path in removable[:max(0, len(folders) - max(limit, len(kept)))]:
        shutil.rmtree(path, ignore_errors=True)
