"""One case of the GPU check, as a user would run it: the plan (when finetune.py has one), the
launcher for a few steps, a resume of one more step, for a packed case the same records unpacked,
then inference.py on the result and, where asked, api_server.py answering one request. What each
run left behind (exit status, logs, trainer state, checkpoint files, the probe's records) becomes
the case's row (report.py holds the rules)."""

from __future__ import annotations

import json
import runpy
import shutil
import sys
import time
from concurrent.futures import Executor, Future
from pathlib import Path

from . import cases
from . import model as models
from . import report
from . import run as runs

ROOT = Path(__file__).resolve().parents[2]
BIG_MEMORY_LOCK = "/tmp/bigmem.lock"
TIME_LIMITS = {"gpu": 240, "cpu": 1200, "dry": 600}  # seconds per process
RESULT_FILES = {"ptuning": "prefix_encoder.safetensors", "lora": "adapter_model.safetensors"}


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def model_shape(shape: str) -> dict:
    """What bench_train.batch_flops needs, from the shape table (no model loaded)."""
    s = models.SHAPES[shape]
    params = models.parameter_count(shape)
    return {"params": params, "body_params": params - 2 * models.VOCAB * s["hidden_size"], "hidden": s["hidden_size"],
            "layers": s["num_layers"], "attn_dim": s["num_attention_heads"] * s["kv_channels"], "vocab": models.VOCAB}


def step_flops(case: cases.Case, shape: str, batch: dict) -> float:
    """Model FLOPs of one optimizer step of one process (the formula of benchmarks/bench_train.py:
    gradient checkpointing's recomputation not counted)."""
    batch_flops = runpy.run_path(str(ROOT / "benchmarks" / "bench_train.py"))["batch_flops"]
    return batch_flops(model_shape(shape), batch, trains_weights=case.method == "full", full_logits=False,
                       prefix_len=cases.PRE_SEQ_LEN if case.method == "ptuning" else 0)


