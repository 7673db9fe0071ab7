"""The final save is as safe as a checkpoint. Each fault is injected while the final model is being
written (the process is caught with its aside folder present and frozen with SIGSTOP, so the fault
lands mid-save): SIGTERM is honoured once the save completes (exit 75, a finished run); kill -9 and a
full disk leave no final model, and rerunning the same command writes it from the last checkpoint."""

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from chatglm3_finetune.train.final_model import ASIDE_FOLDER
from chatglm3_finetune.train.manifest import MANIFEST_FILE, folder_problem
from conftest import ROOT
from test_finetune import common_args
from test_preemption import Running

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model_60mb(tmp_path_factory):
    """A tiny-architecture model of about 60 MB, so that its final save takes a while to catch."""
    from chatglm3_finetune.model.tiny_model import build_tiny_model

    return build_tiny_model(str(tmp_path_factory.mktemp("model-60mb")), hidden_size=512, intermediate_size=2048,
                            num_layers=4, num_heads=8)


def full_run_args(model_dir, data, output_dir):
    return common_args(model_dir, data, output_dir, "--max_steps", "2", "--save_steps", "2", "--learning_rate", "1e-4",
                       "--max_train_samples", "8")


def catch_the_final_save(run: Running, output_dir: Path, timeout: float = 300) -> int:
    """Waits until the final save has begun (its aside folder exists), freezes the training process
    with SIGSTOP and returns its pid; the final model must not be complete yet."""
    aside = output_dir / ASIDE_FOLDER
    deadline = time.time() + timeout
    while not aside.is_dir():
        assert run.process.poll() is None and time.time() < deadline, "".join(run.lines)[-3000:]
        time.sleep(0.002)
    pid = json.loads((output_dir / "run.lock").read_text())["pid"]
    os.kill(pid, signal.SIGSTOP)
    assert not (output_dir / MANIFEST_FILE).exists(), "the final save completed before it could be caught"
    return pid


def python_command(args) -> list[str]:
    return [sys.executable, str(ROOT / "finetune.py"), *args]


def with_umask(mask):
    return lambda: os.umask(mask)


def test_sigterm_during_the_final_save_lets_it_complete_then_exits_75(model_60mb, formatted_samples, tmp_path,
                                                                      finetune_in_process):
    output_dir = tmp_path / "full"
    args = full_run_args(model_60mb, formatted_samples["multi-turn"], output_dir)
    run = Running(python_command(args), preexec_fn=with_umask(0o027))
    pid = catch_the_final_save(run, output_dir)
    os.kill(pid, signal.SIGTERM)
    os.kill(pid, signal.SIGCONT)
    code, output = run.finish()
    assert code == 75, output[-3000:]
    assert "SIGTERM received: completing the final save, then stopping" in output
    assert ("Stopped on request after the final save: training finished at step 2 and the final model in "
            f"{output_dir} is complete. Rerunning the same command has nothing left to do") in output
    assert folder_problem(str(output_dir)) is None
    assert not (output_dir / ASIDE_FOLDER).exists()
    assert (output_dir / "model.safetensors").stat().st_mode & 0o777 == 0o640  # umask 027
    assert {"tokenizer.model", "config.json"} <= set(os.listdir(output_dir))

    rerun = finetune_in_process(*args)  # the rerun only reads the folder: in-process
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "already finished with these settings: nothing to do" in rerun.stdout
    assert "Resuming from" not in rerun.stdout + rerun.stderr


