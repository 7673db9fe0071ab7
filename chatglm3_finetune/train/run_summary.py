"""The summary finetune.py ends with: the data used and left out, what the length caps cost,
the supervised tokens trained, the time taken, where the result is and the command that uses it."""

from __future__ import annotations

import os
import shlex
import sys

RECORD_FILES = ("run_config.json", "loss_curve.png", "train_results.json", "eval_results.json")
METHOD_NAMES = {"ptuning": "a P-Tuning v2 prefix", "lora": "LoRA adapters", "full": "a fully fine-tuned model"}


def python_command() -> str:
    """The Python that runs this, as a user would type it here (`.venv/bin/python` from the project
    folder): the printed command then works in a new shell with nothing activated."""
    relative = os.path.relpath(sys.executable)
    return shlex.quote(sys.executable if relative.startswith("..") else relative)


def inference_command(method: str, output_dir: str, base_model: str) -> str:
    """The inference.py command line that chats with what a run of `method` saved in `output_dir`."""
    output, base = shlex.quote(output_dir), shlex.quote(base_model)
    if method == "ptuning":
        return f"{python_command()} inference.py --model {base} --pt-checkpoint {output}"
    if method == "lora":
        return f"{python_command()} inference.py --model {base} --lora {output}"
    return f"{python_command()} inference.py --model {output}"


def format_duration(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m {seconds:02d}s" if hours else f"{minutes}m {seconds:02d}s"


def summary_lines(seconds: float, sources: dict[str, str], reports: dict, caps: str, trained: dict | None,
                  metrics: dict[str, dict], output_dir: str, method: str, base_model: str) -> list[str]:
    """`sources`/`reports`: per split ("train", "eval", "test") its data source and TruncationReport
    (None for prompt-only generation splits); `trained`: {"supervised_tokens", "steps"} or None
    when nothing was trained; `metrics`: per split the metrics logged."""
    lines = ["==== Run summary"]
    for name, report in reports.items():
        if report is None:
            continue
        lines.append(f"{name} data {sources[name]}: {report.records} records, {report.kept} used, "
                     f"{report.records - report.kept} left out, {report.truncated} truncated by {caps}")
        lines += [f"  WARNING: {warning}" for warning in report.warnings(caps)]
    if trained:
        lines.append(f"trained: {trained['steps']} steps, {trained['supervised_tokens']:,} supervised tokens")
    for name, values in metrics.items():
        shown = ", ".join(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}"
                          for key, value in values.items() if key != "epoch" and not key.endswith(("_runtime", "_per_second")))
        lines.append(f"{name}: {shown}")
    lines.append(f"time: {format_duration(seconds)}")
    if trained:
        beside = [name for name in RECORD_FILES if os.path.isfile(os.path.join(output_dir, name))]
        lines.append(f"result: {output_dir} ({METHOD_NAMES[method]}" + (f"; beside it {', '.join(beside)})"
                                                                        if beside else ")"))
        lines.append(f"chat with it: {inference_command(method, output_dir, base_model)}")
    return lines