class Check:
    """What every case shares: the mode, the folders, the models, the data, the Python to run."""

    def __init__(self, mode: cases.Mode, work: Path, python: str, model_dirs: dict[str, Future], data: dict,
                 peak_flops: float | None, plans: bool, background: Executor):
        self.mode, self.work, self.python = mode, work, python
        self.model_dirs, self.data, self.peak_flops, self.plans = model_dirs, data, peak_flops, plans
        self.background = background
        self.time_limit = TIME_LIMITS[mode.name]
        self.lock_waits: dict[str, float] = {}

    # ---- processes ---------------------------------------------------------------------------------
    def model_dir(self, case: cases.Case) -> Path:
        """The converted model of the case's shape, once it is ready (later shapes are made meanwhile)."""
        return self.model_dirs[cases.shape_of(case, self.mode)].result()

    def lock_for(self, case: cases.Case) -> str | None:
        """On the CPU every process of the check takes the big-memory lock: the 6B ones need 13-16 GB, the
        two ZeRO ranks several GB together."""
        return BIG_MEMORY_LOCK if self.mode.serialize_big else None

    def paths(self, case: cases.Case, label: str) -> tuple[Path, Path]:
        return self.work / "logs" / case.name / f"{label}.log", self.work / "probes" / case.name / label

    def launch(self, case: cases.Case, label: str, output_dir: Path, max_steps: int, batch_size: int = 1,
               extra_args: tuple[str, ...] = (), extra_env: dict[str, str] | None = None) -> runs.Finished:
        model_dir = self.model_dir(case)
        variables = cases.launcher_env(case, self.mode, str(model_dir), self.data[case.data]["path"], str(output_dir),
                                       max_steps, batch_size) | (extra_env or {})
        command = ["bash", f"scripts/{case.launcher}", *cases.launcher_args(case, self.mode), *extra_args]
        log, probes = self.paths(case, label)
        return self.counted(case, runs.run(command, runs.probed_env(self.python, probes, variables), log, probes,
                                           self.time_limit, self.lock_for(case), say))

    def counted(self, case: cases.Case, run: runs.Finished) -> runs.Finished:
        """`run`, its wait for the big-memory lock added to the case's (not part of the case's time)."""
        self.lock_waits[case.name] = self.lock_waits.get(case.name, 0.0) + run.waited
        return run

    def program_command(self, case: cases.Case, output_dir: Path, program: str) -> list[str]:
        """inference.py or api_server.py on what the case trained, as the run summary says to."""
        base = str(self.model_dir(case))
        model = {"ptuning": ["--model", base, "--pt-checkpoint", str(output_dir)],
                 "lora": ["--model", base, "--lora", str(output_dir)]}.get(case.method, ["--model", str(output_dir)])
        device = ["--device", "cpu"] if self.mode.device == "cpu" else []
        dtype = ["--dtype", "bfloat16"] if self.mode.name == "cpu" else []  # fp32 (the CPU default) is 25 GB at 6B
        command = [self.python, program, *model, *device, *dtype]
        return command + (["--prompt", "Hello", "--max-new-tokens", "8"] if program == "inference.py" else [])

    def infer(self, case: cases.Case, output_dir: Path) -> runs.Finished:
        log, probes = self.paths(case, "inference")
        return self.counted(case, runs.run(self.program_command(case, output_dir, "inference.py"),
                                           runs.probed_env(self.python, probes, {}), log, probes, self.time_limit,
                                           self.lock_for(case), say))

    def serve(self, case: cases.Case, output_dir: Path) -> tuple[runs.Finished, str | None]:
        log, probes = self.paths(case, "server")
        finished, answer = runs.serve_one_request(self.program_command(case, output_dir, "api_server.py"),
                                                  runs.probed_env(self.python, probes, {}), log, probes,
                                                  self.time_limit, self.lock_for(case), say)
        return self.counted(case, finished), answer

    def plan(self, case: cases.Case) -> dict | None:
        """The memory plan of exactly this run, through the launcher's own PLAN=1 with --plan_json: the
        step's tensors (what max_memory_allocated measures) and the total with the CUDA context,
        workspaces and fragmentation."""
        path = self.work / "plans" / f"{case.name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)
        finished = self.launch(case, "plan", self.work / "runs" / f"{case.name}-plan", self.mode.steps,
                               extra_args=("--plan_json", str(path)), extra_env={"PLAN": "1"})
        if not finished.ok or not path.exists():
            say(f"  {case.name}: no plan ({finished.failure()})")
            return None
        plan = json.loads(path.read_text())
        return {"tensors": plan.get("tensor_peak_bytes"), "total": plan.get("peak_bytes")}

    # ---- one case ----------------------------------------------------------------------------------
    def run_case(self, case: cases.Case, skip_reason: str | None):
        """Runs the case's training and resume now; returns a function that completes its row, waiting
        for its inference and server runs (which may go on in the background meanwhile)."""
        shape = cases.shape_of(case, self.mode)
        row = report.new_row(case.name, case.method, shape, case.attention,
                             self.data[case.data]["real_tokens"] * cases.ranks_of(case, self.mode))
        row["peak_kind"] = "cuda max_memory_allocated" if self.mode.device == "cuda" else "peak RSS"
        if skip_reason:
            row.update(status="skipped", reason=skip_reason)
            return lambda: row
        self.model_dir(case)  # waits until its model is made: not part of the case's time
        started = time.monotonic()
        output_dir = self.work / "runs" / case.name
        for folder in (output_dir, self.work / "probes" / case.name):
            shutil.rmtree(folder, ignore_errors=True)
        # The plan needs no GPU and no weights: on a GPU it runs beside the training, on a CPU before it.
        plan = self.background.submit(self.plan, case) if self.plans and not self.mode.serialize_big else None
        if self.plans and plan is None:
            self.record_plan(row, self.plan(case))
        say(f"{case.name}: training {self.mode.steps} step(s)")
        first = self.launch(case, "train", output_dir, self.mode.steps)
        self.record_training(row, case, first, output_dir)
        if first.ok:
            say(f"{case.name}: resuming from its checkpoint for one more step")
            self.record_resume(row, self.launch(case, "resume", output_dir, self.mode.steps + 1), output_dir)
            if case.packed_reference:
                self.compare_unpacked(row, case)
        inference = server = None
        if row["saved"]:
            say(f"{case.name}: inference{' and the server' if case.server else ''} on the result")
            inference = self.background.submit(self.infer, case, output_dir)
            server = self.background.submit(self.serve, case, output_dir) if case.server else None

        def complete() -> dict:
            if plan is not None:
                self.record_plan(row, plan.result())
            if inference is not None:
                self.record_inference(row, inference.result())
            if server is not None:
                self.record_server(row, *server.result())
            return self.finish(row, started)

        return complete

    def finish(self, row: dict, started: float) -> dict:
        """The row complete; the case's time leaves out its waits for the big-memory lock."""
        row["lock_wait_s"] = round(self.lock_waits.get(row["case"], 0.0), 1)
        return report.finish(row, time.monotonic() - started - row["lock_wait_s"])

    @staticmethod
    def record_plan(row: dict, plan: dict | None) -> None:
        if plan:
            row["planned_bytes"], row["planned_total_bytes"] = plan["tensors"], plan["total"]

    def record_peaks(self, row: dict, run: runs.Finished, training: bool = True) -> None:
        """peak_bytes: the training processes' peak (max_memory_allocated on a GPU, RSS on the CPU);
        peak_rss_bytes: the largest RSS of any process of the case."""
        def highest(*values):
            return max((v for v in values if v is not None), default=None)

        if training:
            measured = run.peak("peak_gpu_bytes") if self.mode.device == "cuda" else run.peak("peak_rss_bytes")
            row["peak_bytes"] = highest(row["peak_bytes"], measured)
        row["peak_rss_bytes"] = highest(row["peak_rss_bytes"], run.peak("peak_rss_bytes"))

    def record_training(self, row: dict, case: cases.Case, run: runs.Finished, output_dir: Path) -> None:
        text = run.text()
        self.record_peaks(row, run)
        row["trainable_parameters"] = runs.trainable_parameters(text)
        if not run.ok:
            report.fail(row, f"training failed: {run.failure()}")
            return
        if case.quantization_bit and f"linear layers in {case.quantization_bit} bits" not in text:
            report.fail(row, f"the base was not loaded in {case.quantization_bit} bits (no such line in {run.log})")
        checkpoint = output_dir / f"checkpoint-{self.mode.steps}"
        result = output_dir / RESULT_FILES.get(case.method, "")
        complete_result = result.is_file() if case.method in RESULT_FILES else any(output_dir.glob("model*.safetensors"))
        row["saved"] = checkpoint.is_dir() and complete_result
        if not row["saved"]:
            report.fail(row, f"missing {checkpoint.name} or the trained result in {output_dir}")
        row["checkpoint_bytes"] = runs.weight_bytes(checkpoint) if checkpoint.is_dir() else None
        if row["trainable_parameters"]:
            row["checkpoint_limit_bytes"] = report.checkpoint_limit(row["trainable_parameters"])
        problem = report.checkpoint_problem(row["checkpoint_bytes"], row["trainable_parameters"])
        if problem:
            report.fail(row, problem)
        trainer = next((p for p in run.probes if p["step_ends"] and p.get("rank") in (None, "0")), None)
        if trainer:
            row["step_s"] = report.step_seconds(trainer["step_ends"], trainer["first_forward"])
        if row["step_s"]:
            batch = self.data[case.data]
            row["tokens_per_s"] = row["tokens_per_step"] / row["step_s"]
            if self.peak_flops:
                row["mfu"] = step_flops(case, row["model"], batch) / row["step_s"] / self.peak_flops

    def record_resume(self, row: dict, run: runs.Finished, output_dir: Path) -> None:
        steps = self.mode.steps + 1
        self.record_peaks(row, run)
        row["losses"] = {str(step): loss for step, loss in sorted(runs.logged_losses(output_dir).items())}
        if not run.ok:
            report.fail(row, f"resume failed: {run.failure()}")
        elif "Resuming from" not in run.text() or runs.global_step(output_dir) != steps:
            report.fail(row, f"the rerun did not continue from checkpoint-{self.mode.steps} to step {steps} ({run.log})")
        else:
            row["resumed"] = True
        problem = report.loss_problem({int(k): v for k, v in row["losses"].items()}, steps)
        if problem:
            report.fail(row, problem)

    def compare_unpacked(self, row: dict, case: cases.Case) -> None:
        """The same records unpacked, trained as the packed run was (its steps, then a resume of one
        more): the losses of every step must agree, the resumed one included."""
        say(f"{case.name}: the same records unpacked, one padded batch, the same steps and resume")
        twin = cases.reference_case(case)
        output_dir = self.work / "runs" / twin.name
        shutil.rmtree(output_dir, ignore_errors=True)
        batch_size = self.data[case.data]["records"]
        run = self.launch(twin, "unpacked", output_dir, self.mode.steps, batch_size=batch_size)
        if run.ok:
            run = self.launch(twin, "unpacked_resume", output_dir, self.mode.steps + 1, batch_size=batch_size)
        unpacked = runs.logged_losses(output_dir)
        row["unpacked_losses"] = {str(step): loss for step, loss in sorted(unpacked.items())}
        if not run.ok:
            report.fail(row, f"the unpacked run failed: {run.failure()}")
            return
        problem = report.packed_problem({int(k): v for k, v in row["losses"].items()}, unpacked,
                                        report.PACKED_LOSS_TOLERANCE[self.mode.name])
        if problem:
            report.fail(row, problem)

    def record_inference(self, row: dict, run: runs.Finished) -> None:
        self.record_peaks(row, run, training=False)
        row["inference_peak_bytes"] = run.peak("peak_gpu_bytes")
        row["inference"] = run.ok
        if not run.ok:
            report.fail(row, f"inference failed: {run.failure()}")

    def record_server(self, row: dict, run: runs.Finished, answer: str | None) -> None:
        self.record_peaks(row, run, training=False)
        row["server"] = answer is not None
        if answer is None:
            report.fail(row, f"the server did not answer: {run.failure()}")
