"""Peak host memory (RSS) of loading a model for training: each case in a process of its own.

    .venv/bin/python benchmarks/bench_load_memory.py               # ~0.9B GLM: 1.7 GB in bf16, one process
    .venv/bin/python benchmarks/bench_load_memory.py --ranks 2 --hidden 1024 --layers 12 --ffn 4096   # ZeRO

Single-process cases: a frozen base loaded in bf16 (what P-Tuning and LoRA load on a GPU) from a
folder stored in bf16 and from one stored in fp16 (the original ChatGLM3-6B's dtype), through
transformers alone (`from_pretrained(dtype=bfloat16)`) and through `load_base_model`, which loads
the stored dtype memory-mapped and casts one tensor at a time. Every weight is then read once, as
training reads it, so that mapped pages count as they would.

With --ranks N: full fine-tuning under DeepSpeed on N CPU ranks (torchrun, DS_ACCELERATOR=cpu,
gloo, --bf16), ZeRO-2 and ZeRO-3, loaded as finetune.py loads it (the training options, and with
them the DeepSpeed config, exist before `load_for_training` runs) with --torch_dtype float32 (what
full fine-tuning loaded before) and auto (DeepSpeed's bf16). Under ZeRO-3 each rank's share is
reported too.

Per case and rank: peak RSS and peak anonymous (not file-backed) memory above the process's own
baseline, in MiB; the baseline is taken after the same loader loaded a tiny model, so that what
transformers imports while loading is not counted. The models are built once under --work (default /tmp) and reused.
Needs RAM for about 3x the bf16 model (the transformers-alone fp16 case): run it alone.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_DATA = ROOT / "data" / "sample" / "advertise_gen_train.json"
MIB = 2 ** 20


# ---- measuring, in the child processes --------------------------------------------------------------

def memory_status() -> dict:
    """Current VmRSS, RssAnon and RssFile, and the peak VmHWM, of this process, in MiB."""
    values = {}
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(":")[0]
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                values[key] = int(line.split()[1]) / 1024
    return values


class PeakSampler:
    """From now on: the peak RSS (the kernel's VmHWM, reset here) and the highest RssAnon, which the
    kernel does not keep, sampled every 10 ms in a thread."""

    def __init__(self):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux 4.0+)
        self.peak_anon = 0.0
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        while True:
            self.peak_anon = max(self.peak_anon, memory_status()["RssAnon"])
            time.sleep(0.01)


def read_every_weight(model) -> None:
    import torch

    with torch.no_grad():
        for parameter in model.parameters():
            parameter.sum()


def child_single(spec: dict) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from chatglm3_finetune.model.loading import load_base_model

    def load(folder):
        if spec["loader"] == "transformers":
            return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
        return load_base_model(folder, torch.bfloat16)

    read_every_weight(load(spec["warm_up"]))  # the modules transformers imports while loading, imported now
    gc.collect()
    sampler, baseline = PeakSampler(), memory_status()
    started = time.monotonic()
    model = load(spec["model"])
    read_every_weight(model)
    seconds = time.monotonic() - started
    return result_row(spec, baseline, sampler, seconds, model)


def child_rank(spec: dict) -> dict:
    import deepspeed
    import torch.distributed as dist

    from arguments import parse_args
    from chatglm3_finetune.compat import skip_deepspeed_cpu_shared_memory_op
    from chatglm3_finetune.model.loading import load_for_training

    skip_deepspeed_cpu_shared_memory_op()  # as finetune.py does: nothing to compile
    model_args, _, training_args = parse_args([
        "--model_name_or_path", spec["model"], "--train_format", "input-output", "--do_train",
        "--train_file", str(SAMPLE_DATA), "--output_dir", spec["output_dir"], "--use_cpu", "--bf16",
        "--deepspeed", str(ROOT / "configs" / spec["config"]), "--torch_dtype", spec["torch_dtype"],
        "--report_to", "none"])
    training_args.device  # noqa: B018 - starts torch.distributed (gloo), as finetune.py's first use of the options does
    deepspeed.init_distributed(dist_backend=dist.get_backend())
    model_args.model_name_or_path = spec["warm_up"]
    read_every_weight(load_for_training(model_args, training_args))
    model_args.model_name_or_path = spec["model"]
    gc.collect()
    dist.barrier()
    sampler, baseline = PeakSampler(), memory_status()
    started = time.monotonic()
    model = load_for_training(model_args, training_args)
    read_every_weight(model)  # under ZeRO-3 only the rank's own share: the others are empty placeholders
    seconds = time.monotonic() - started
    row = result_row(spec, baseline, sampler, seconds, model)
    row["rank"] = dist.get_rank()
    dist.barrier()
    dist.destroy_process_group()
    return row


def result_row(spec: dict, baseline: dict, sampler: PeakSampler, seconds: float, model) -> dict:
    held = [getattr(p, "ds_tensor", p) for p in model.parameters()]
    return {**spec, "baseline_mib": round(baseline["VmRSS"]),
            "peak_rss_mib": round(memory_status()["VmHWM"] - baseline["VmRSS"]),
            "peak_anon_mib": round(sampler.peak_anon - baseline["RssAnon"]),
            "held_mib": round(sum(t.numel() * t.element_size() for t in held) / MIB),
            "held_dtypes": sorted({str(t.dtype).replace("torch.", "") for t in held}), "seconds": round(seconds, 1)}


# ---- building the models and running the cases -----------------------------------------------------

def build_model(folder: Path, args, dtype_name: str) -> Path:
    """A random-weight GLM of ChatGLM3's block design, stored in dtype_name (reused when built before)."""
    if (folder / "config.json").is_file():
        return folder
    import torch
    from transformers import GlmForCausalLM

    from chatglm3_finetune.format.tokenizer import load_tokenizer
    from chatglm3_finetune.model.tiny_model import tiny_glm_config, train_tiny_sentencepiece

    folder.mkdir(parents=True, exist_ok=True)
    train_tiny_sentencepiece(str(folder))
    tokenizer = load_tokenizer(str(folder))
    tokenizer.save_pretrained(str(folder))
    config = tiny_glm_config(args.vocab, hidden_size=args.hidden, num_layers=args.layers, num_heads=args.hidden // 128,
                             num_kv_heads=2, intermediate_size=args.ffn, eos_token_id=tokenizer.stop_token_ids)
    config.head_dim = 128
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype_name))  # built in the stored dtype: no fp32 copy first
    try:
        GlmForCausalLM(config).save_pretrained(str(folder))
    finally:
        torch.set_default_dtype(default)
    print(f"built {folder}", file=sys.stderr, flush=True)
    return folder


