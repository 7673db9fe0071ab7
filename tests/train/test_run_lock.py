"""One run per output folder: a live holder refuses a second run by name; the lock of a process that
died (kill -9) is taken over and the takeover logged; release removes the lock file."""

import json
import logging
import os
import signal
import socket
import subprocess
import sys

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
