"""The output folder's health: writable with free space before anything loads, clear errors when a
checkpoint cannot be written, and starting over (--overwrite_output_dir)."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile

logger = logging.getLogger(__name__)

WRITE_FAILED_EXIT_CODE = 4
CHECKPOINT_PREFIX = "checkpoint-"
# What a finished or interrupted run leaves that a fresh start must not mix with its own files.
RUN_FILES = ("run_record.json", "trainer_state.json", "train_results.json", "all_results.json",
             "eval_results.json", "predict_results.json")


class CheckpointWriteError(OSError):
    """A checkpoint or the final model could not be written (disk full, permissions)."""


def free_space(path: str) -> str:
    """Free space on the disk that holds `path` (or its nearest existing parent), for messages."""
    while path and not os.path.exists(path):
        path = os.path.dirname(path)
    try:
        return f"{shutil.disk_usage(path or '.').free / 2**30:.1f} GiB free"
    except OSError:
        return "free space unknown"


def check_writable(output_dir: str) -> str | None:
    """None when a file can be created in output_dir (created if missing); else what is wrong."""
    try:
        os.makedirs(output_dir, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=output_dir, prefix=".write-test-"):
            pass
    except OSError as e:
        return (f"--output_dir {output_dir}: cannot write there ({e.strerror or e}; {free_space(output_dir)}): "
                f"choose another folder or fix its permissions")
    return None


def write_failed(path: str, error: BaseException) -> CheckpointWriteError:
    return CheckpointWriteError(
        f"could not write {path}: {error} ({free_space(path)}). Checkpoints written before are complete and "
        f"untouched; free some space (or lower --save_total_limit) and rerun the same command to resume")


def start_over(output_dir: str) -> None:
    """--overwrite_output_dir: remove the previous run's checkpoints and records (not other files)."""
    if not os.path.isdir(output_dir):
        return
    removed = []
    for name in sorted(os.listdir(output_dir)):
        path = os.path.join(output_dir, name)
        if name.startswith(CHECKPOINT_PREFIX) and os.path.isdir(path):
            shutil.rmtree(path)
            removed.append(name)
        elif name in RUN_FILES:
            os.remove(path)
            removed.append(name)
    if removed:
        logger.warning("--overwrite_output_dir: removed the previous run's %s from %s", ", ".join(removed),
                       output_dir)
