"""One run per output folder: `output_dir/run.lock` holds the pid, host, start time and command of the
run that owns the folder, and an exclusive flock on it for as long as that process lives.

The kernel drops the flock when its process dies, however it dies (kill -9 included), so a lock file
that can be locked again was left by a dead run: it is taken over, and the takeover is logged. On a
filesystem without flock the pid decides, for a lock written on this host.
"""

from __future__ import annotations

import atexit
import errno
import fcntl
import json
import logging
import os
import socket
import sys
import time

logger = logging.getLogger(__name__)

LOCK_FILE = "run.lock"


class FolderLocked(RuntimeError):
    """Another run holds the output folder."""


def describe_holder(holder: dict) -> str:
    return (f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}"
            + (f": {holder['command']}" if holder.get("command") else ""))


def _pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, TypeError):
        return True
    return True


def _read_holder(fd: int) -> dict:
    os.lseek(fd, 0, os.SEEK_SET)
    data = b""
    while chunk := os.read(fd, 65536):
        data += chunk
    try:
        holder = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


class RunLock:
    """The lock of one output folder, held by this process until `release` (or its exit)."""

    def __init__(self, output_dir: str):
        self.output_dir = output_dir
        self.path = os.path.join(output_dir, LOCK_FILE)
        self.fd: int | None = None
        self.took_over: dict | None = None  # the dead run's lock, when this one replaced it

    def acquire(self) -> "RunLock":
        """Takes the lock, or raises FolderLocked naming the run that holds it."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                locked = self._try_flock(fd)
                holder = _read_holder(fd)
                if not locked or (locked == "no-flock" and holder and self._held_by_a_live_run(holder)):
                    raise FolderLocked(self._message(holder))
            except BaseException:
                os.close(fd)
                raise
            if self._still_the_file(fd):
                break
            os.close(fd)  # released and removed by its owner while this one opened it: open the new one
        if holder and holder.get("pid") != os.getpid():
            self.took_over = holder
            logger.warning("Took over the lock of --output_dir %s from a run that is no longer running (%s)",
                           self.output_dir, describe_holder(holder))
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                  "command": " ".join(sys.argv)}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode("utf-8"), 0)
        self.fd = fd
        atexit.register(self.release)
        return self

    def _try_flock(self, fd: int):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        except OSError as e:
            if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                return "no-flock"
            raise
        return True

    def _still_the_file(self, fd: int) -> bool:
        try:
            return os.path.samestat(os.fstat(fd), os.stat(self.path))
        except FileNotFoundError:
            return False

    @staticmethod
    def _held_by_a_live_run(holder: dict) -> bool:
        if holder.get("host") != socket.gethostname():
            return True  # no way to tell from here
        return _pid_alive(holder.get("pid"))

    def _message(self, holder: dict) -> str:
        who = describe_holder(holder) if holder else "a run that has not written its details yet"
        return (f"--output_dir {self.output_dir} is in use by another run ({who}). Wait for it to end or stop it, "
                f"or choose another --output_dir; if that run is gone, remove {self.path}")

    def release(self) -> None:
        """Removes the lock file (still ours) and drops the flock."""
        if self.fd is None:
            return
        atexit.unregister(self.release)
        fd, self.fd = self.fd, None
        try:
            if self._still_the_file(fd):
                os.unlink(self.path)
        except OSError:
            pass
        os.close(fd)