def run_child(command: list[str], spec: dict, env: dict, work: Path) -> list[dict]:
    """Runs one case (one process, or torchrun's ranks); each process writes its row to a file of its own."""
    results = work / "bench_load_memory_results"
    shutil.rmtree(results, ignore_errors=True)
    results.mkdir(parents=True)
    spec = {**spec, "results": str(results)}
    result = subprocess.run(command + [json.dumps(spec)], capture_output=True, text=True, env=env, cwd=str(ROOT))
    rows = [json.loads(path.read_text()) for path in sorted(results.glob("*.json"))]
    if result.returncode != 0 or not rows:
        raise SystemExit(f"error: case {spec} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return [{key: value for key, value in row.items() if key not in ("results", "model", "output_dir", "warm_up")}
            for row in rows]


def run_cases(args, models: dict, warm_up: dict) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "DS_ACCELERATOR": "cpu"}
    rows = []
    for stored in ("bfloat16", "float16"):
        for loader in ("transformers", "load_base_model"):
            spec = {"case": "frozen base in bf16", "stored": stored, "loader": loader, "model": str(models[stored]),
                    "warm_up": str(warm_up[stored])}
            rows += run_child([sys.executable, __file__, "--child"], spec, env, Path(args.work))
    if args.ranks > 1:
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.ranks}",
                    __file__, "--child-rank"]
        for config in ("ds_zero2.json", "ds_zero3.json"):
            for torch_dtype in args.ds_dtypes.split(","):
                spec = {"case": f"full, {config}", "stored": "bfloat16", "torch_dtype": torch_dtype,
                        "config": config, "model": str(models["bfloat16"]), "warm_up": str(warm_up["bfloat16"]),
                        "output_dir": str(Path(args.work) / "bench_load_memory_output")}
                rows += sorted(run_child(torchrun, spec, env, Path(args.work)), key=lambda row: row["rank"])
    return rows


def format_table(rows: list[dict]) -> str:
    lines = [f"{'case':<26} {'stored':<9} {'loaded by':<24} {'rank':>4} {'peak RSS':>9} {'peak anon':>9} "
             f"{'held':>7} {'s':>6}"]
    for row in rows:
        loader = row.get("loader") or f"--torch_dtype {row['torch_dtype']}"
        lines.append(f"{row['case']:<26} {row['stored']:<9} {loader:<24} {row.get('rank', '-'):>4} "
                     f"{row['peak_rss_mib']:>9} {row['peak_anon_mib']:>9} {row['held_mib']:>7} {row['seconds']:>6}")
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=2048, help="hidden size (a multiple of 128)")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--ffn", type=int, default=6848, help="MLP width (ChatGLM3-6B: 13696 for hidden 4096)")
    parser.add_argument("--vocab", type=int, default=65024, help="vocabulary (ChatGLM3's padded 65024)")
    parser.add_argument("--ranks", type=int, default=1, help="also the ZeRO-2/3 cases on this many CPU ranks (>1)")
    parser.add_argument("--ds-dtypes", default="float32,auto",
                        help="--torch_dtype values of the ZeRO-2/3 cases (default float32,auto: before and after)")
    parser.add_argument("--work", default="/tmp", help="where the models are built and kept")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-rank", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.child or args.child_rank:
        spec = json.loads(args.child or args.child_rank)
        row = child_single(spec) if args.child else child_rank(spec)
        Path(spec["results"], f"rank{row.get('rank', 0)}.json").write_text(json.dumps(row))
        return [row]
    if args.hidden % 128:
        raise SystemExit(f"error: --hidden must be a multiple of 128 (the head size), got {args.hidden}")
    shape = f"glm-h{args.hidden}-l{args.layers}-f{args.ffn}-v{args.vocab}"
    models = {dtype: build_model(Path(args.work) / f"bench_load_memory-{shape}-{dtype}", args, dtype)
              for dtype in ("bfloat16", "float16")}
    tiny = argparse.Namespace(hidden=128, layers=1, ffn=256, vocab=1024)
    warm_up = {dtype: build_model(Path(args.work) / f"bench_load_memory-warm-up-{dtype}", tiny, dtype)
               for dtype in ("bfloat16", "float16")}
    rows = run_cases(args, models, warm_up)
    whole = next(row["held_mib"] for row in rows if row.get("loader") == "transformers")
    print(f"model {shape}: {whole} MiB in bf16, {2 * whole} MiB in fp32 (peaks: MiB above each process's "
          f"baseline after a warm-up load; 'held': what the process holds of the weights)")
    print(format_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
