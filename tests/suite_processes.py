"""A clean stop of the test suite: on SIGTERM (`kill PID`, a CI job cancelled) or Ctrl-C, every
process the tests started is killed before pytest exits, training processes in sessions of their
own and their workers included. Without it SIGTERM ends pytest alone, and a training started by a
test keeps running (and writing) for minutes. tests/conftest.py installs it; Linux only (/proc)."""

from __future__ import annotations

import os
import signal
import sys

import pytest

SUITE_MARKER = "CHATGLM3_TEST_SUITE_PID"  # in the environment of everything the suite starts


def install() -> None:
    """Marks this process's environment (children inherit it) and turns SIGTERM into a stop."""
    if not sys.platform.startswith("linux"):
        return
    os.environ[SUITE_MARKER] = str(os.getpid())
    signal.signal(signal.SIGTERM, _stop_on_sigterm)


def _stop_on_sigterm(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM while stopping ends pytest at once
    killed = kill_suite_processes()
    pytest.exit(f"stopped by SIGTERM; killed the {killed} processes the tests had started", returncode=128 + signum)


def kill_suite_processes() -> int:
    """Freezes (SIGSTOP: a stopped process starts nothing) every suite process until no new one
    appears, then kills them all; returns how many."""
    if not sys.platform.startswith("linux"):
        return 0
    stopped: set[int] = set()
    for _ in range(50):
        new = suite_processes() - stopped
        if not new:
            break
        for pid in new:
            _send(pid, signal.SIGSTOP)
        stopped |= new
    for pid in stopped:
        _send(pid, signal.SIGKILL)
    return len(stopped)


def suite_processes(root: int | None = None) -> set[int]:
    """The live processes the tests of the pytest `root` (default: this one) started: its
    descendants, everything in the process groups and sessions they made (torchrun workers, a
    launcher started with start_new_session), and whatever carries the suite's marker in its
    environment (an orphan whose parent died). Never `root`, its own group or its session."""
    root = os.getpid() if root is None else root
    table = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and (stat := _stat(int(name))) is not None:
            table[int(name)] = stat
    children: dict[int, list[int]] = {}
    for pid, (parent, _, _) in table.items():
        children.setdefault(parent, []).append(pid)
    found, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    own_group, own_session = table[root][1:] if root in table else (os.getpgid(root), os.getsid(root))
    groups = {table[pid][1] for pid in found} - {own_group}
    sessions = {table[pid][2] for pid in found} - {own_session}
    marker = f"{SUITE_MARKER}={root}".encode()
    found |= {pid for pid, (_, group, session) in table.items()
              if group in groups or session in sessions or _carries(pid, marker)}
    found.discard(root)
    return found


def _stat(pid: int) -> tuple[int, int, int] | None:
    """(parent, process group, session) of a live process; None when it is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()  # the command name may hold spaces and ")"
    except OSError:
        return None
    if fields[0] in (b"Z", b"X"):
        return None
    return int(fields[1]), int(fields[2]), int(fields[3])


def _carries(pid: int, marker: bytes) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return marker in f.read().split(b"\0")
    except OSError:
        return False


def _send(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except (ProcessLookupError, PermissionError):
        pass
