"""The GPU check's measuring probe. Python imports this module at start-up in every process the check
starts (benchmarks/gpu_check.py puts this folder first on PYTHONPATH and names an output folder in
GPU_CHECK_PROBE_DIR). It changes nothing in the program it watches; through torch's global hooks it
records when the first module forward began and when each optimizer step ended (for step times),
and at exit the process's peak GPU memory (torch.cuda.max_memory_allocated, when CUDA was used) and
peak resident memory (ru_maxrss). It writes them to GPU_CHECK_PROBE_DIR/<pid>.json.

Without GPU_CHECK_PROBE_DIR it does nothing; either way it then runs the sitecustomize module it
shadows, if there is one.
"""

import os
import sys


def _run_shadowed_sitecustomize() -> None:
    import importlib.machinery
    import importlib.util

    here = os.path.dirname(os.path.abspath(__file__))
    others = [p for p in sys.path if os.path.abspath(p or ".") != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", others)
    if spec is not None and spec.loader is not None:
        spec.loader.exec_module(importlib.util.module_from_spec(spec))


def _install(out_dir: str) -> None:
    import atexit
    import json
    import resource
    import time

    import torch  # every program the check runs imports it anyway
    from torch.nn.modules.module import register_module_forward_pre_hook
    from torch.optim.optimizer import register_optimizer_step_post_hook

    record = {"pid": os.getpid(), "argv": sys.argv, "rank": os.environ.get("RANK"), "first_forward": None,
              "step_ends": []}

    def cuda_in_use() -> bool:
        return torch.cuda.is_available() and torch.cuda.is_initialized()

    def on_first_forward(module, args):
        record["first_forward"] = time.perf_counter()
        forward_hook.remove()  # one global hook per forward call slows every module down

    def on_step_end(optimizer, args, kwargs):
        if cuda_in_use():
            torch.cuda.synchronize()
        record["step_ends"].append(time.perf_counter())

    forward_hook = register_module_forward_pre_hook(on_first_forward)
    register_optimizer_step_post_hook(on_step_end)

    def write():
        record["argv"] = sys.argv  # a training worker names its script only once it runs
        record["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        record["cuda"] = cuda_in_use()
        if record["cuda"]:
            record["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
            record["gpu_name"] = torch.cuda.get_device_name()
        with open(os.path.join(out_dir, f"{os.getpid()}.json"), "w") as f:
            json.dump(record, f)

    atexit.register(write)


PROGRAMS = ("finetune.py", "inference.py", "api_server.py")


def _runs_a_program() -> bool:
    """finetune.py, inference.py, api_server.py, and the training workers (launch_workers --as-worker
    finetune.py); not the launchers' `python -c` helpers, torchrun, nor the helpers libraries start."""
    words = getattr(sys, "orig_argv", sys.argv)
    return any(os.path.basename(word) in PROGRAMS for word in words[1:3]) or "--as-worker" in words


if os.environ.get("GPU_CHECK_PROBE_DIR") and _runs_a_program():
    _install(os.environ["GPU_CHECK_PROBE_DIR"])
_run_shadowed_sitecustomize()
