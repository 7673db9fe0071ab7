"""torchrun as the launchers use it: workers that die with their launcher, and a failed worker's own
error as the last thing shown, its exit code returned, without torchrun's traceback.

    python -m chatglm3_finetune.train.launch_workers --standalone --nproc_per_node 2 finetune.py FLAGS...
    python -m chatglm3_finetune.train.launch_workers --nnodes 2 --node_rank 0 --master_addr HOST \\
        --master_port 29500 --nproc_per_node 8 finetune.py FLAGS...

It takes torchrun's options. torchrun starts each worker in a session of its own, so killing the
launcher's process group (kill -9, a scheduler's cancel) would leave the workers training and
writing checkpoints; here each worker asks the kernel to kill it when its launcher dies.
"""

from __future__ import annotations

import ctypes
import logging
import os
import runpy
import signal
import sys

LAUNCHER_PID = "CHATGLM3_LAUNCHER_PID"
WORKER_FLAG = "--as-worker"
PR_SET_PDEATHSIG = 1


def exit_code_of(failures: dict) -> int:
    """The exit code of the first worker that failed by itself (one that exited non-zero rather than
    being killed when the others were stopped); 128 + N for a worker killed by signal N."""
    first = min(failures.values(), key=lambda failure: (failure.exitcode < 0, failure.timestamp))
    return first.exitcode if first.exitcode >= 0 else 128 - first.exitcode


def launch(argv: list[str]) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = parse_args(argv)
    if args.module or args.no_python:
        raise SystemExit("error: launch_workers runs a Python script (finetune.py); -m and --no-python are not supported")
    args.training_script_args = [WORKER_FLAG, args.training_script, *args.training_script_args]
    args.training_script, args.module = "chatglm3_finetune.train.launch_workers", True
    os.environ[LAUNCHER_PID] = str(os.getpid())
    # The agent's own report of a failure repeats what the worker printed, in a traceback.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        run(args)
    except ChildFailedError as failed:
        return exit_code_of(failed.failures)
    except SignalException as stopped:  # Ctrl-C or SIGTERM: the workers were sent SIGTERM and waited for
        return 128 + stopped.sigval
    return 0


def die_with_launcher() -> None:
    """Linux: the kernel sends this process SIGKILL when the launcher that started it dies."""
    launcher = int(os.environ.get(LAUNCHER_PID, "0"))
    if not sys.platform.startswith("linux") or not launcher:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != launcher:  # it died before prctl: the death signal will never come
        os.kill(os.getpid(), signal.SIGKILL)


def run_as_worker(script: str, script_args: list[str]) -> None:
    die_with_launcher()
    sys.argv = [script, *script_args]
    runpy.run_path(script, run_name="__main__")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [WORKER_FLAG]:
        run_as_worker(argv[1], argv[2:])
    else:
        sys.exit(launch(argv))


if __name__ == "__main__":
    main()
