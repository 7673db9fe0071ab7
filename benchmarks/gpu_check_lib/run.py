"""Running the GPU check's processes: a launcher, inference.py or api_server.py as a user would run
them, each with the measuring probe (benchmarks/gpu_check_probe/sitecustomize.py) on its PYTHONPATH, its
output in a log file, a time limit, and, where asked, a lock so that only one big model is in
memory on this machine at a time."""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROBE_DIR = Path(__file__).resolve().parents[1] / "gpu_check_probe"


@dataclass
class Finished:
    """One finished process (or process tree: a launcher and its workers)."""

    command: list[str]
    returncode: int | None  # None: stopped at its time limit
    seconds: float
    log: Path
    probes: list[dict] = field(default_factory=list)  # one per probed Python process
    waited: float = 0.0  # seconds spent waiting for the big-memory lock before it started

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def failure(self) -> str:
        """What went wrong, in one line: the exit status and the last error line of the log."""
        if self.returncode is None:
            return f"over its time limit ({self.seconds:.0f} s); log {self.log}"
        lines = [line.strip() for line in self.text().splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("error:") or "Error" in line or "error" in line.lower()[:40]]
        last = (errors or lines or ["(no output)"])[-1]
        return f"exit {self.returncode}: {last[:300]} (log {self.log})"

    def peak(self, key: str) -> int | None:
        values = [probe[key] for probe in self.probes if probe.get(key) is not None]
        return max(values) if values else None


@contextlib.contextmanager
def big_memory_lock(path: str | None, say):
    """Holds an exclusive lock on `path` (none when None): one big model in memory at a time.
    Yields the seconds spent waiting for it."""
    if not path:
        yield 0.0
        return
    with open(path, "a") as handle:
        start = time.monotonic()
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(f"  waiting for {path} (another big-memory job holds it)")
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield time.monotonic() - start
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def probed_env(python: str, probe_dir: Path, extra: dict[str, str]) -> dict[str, str]:
    """The environment of a probed process: the probe first on PYTHONPATH (then the project, for a
    Python without the project installed), the launchers' PYTHON, and the run's variables."""
    path = [str(PROBE_DIR), str(ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path), "GPU_CHECK_PROBE_DIR": str(probe_dir),
            "PYTHON": python, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", **extra}


def read_probes(probe_dir: Path) -> list[dict]:
    probes = []
    for path in sorted(probe_dir.glob("*.json")):
        try:
            probes.append(json.loads(path.read_text()))
        except ValueError:  # a process killed while writing
            continue
    return probes


def run(command: list[str], env: dict[str, str], log: Path, probe_dir: Path, timeout: float,
        lock: str | None = None, say=print) -> Finished:
    """Runs `command` from the project root in a process group of its own, output to `log`; the
    whole group is stopped at `timeout` seconds."""
    probe_dir.mkdir(parents=True, exist_ok=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    with big_memory_lock(lock, say) as waited, open(log, "w") as out:
        out.write("+ " + " ".join(command) + "\n")
        out.flush()
        start = time.monotonic()
        process = subprocess.Popen(command, cwd=str(ROOT), env=env, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            returncode = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            stop_group(process)
            returncode = None
        seconds = time.monotonic() - start
    return Finished(command, returncode, seconds, log, read_probes(probe_dir), waited)


def stop_group(process: subprocess.Popen, grace: float = 20) -> None:
    """SIGTERM to the process group (training saves and exits), SIGKILL after `grace` seconds."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_one_request(command: list[str], env: dict[str, str], log: Path, probe_dir: Path, timeout: float,
                      lock: str | None = None, say=print) -> tuple[Finished, str | None]:
    """Starts api_server.py (`command` without --port), asks it one chat question, stops it (SIGTERM,
    as a service manager would). Returns the finished server and the answer's text, or None with the
    reason in the log."""
    port = free_port()
    probe_dir.mkdir(parents=True, exist_ok=True)
    with big_memory_lock(lock, say) as waited, open(log, "w") as out:
        full = [*command, "--port", str(port)]
        out.write("+ " + " ".join(full) + "\n")
        out.flush()
        start = time.monotonic()
        process = subprocess.Popen(full, cwd=str(ROOT), env=env, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        answer = None
        try:
            answer = ask(port, process, deadline=start + timeout, out=out)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                returncode = process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                stop_group(process, grace=0)
                returncode = None
        seconds = time.monotonic() - start
    # A server stopped by SIGTERM after answering exits 0 (uvicorn's orderly shutdown).
    return Finished(full, returncode, seconds, log, read_probes(probe_dir), waited), answer


def ask(port: int, process: subprocess.Popen, deadline: float, out) -> str | None:
    base = f"http://127.0.0.1:{port}/v1"
    while True:  # until the model is loaded and the server listens
        if process.poll() is not None:
            return None
        try:
            with urllib.request.urlopen(base + "/models", timeout=5) as response:
                model = json.loads(response.read())["data"][0]["id"]
                break
        except (urllib.error.URLError, ConnectionError, OSError):
            if time.monotonic() > deadline:
                out.write("gpu_check: the server did not answer /v1/models in time\n")
                return None
            time.sleep(0.5)
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8,
                       "temperature": 0}).encode()
    request = urllib.request.Request(base + "/chat/completions", data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=max(5.0, deadline - time.monotonic())) as response:
            reply = json.loads(response.read())
    except (urllib.error.URLError, OSError, ValueError) as e:
        out.write(f"gpu_check: the chat request failed: {e}\n")
        return None
    out.write("gpu_check: answer " + json.dumps(reply) + "\n")
    message = reply["choices"][0]["message"]
    return message.get("content") or json.dumps(message.get("tool_calls"))


# --- what a run left behind ----------------------------------------------------------------------
def logged_losses(output_dir: Path) -> dict[int, float]:
    """step -> training loss, from the newest trainer_state.json of the run (the final one, else
    the newest checkpoint's)."""
    states = [output_dir / "trainer_state.json", *sorted(output_dir.glob("checkpoint-*/trainer_state.json"),
                                                          key=lambda p: -int(p.parent.name.split("-")[1]))]
    for state in states:
        if state.exists():
            history = json.loads(state.read_text()).get("log_history", [])
            return {entry["step"]: float(entry["loss"]) for entry in history if "loss" in entry}
    return {}


def global_step(output_dir: Path) -> int | None:
    state = output_dir / "trainer_state.json"
    return json.loads(state.read_text()).get("global_step") if state.exists() else None


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def weight_bytes(folder: Path) -> int:
    """Bytes of the weight and optimizer files under `folder` (not the tokenizer, configs and logs)."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES)


def trainable_parameters(log_text: str) -> int | None:
    """What the Trainer logged as it started: 'Number of trainable parameters = 1,835,008'."""
    marker = "Number of trainable parameters = "
    for line in log_text.splitlines():
        if marker in line:
            return int(line.split(marker)[1].split()[0].replace(",", ""))
    return None


def finite(values) -> bool:
    return all(math.isfinite(v) for v in values)


def python_for_children() -> str:
    """The Python of every process: $PYTHON (a path or a name on PATH, made absolute), else this one."""
    import shutil

    given = os.environ.get("PYTHON")
    return (shutil.which(given) and os.path.abspath(shutil.which(given))) if given else sys.executable