def test_kill_9_during_the_final_save_then_the_rerun_writes_it_from_the_last_checkpoint(model_60mb, formatted_samples,
                                                                                       tmp_path, finetune_in_process):
    from transformers import AutoModelForCausalLM

    output_dir = tmp_path / "full"
    args = full_run_args(model_60mb, formatted_samples["multi-turn"], output_dir)
    run = Running(python_command(args))
    pid = catch_the_final_save(run, output_dir)
    os.kill(pid, signal.SIGKILL)
    code, _ = run.finish()
    assert code == -signal.SIGKILL
    assert not (output_dir / MANIFEST_FILE).exists() and not (output_dir / "model.safetensors").exists()
    assert folder_problem(str(output_dir / "checkpoint-2")) is None

    rerun = finetune_in_process(*args)  # the killed run was a real process; the reruns are in-process
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    out = rerun.stdout + rerun.stderr
    assert (f"The run in {output_dir} had trained all 2 steps, but its final model was missing or incomplete (its "
            f"final save was cut short): wrote it from {output_dir / 'checkpoint-2'}. Done.") in out
    assert "Resuming from" not in out and "Traceback" not in out
    assert folder_problem(str(output_dir)) is None and not (output_dir / ASIDE_FOLDER).exists()
    final, last = load_file(str(output_dir / "model.safetensors")), load_file(str(output_dir / "checkpoint-2" /
                                                                                 "model.safetensors"))
    assert final.keys() == last.keys() and all((final[key] == last[key]).all() for key in final)
    assert (output_dir / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~current_umask()
    assert {"tokenizer.model", "tokenizer_config.json", "config.json"} <= set(os.listdir(output_dir))
    AutoModelForCausalLM.from_pretrained(str(output_dir))
    record = json.loads((output_dir / "run_record.json").read_text())
    assert record["finished"]["global_step"] == 2
    train_results = json.loads((output_dir / "train_results.json").read_text())
    assert train_results["finished_from_checkpoint"] == str(output_dir / "checkpoint-2")
    assert train_results["train_steps"] == 2 and train_results["train_loss"] > 0

    again = finetune_in_process(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "already finished with these settings: nothing to do" in again.stdout


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def fill(folder: Path) -> Path:
    """Takes every free byte of the filesystem that holds `folder`."""
    filler = folder / "filler"
    free = os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        while free > 0:
            try:
                os.posix_fallocate(fd, 0, free)
                break
            except OSError:
                free -= 1 << 20
    finally:
        os.close(fd)
    assert os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize < 1 << 20
    return filler


def wait_for_line(run: Running, prefix: str, timeout: float = 300) -> str:
    deadline = time.time() + timeout
    while not any(line.startswith(prefix) for line in run.lines):
        assert run.process.poll() is None and time.time() < deadline, "".join(run.lines)[-3000:]
        time.sleep(0.05)
    return next(line for line in run.lines if line.startswith(prefix)).strip()


def test_a_full_disk_during_the_final_save_exits_4_and_the_rerun_finishes(model_60mb, formatted_samples, tmp_path):
    """The output folder is a 1 GB tmpfs in a private mount namespace (unshare); the disk is filled
    from outside (through /proc/PID/root) while the final save runs, and emptied for the rerun."""
    if shutil.which("unshare") is None or subprocess.run(
            ["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs {tmp_path}"]).returncode != 0:
        pytest.skip("needs unshare with user and mount namespaces to give the run a small filesystem of its own")
    disk = tmp_path / "disk"
    disk.mkdir()
    output_dir = disk / "full"
    command = shlex.join(python_command(full_run_args(model_60mb, formatted_samples["multi-turn"], output_dir)))
    script = (f"mount -t tmpfs -o size=1g tmpfs {disk} || exit 99\n"
              f"{command}; echo \"first exit $?\"\n"
              f"while [ -e {disk}/filler ]; do sleep 0.1; done\n"
              f"{command}; echo \"second exit $?\"\n"
              f"while [ ! -e {disk}/checked ]; do sleep 0.1; done\n")
    shell = Running(["unshare", "-rm", "sh", "-c", script])
    try:
        inside = Path(f"/proc/{shell.process.pid}/root{disk}")  # the tmpfs, seen from outside its namespace
        pid = catch_the_final_save(shell, inside / "full")
        filler = fill(inside)
        os.kill(pid, signal.SIGCONT)
        assert wait_for_line(shell, "first exit") == "first exit 4", "".join(shell.lines)[-3000:]
        errors = [line.strip() for line in shell.lines if line.startswith("error: ")]
        assert len(errors) == 1 and errors[0].startswith(f"error: could not write the final model to {output_dir}: ")
        assert "No space left on device" in errors[0] and "Traceback" not in "".join(shell.lines)
        assert errors[0].endswith(f"Training finished at step 2; free some space and rerun the same command: it writes "
                                  f"the final model from {output_dir / 'checkpoint-2'}, which holds the last step")
        assert not (inside / "full" / MANIFEST_FILE).exists() and not (inside / "full" / ASIDE_FOLDER).exists()
        assert folder_problem(str(inside / "full" / "checkpoint-2")) is None

        filler.unlink()  # space freed: the script reruns the same command
        assert wait_for_line(shell, "second exit") == "second exit 0", "".join(shell.lines)[-3000:]
        assert any("wrote it from" in line for line in shell.lines)
        assert folder_problem(str(inside / "full")) is None
        (inside / "checked").touch()
        assert shell.process.wait(timeout=60) == 0
    finally:
        shell.process.kill()
