"""The output folder's health: apart from the inputs, writable with free space before anything loads,
clear errors when a checkpoint cannot be written, starting over (--overwrite_output_dir), and no empty
folder left behind by a try that failed before writing anything."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile

from safetensors import SafetensorError

logger = logging.getLogger(__name__)

WRITE_FAILED_EXIT_CODE = 4
CHECKPOINT_PREFIXES = ("checkpoint-", "damaged-checkpoint-")
# What a finished or interrupted run leaves that a fresh start must not mix with its own files.
# The final model's manifest goes too: the old final model then counts as missing, not as this run's.
RUN_FILES = ("run_record.json", "trainer_state.json", "train_results.json", "all_results.json",
             "eval_results.json", "predict_results.json", "manifest.json")


class CheckpointWriteError(OSError):
    """A checkpoint or the final model could not be written (disk full, permissions)."""


# What a failed write raises: OSError, torch.save's RuntimeError, safetensors' own error class.
WRITE_ERRORS = (OSError, RuntimeError, SafetensorError)


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


def near_inputs_problem(output_dir: str, inputs: dict[str, str | None]) -> str | None:
    """What is wrong when the output folder is, contains, or sits inside one of `inputs` ({option:
    path}: the model, tokenizer and data); None when it is apart from all of them. Paths are compared
    after resolving symlinks; an input that does not exist (a hub name) is left out."""
    output = os.path.realpath(output_dir)
    for option, path in inputs.items():
        if not path or not os.path.exists(path):
            continue
        given = os.path.realpath(path)
        if given == output:
            relation = "is"
        elif os.path.commonpath([given, output]) == given:
            relation = "sits inside"
        elif os.path.commonpath([given, output]) == output:
            relation = "contains"
        else:
            continue
        return (f"--output_dir {output_dir} {relation} {option} {path}: a run writes checkpoints and its final "
                f"model there and could overwrite or mix with its inputs. Choose another --output_dir (or pass "
                f"--allow_output_near_inputs if you really mean it)")
    return None


class CreatedFolder:
    """Remembers whether this process created the output folder, to remove it again when a failed
    try leaves it empty."""

    def __init__(self, path: str):
        self.path = path
        self.created = not os.path.exists(path)

    def remove_if_empty(self) -> bool:
        if not self.created:
            return False
        try:
            os.rmdir(self.path)  # fails unless empty
        except OSError:
            return False
        return True


def write_failed(path: str, error: BaseException) -> CheckpointWriteError:
    return CheckpointWriteError(
        f"could not write {path}: {error} ({free_space(path)}). Checkpoints written before are complete and "
        f"untouched; free some space (or lower --save_total_limit) and rerun the same command to resume")


def final_write_failed(output_dir: str, global_step: int, error: BaseException) -> CheckpointWriteError:
    checkpoint = os.path.join(output_dir, f"checkpoint-{global_step}")
    if os.path.isfile(os.path.join(checkpoint, "manifest.json")):
        then = f"it writes the final model from {checkpoint}, which holds the last step"
    else:
        then = ("no checkpoint holds the last step, so it trains again from the newest checkpoint (or from the "
                "start when there is none)")
    return CheckpointWriteError(
        f"could not write the final model to {output_dir}: {error} ({free_space(output_dir)}). Training finished at "
        f"step {global_step}; free some space and rerun the same command: {then}")


def start_over(output_dir: str) -> None:
    """--overwrite_output_dir: remove the previous run's checkpoints and records (not other files)."""
    if not os.path.isdir(output_dir):
        return
    removed = []
    for name in sorted(os.listdir(output_dir)):
        path = os.path.join(output_dir, name)
        if name.startswith(CHECKPOINT_PREFIXES) and os.path.isdir(path):
            shutil.rmtree(path)
            removed.append(name)
        elif name in RUN_FILES:
            os.remove(path)
            removed.append(name)
    if removed:
        logger.warning("--overwrite_output_dir: removed the previous run's %s from %s", ", ".join(removed),
                       output_dir)
