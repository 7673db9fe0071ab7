"""The GPU check as a whole: the versions found, the models and data it trains on, then every case
in turn (case.py), each row printed and the JSON rewritten as it completes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from . import cases, report
from . import model as models
from . import run as runs
from .case import BIG_MEMORY_LOCK, Check, say

ROOT = Path(__file__).resolve().parents[2]
TOKENIZER_CANDIDATES = (ROOT.parent / "shared" / "data" / "chatglm3-tokenizer", ROOT / ".gpu_check" / "tokenizer")
MODEL_READY = "gpu_check_model.json"  # beside a converted model: what it was made from


# --- environment -----------------------------------------------------------------------------------
def versions() -> dict[str, str]:
    from importlib import metadata

    found = {"python": sys.version.split()[0]}
    for name in ("torch", "transformers", "peft", "accelerate", "deepspeed", "bitsandbytes", "flash_attn",
                 "datasets", "safetensors", "tokenizers"):
        try:
            found[name] = metadata.version(name.replace("_", "-"))
        except metadata.PackageNotFoundError:
            found[name] = "absent"
    import torch

    found["cuda"] = torch.version.cuda or "none"
    found["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    return found


def importable(module: str, python: str) -> str | None:
    """None when `python` imports `module`, else the reason it does not."""
    probe = subprocess.run([python, "-c", f"import {module}"], capture_output=True, text=True, cwd=str(ROOT))
    if probe.returncode == 0:
        return None
    lines = probe.stderr.strip().splitlines() or ["import failed"]
    return f"{module} absent" if "No module named" in lines[-1] else f"{module} does not import ({lines[-1][:160]})"


def matmul_peak(mode: cases.Mode, python: str) -> float | None:
    """FLOP/s of a square matmul in the mode's training dtype on its device (bench_train.matmul_peak), in a
    process of its own."""
    code = ("import runpy, torch; peak = runpy.run_path('benchmarks/bench_train.py')['matmul_peak']; "
            f"print(peak('{mode.device}', torch.{mode.peak_dtype})[0])")
    result = subprocess.run([python, "-c", code], capture_output=True, text=True, cwd=str(ROOT))
    try:
        return float(result.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        say(f"matmul peak not measured: {result.stderr.strip()[-300:]}")
        return None


def plan_supported(python: str) -> bool:
    """finetune.py has the memory plan (--plan_json) when its --help names it."""
    result = subprocess.run([python, "finetune.py", "--help"], capture_output=True, text=True, cwd=str(ROOT),
                            env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])})
    return "--plan_json" in result.stdout


# --- models and data -------------------------------------------------------------------------------
def prepare_model(shape: str, work: Path, tokenizer_dir: Path, python: str, mode: cases.Mode, fresh: bool) -> Path:
    """The converted model of `shape` in work/models: written in the original layout shard by shard,
    converted with scripts/convert_chatglm3.py (bf16), the original then removed. Reused when a
    previous run made the same one."""
    converted = work / "models" / shape
    recipe = {"shape": models.original_config(shape), "tokenizer": sorted(p.name for p in tokenizer_dir.iterdir())}
    ready = converted / MODEL_READY
    if not fresh and ready.exists() and json.loads(ready.read_text()) == recipe:
        say(f"model {shape}: reusing {converted}")
        return converted
    original = work / "models" / f"{shape}-original"
    shutil.rmtree(converted, ignore_errors=True)
    lock = BIG_MEMORY_LOCK if mode.serialize_big else None
    start = time.monotonic()
    say(f"model {shape}: writing a random ChatGLM3 checkpoint in the original layout to {original}")
    with runs.big_memory_lock(lock, say):
        models.write_original_checkpoint(str(original), shape, str(tokenizer_dir), device=mode.device,
                                         progress=lambda line: say(line))
    written = time.monotonic() - start
    say(f"model {shape}: converting with scripts/convert_chatglm3.py")
    command = [python, "scripts/convert_chatglm3.py", "--input", str(original), "--output", str(converted),
               "--dtype", "bfloat16"]
    log = work / "logs" / f"convert-{shape}.log"
    finished = runs.run(command, {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])},
                        log, work / "probes" / f"convert-{shape}", timeout=1800, lock=lock, say=say)
    if not finished.ok:
        raise SystemExit(f"error: converting the {shape} checkpoint failed: {finished.failure()}")
    shutil.rmtree(original)
    ready.write_text(json.dumps(recipe))
    say(f"model {shape}: written in {written:.0f} s, converted in {finished.seconds:.0f} s")
    return converted


def prepare_data(mode: cases.Mode, work: Path, tokenizer_dir: Path) -> dict[str, dict]:
    """The training files of each data kind and what one step's batch holds (for FLOPs)."""
    from chatglm3_finetune.data.encoding import encode_multi_turn, encode_prompt_response
    from chatglm3_finetune.format.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(str(tokenizer_dir))
    words = models.one_token_words(tokenizer)
    folder = work / "data"
    folder.mkdir(parents=True, exist_ok=True)
    prompt = cases.prompt_tokens(mode)
    records = {
        "conversations": [models.conversation_of_length(tokenizer, mode.tokens, 0, words)],
        "packed": [models.conversation_of_length(tokenizer, n, i + 1, words) for i, n in enumerate(mode.pack_lengths)],
        "prompt_response": [models.prompt_response_of_length(tokenizer, prompt, mode.tokens - prompt, 9, words)],
    }
    data = {}
    for kind, items in records.items():
        path = folder / f"{kind}.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in items), encoding="utf-8")
        encoded = [encode_prompt_response(tokenizer, r) if kind == "prompt_response" else encode_multi_turn(tokenizer, r)
                   for r in items]
        lengths = [len(e.input_ids) for e in encoded]
        data[kind] = {"path": str(path), "records": len(items), "rows": 1 if kind == "packed" else len(items),
                      "real_tokens": sum(lengths), "record_lengths": lengths, "padded_length": max(lengths),
                      "supervised_tokens": sum(sum(1 for x in e.labels[1:] if x != -100) for e in encoded)}
    return data


