"""Stopping the suite: SIGTERM to pytest (or Ctrl-C) while tests run trainings ends pytest with a
summary, and no process the tests started survives it (tests/suite_processes.py)."""

import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

from conftest import ROOT

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")]


def processes_with(marker: str) -> list[int]:
    """Live (not zombie) processes whose environment holds `marker` (NAME=value)."""
    found = []
    for name in os.listdir("/proc"):
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                if marker.encode() not in f.read().split(b"\0"):
                    continue
            with open(f"/proc/{name}/stat", "rb") as f:
                if f.read().rsplit(b")", 1)[1].split()[0] in (b"Z", b"X"):
                    continue
        except (OSError, ValueError, IndexError):
            continue
        found.append(int(name))
    return found


def command_line(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


@pytest.mark.parametrize("signum, workers", [(signal.SIGTERM, 0), (signal.SIGINT, 0), (signal.SIGTERM, 2)],
                         ids=["SIGTERM", "SIGINT", "SIGTERM-xdist"])
def test_a_stopped_suite_leaves_no_process_behind(tmp_path, signum, workers):
    """A pytest of its own (with `workers`, in pytest-xdist workers) runs tests/suite_stop_target.py,
    whose test starts a launcher in a session of its own and a blocking training; once both train,
    pytest (only the main pytest process) gets the signal."""
    marker = f"SUITE_STOP_TEST={uuid.uuid4().hex}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", marker.split("=")[0]: marker.split("=")[1]}
    env.pop("PYTEST_XDIST_WORKER", None)  # the inner pytest is a suite of its own, whatever runs this test
    suite = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", str(workers), "--basetemp",
                              str(tmp_path / "inner"), "tests/suite_stop_target.py"],
                             cwd=ROOT, env=env, start_new_session=True, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        trainings: list[int] = []
        while len(trainings) < 2:
            assert suite.poll() is None and time.monotonic() < deadline, suite.communicate()[0][-3000:]
            time.sleep(0.5)
            trainings = [pid for pid in processes_with(marker) if "finetune.py" in command_line(pid)]
        def log_text() -> str:  # xdist gives each worker a folder of its own under --basetemp
            return "".join(log.read_text() for log in (tmp_path / "inner").rglob("launched/train.log"))

        while "'loss':" not in log_text():
            assert suite.poll() is None and time.monotonic() < deadline, suite.communicate()[0][-3000:]
            time.sleep(0.5)
        started = processes_with(marker)
        assert len(started) >= 5  # pytest, bash, tee, two finetune.py
        os.kill(suite.pid, signum)
        output = suite.communicate(timeout=120)[0]
        assert suite.returncode == (143 if signum == signal.SIGTERM else 2), output[-3000:]
        assert "Traceback" not in output
        if signum == signal.SIGTERM:
            assert "stopped by SIGTERM; killed the" in output, output[-3000:]
        else:
            assert "KeyboardInterrupt" in output, output[-3000:]
        end = time.monotonic() + 10
        while processes_with(marker) and time.monotonic() < end:
            time.sleep(0.1)
        assert processes_with(marker) == [], [command_line(pid) for pid in processes_with(marker)]
    finally:
        for pid in processes_with(marker):
            os.kill(pid, signal.SIGKILL)
