"""One run per output folder: a live holder refuses a second run by name; the lock of a process that
died (kill -9) is taken over and the takeover logged; release removes the lock file."""

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from chatglm3_finetune.train import run_lock
from chatglm3_finetune.train.run_lock import FolderLocked, RunLock

HOLD = """
import sys, time
from chatglm3_finetune.train.run_lock import RunLock
RunLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(120)
"""


@pytest.fixture
def holder(tmp_path):
    """A real process holding the lock of tmp_path (killed at the end)."""
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "locked"
    yield process
    process.kill()
    process.wait()


def test_a_second_run_is_refused_naming_the_running_one(tmp_path, holder):
    with pytest.raises(FolderLocked) as refused:
        RunLock(str(tmp_path)).acquire()
    message = str(refused.value)
    assert message.startswith(f"--output_dir {tmp_path} is in use by another run (pid {holder.pid} on "
                              f"{socket.gethostname()}, started ")
    assert message.endswith(f"or choose another --output_dir; if that run is gone, remove {tmp_path / 'run.lock'}")
    assert json.loads((tmp_path / "run.lock").read_text())["pid"] == holder.pid


def test_the_lock_of_a_killed_run_is_taken_over_and_logged(tmp_path, holder, caplog):
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    caplog.set_level(logging.WARNING)
    lock = RunLock(str(tmp_path)).acquire()
    try:
        assert lock.took_over["pid"] == holder.pid
        assert f"Took over the lock of --output_dir {tmp_path} from a run that is no longer running (pid {holder.pid}" \
            in caplog.text
        assert json.loads((tmp_path / "run.lock").read_text())["pid"] == os.getpid()
    finally:
        lock.release()
    assert not (tmp_path / "run.lock").exists()


def test_after_a_release_the_next_run_takes_the_lock_without_a_takeover(tmp_path, caplog):
    RunLock(str(tmp_path)).acquire().release()
    caplog.set_level(logging.WARNING)
    lock = RunLock(str(tmp_path)).acquire()
    assert lock.took_over is None and "Took over" not in caplog.text
    lock.release()


def test_without_flock_the_pid_decides(tmp_path, monkeypatch):
    """Some network filesystems have no flock: a lock written on this host counts while its pid lives."""
    monkeypatch.setattr(RunLock, "_try_flock", lambda self, fd: "no-flock")
    live = {"pid": os.getppid(), "host": socket.gethostname(), "started": "earlier"}
    (tmp_path / "run.lock").write_text(json.dumps(live))
    with pytest.raises(FolderLocked, match=f"pid {os.getppid()} on "):
        RunLock(str(tmp_path)).acquire()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / "run.lock").write_text(json.dumps({**live, "pid": int(dead.stdout)}))
    lock = RunLock(str(tmp_path)).acquire()
    assert lock.took_over["pid"] == int(dead.stdout)
    lock.release()
    (tmp_path / "run.lock").write_text(json.dumps({**live, "host": "another-host"}))
    with pytest.raises(FolderLocked, match="on another-host"):
        RunLock(str(tmp_path)).acquire()


def test_the_holder_is_described_even_before_it_wrote_its_details(tmp_path, monkeypatch):
    fd = os.open(tmp_path / "run.lock", os.O_RDWR | os.O_CREAT)
    import fcntl

    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        with pytest.raises(FolderLocked, match="a run that has not written its details yet"):
            run_lock.RunLock(str(tmp_path)).acquire()
    finally:
        os.close(fd)


# ---- two real runs into one folder --------------------------------------------------------------------

@pytest.mark.slow
def test_two_concurrent_runs_the_second_refused_then_a_killed_run_is_taken_over(tiny_model_dir, formatted_samples,
                                                                               tmp_path, finetune_in_process):
    """A second run, plain or as two torchrun ranks, is refused by name while the first trains (frozen
    with SIGSTOP meanwhile, so that it cannot finish first); nothing of the second is written and no
    rank is left waiting. After kill -9 of the first, the rerun takes its lock over and finishes it.
    The first run and the ranks are real processes; the plain second run and the rerun only meet the
    lock file, so they run in-process (this process is as foreign to the lock as another one)."""
    from conftest import ROOT
    from test_finetune import common_args
    from test_preemption import Running

    output_dir = tmp_path / "o"
    args = common_args(tiny_model_dir, formatted_samples["multi-turn"], output_dir, "--pre_seq_len", "4",
                       "--max_steps", "2", "--save_steps", "1", "--gradient_accumulation_steps", "10")
    first = Running([sys.executable, str(ROOT / "finetune.py"), *args])
    try:
        first.wait_for_logged_steps(1)
        while not (output_dir / "checkpoint-1" / "manifest.json").exists():
            time.sleep(0.01)
        first.process.send_signal(signal.SIGSTOP)
        record = (output_dir / "run_record.json").read_text()

        second = finetune_in_process(*args)
        assert second.returncode == 2
        (line,) = second.stderr.strip().splitlines()
        assert line.startswith(f"error: --output_dir {output_dir} is in use by another run (pid {first.process.pid} "
                               f"on {socket.gethostname()}, started ")
        assert "Sanity Check" not in second.stdout

        ranks = subprocess.run([sys.executable, "-m", "chatglm3_finetune.train.launch_workers", "--standalone",
                                "--nnodes=1", "--nproc_per_node=2", str(ROOT / "finetune.py"), *args],
                               capture_output=True, text=True, cwd=str(ROOT), timeout=240,
                               env={**os.environ, "DS_ACCELERATOR": "cpu"})
        assert ranks.returncode == 2, ranks.stderr[-3000:]
        output = ranks.stdout + ranks.stderr
        assert output.count(f"is in use by another run (pid {first.process.pid}") == 1, output[-3000:]
        assert "Sanity Check" not in output and "Traceback" not in output
        assert (output_dir / "run_record.json").read_text() == record  # neither wrote a start
        assert first.process.poll() is None
    finally:
        first.process.send_signal(signal.SIGKILL)
        first.finish()

    rerun = finetune_in_process(*args)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    out = rerun.stdout + rerun.stderr
    assert (f"Took over the lock of --output_dir {output_dir} from a run that is no longer running "
            f"(pid {first.process.pid} on {socket.gethostname()}") in out
    assert f"Resuming from {output_dir / 'checkpoint-1'}" in out
    assert json.loads((output_dir / "trainer_state.json").read_text())["global_step"] == 2
    assert not (output_dir / "run.lock").exists()