def find_tokenizer(given: str | None) -> Path:
    for candidate in ([Path(given)] if given else TOKENIZER_CANDIDATES):
        if (candidate / "tokenizer.model").is_file():
            return candidate
    where = given or " or ".join(str(c) for c in TOKENIZER_CANDIDATES)
    raise SystemExit(f"error: no ChatGLM3 tokenizer.model in {where}: pass --tokenizer FOLDER (the real tokenizer "
                     f"files of THUDM/chatglm3-6b)")


def run_check(args) -> int:
    """Runs the check that `args` (gpu_check.py's options) ask for; returns the exit status."""
    mode = cases.MODES["cpu" if args.cpu else "dry" if args.dry else "gpu"]
    python = runs.python_for_children()
    found = versions()
    say("versions: " + ", ".join(f"{k} {v}" for k, v in found.items()))
    if mode.name == "gpu" and found["gpu"] == "none":
        raise SystemExit("error: no GPU visible here: run with --cpu (the 6B rehearsal) or --dry (tiny shapes)")
    tokenizer_dir = find_tokenizer(args.tokenizer)
    work = Path(args.work or f"/tmp/gpu_check-{mode.name}").resolve()
    budget = args.budget if args.budget is not None else (450 if mode.name == "gpu" else None)
    started = time.monotonic()
    selected = [cases.case_named(name) for name in dict.fromkeys(args.cases)] if args.cases else list(cases.CASES)

    missing = {module: importable(module, python) for case in selected for module in case.needs}
    peak_flops = matmul_peak(mode, python)  # first: nothing else runs on the device yet
    plans = plan_supported(python)
    say(f"matmul peak ({mode.peak_dtype}): {report.flops_rate(peak_flops)}; memory plan: {'--plan_json' if plans else 'n/a'}")
    if warning := report.slow_cpu_warning(mode.name, peak_flops):
        say(warning)
    shapes = dict.fromkeys(cases.shape_of(case, mode) for case in selected if not any(missing[m] for m in case.needs))
    # One model at a time, in the order the cases need them: the first cases train while the next is made.
    preparing = ThreadPoolExecutor(max_workers=1)
    model_dirs = {shape: preparing.submit(prepare_model, shape, work, tokenizer_dir, python, mode, args.fresh)
                  for shape in shapes}
    data = prepare_data(mode, work, tokenizer_dir)
    jobs = 1 if mode.serialize_big else args.jobs or 2
    summary = {"mode": mode.name, "complete": False, "versions": found, "matmul_peak_flops": peak_flops,
               "matmul_peak_dtype": mode.peak_dtype, "plans": plans, "seconds": None, "work": str(work), "cases": []}

    def write_json() -> None:
        summary["seconds"] = round(time.monotonic() - started, 1)
        if args.json:
            Path(args.json).write_text(json.dumps(summary, indent=1))

    def complete(finish_row) -> None:
        """A case's row done: printed, and the JSON rewritten (a check stopped midway keeps its rows)."""
        summary["cases"].append(finish_row())
        print(report.table_line(summary["cases"][-1], mode.name), flush=True)
        write_json()

    print(report.table_header(mode.name), flush=True)
    with ThreadPoolExecutor(max_workers=jobs) as background:
        check = Check(mode, work, python, model_dirs, data, peak_flops, plans, background)
        pending = None  # the previous case, whose inference and server runs went on beside this training
        for case in selected:
            reason = next((f"not run: {missing[m]}" for m in case.needs if missing[m]), None)
            if budget is not None and time.monotonic() - started > budget:
                reason = f"over the time budget of {budget:.0f} s"
            finish_row = check.run_case(case, reason)
            if pending:
                complete(pending)
            pending = finish_row
            if jobs == 1:
                complete(pending)
                pending = None
        if pending:
            complete(pending)
    preparing.shutdown()
    summary["complete"] = True
    write_json()
    print(report.table(summary["cases"], mode.name))
    print(f"total {summary['seconds']:.0f} s; logs in {work / 'logs'}")
    return 1 if any(row["status"] == "failed" for row in summary["cases"]) else 0


