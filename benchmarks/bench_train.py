#!/usr/bin/env python3
"""Training throughput of finetune.py's batching modes, side by side: the same model, data, seed
and number of steps, each mode in its own process, one table.

    python benchmarks/bench_train.py                                  # small model, ToolAlpaca, CPU
    python benchmarks/bench_train.py --data advertisegen --json out.json
    python benchmarks/bench_train.py --model tiny --steps 2 --modes reference dynamic packing
    python benchmarks/bench_train.py --method ptuning --dtype bf16    # P-Tuning v2, bf16 autocast

Modes (each is a finetune.py command line; the table's rows):
  reference            every row padded to the length cap, logits over the whole vocabulary at
                       every position (--pad_to_max_length --no_loss_on_targets_only), as the
                       original example trained
  dynamic_full_logits  rows padded to the batch's longest, full logits (--no_loss_on_targets_only)
  dynamic              rows padded to the batch's longest, output layer at targets only (the default)
  grouped              dynamic, with batches of similar lengths (--train_sampling_strategy
                       group_by_length: transformers 5 replaced --group_by_length)
  packing              several records per row (--packing): one padding-free row per batch,
                       attention per record (packed_sdpa; flash_attention_2 when asked for),
                       rows of min(cap, 2048) tokens, output layer in chunks of 4096 targets
  packing_workers      packing with collation in a dataloader worker (--dataloader_num_workers 1)
  packing_compiled     packing with torch.compile of the model (--torch_compile; not in the default
                       set: compiling takes minutes on 2 CPU cores, and the warm-up step absorbs it)

Each child runs finetune.py's own pipeline (parse_args, check_options, load_split, pack_dataset,
load_for_training, use_supervised_loss, build_collator, ChatGLMTrainer) without saving, plus a
TrainerCallback that times whole optimizer steps (batch collation included) and a wrapper around
the collator that records what each batch held. The first --warmup-steps steps are not timed.

Data: the ToolAlpaca train sample through scripts/format_tool_alpaca.py (multi-turn,
max_seq_length 2048) or AdvertiseGen dev through scripts/format_advertise_gen.py (input-output,
1024 + 128), tokenized by the real ChatGLM3 tokenizer (../shared/data/chatglm3-tokenizer).
Models, random weights, built in code with ChatGLM3's block design and its 65,024-row vocabulary
(required: the real tokenizer's ids reach 64,797):
  tiny   hidden 64, 2 layers, 4 heads (2 KV), ffn 128: 8.4M parameters, 0.07M in the body
  small  hidden 512, 6 layers, 8 heads (2 KV), ffn 1712: 86.3M parameters, 19.7M in the body
A folder path instead loads that model (e.g. a converted ChatGLM3-6B on a GPU).

Counted per timed step: real tokens (non-padding), supervised tokens (labels[1:] != -100, what
the loss trains on), padding fraction = padding / (rows x padded length), and where the time went
(data, forward_backward with clipping, optimizer, zero_grad: TrainerCallback hooks).
Model FLOPs of a batch (the useful work):
  linear layers   k x N_body x real tokens        N_body: parameters outside the embedding and
                                                  output layer; k = 6 (forward 2, input grads 2,
                                                  weight grads 2) for full fine-tuning, 4 for
                                                  P-Tuning (frozen weights: no weight grads)
  attention       6 x layers x d_attn x sum(L^2)  per record of L tokens (a packed row counts each
                                                  record alone), d_attn = heads x head_dim:
                                                  QK^T and AV, 4 L^2 d forward, x3 with the backward,
                                                  halved for causality; P-Tuning adds
                                                  12 x layers x d_attn x pre_seq_len x L
  output layer    k x hidden x vocab x positions  positions = supervised tokens with the loss on
                                                  targets only, all real tokens with full logits
                                                  (the reference really computes them)
MFU = model FLOPs per second / the matmul peak: a square matmul (2048 on the CPU, 8192 on a GPU)
in the training dtype and thread count, timed in the child before and after training (the faster
counts: on a shared machine either may be slowed). "MFU cpu" divides FLOPs per CPU-second of the
training by FLOPs per CPU-second of the matmul: what MFU would be without other processes.
HFU (hardware FLOPs utilisation) counts the same formula over every position of every padded row
(padding included, attention per row as one causal sequence): the work done, useful or not.
Peak memory: the child's peak RSS on the CPU, torch.cuda.max_memory_allocated on a GPU.

Defaults: full fine-tuning (every weight trained, so the output layer's work and its saving count
in full; --method ptuning measures P-Tuning v2 with pre_seq_len 128), no gradient checkpointing
(the reference launchers use it; its recomputation is not model FLOPs, --gradient-checkpointing
adds it to every mode alike), batch 4 (the reference's DEV_BATCH_SIZE), 4 timed steps after 1
warm-up: a few minutes per data set on 2 idle CPU cores (the reference mode at 2048 takes half).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# The FLOPs formula (see above) lives in the package, where the memory plan uses it too.
from chatglm3_finetune.plan.flops import batch_flops, model_shape  # noqa: E402,F401

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
TOKENIZER_DIR = SHARED / "chatglm3-tokenizer"

logger = logging.getLogger("bench_train")

MODES = {
    "reference": ["--pad_to_max_length", "--no_loss_on_targets_only"],
    "dynamic_full_logits": ["--no_loss_on_targets_only"],
    "dynamic": [],
    "grouped": ["--train_sampling_strategy", "group_by_length"],  # transformers 5: was --group_by_length
    "packing": ["--packing"],
    "packing_workers": ["--packing", "--dataloader_num_workers", "1"],
    "packing_compiled": ["--packing", "--torch_compile"],
}
DEFAULT_MODES = ["reference", "dynamic_full_logits", "dynamic", "grouped", "packing", "packing_workers"]
DATASETS = {  # name: (source file under ../shared/data, train format, length flags)
    "toolalpaca": ("toolalpaca/train_sample.json", "multi-turn", ["--max_seq_length", "2048"]),
    "advertisegen": ("advertisegen/dev.json", "input-output", ["--max_source_length", "1024", "--max_target_length", "128"]),
}
CHATGLM3_VOCAB = 65024
MODELS = {
    "tiny": {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "intermediate_size": 128},
    "small": {"hidden_size": 512, "num_layers": 6, "num_heads": 8, "num_kv_heads": 2, "intermediate_size": 1712},
}
METHODS = {"full": [], "ptuning": ["--pre_seq_len", "128"]}  # PRE_SEQ_LEN of the reference launchers
LEARNING_RATES = {"full": "1e-4", "ptuning": "2e-2"}  # the reference launchers'
SEED = 42


# ---- the parent: data, model, one child per mode, the table --------------------------------------

def write_formatted_data(name: str, out_dir: Path) -> Path:
    """The data set through the project's converter, as finetune.py reads it (JSON lines)."""
    from chatglm3_finetune.data.converters.advertise_gen import convert_advertise_gen
    from chatglm3_finetune.data.converters.tool_alpaca import convert_tool_alpaca

    source = SHARED / DATASETS[name][0]
    if not source.is_file():
        sys.exit(f"{source} is absent: this benchmark needs the shared data folder beside the project")
    if name == "toolalpaca":
        rows, _ = convert_tool_alpaca(json.loads(source.read_text(encoding="utf-8")), source.name)
    else:
        rows = convert_advertise_gen(source.read_text(encoding="utf-8").splitlines(), source.name)
    path = out_dir / f"{name}.jsonl"
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def build_model(name: str, out_dir: Path) -> Path:
    """A random-weight GlmForCausalLM of the named size with the ChatGLM3 vocabulary, saved for loading."""
    import torch
    from transformers import GlmForCausalLM

    from chatglm3_finetune.model.tiny_model import tiny_glm_config

    config = tiny_glm_config(CHATGLM3_VOCAB, max_positions=4096, **MODELS[name])
    torch.manual_seed(SEED)
    path = out_dir / f"model-{name}"
    GlmForCausalLM(config).save_pretrained(path)
    return path


def finetune_argv(args, mode: str, model_dir: Path, data_path: Path, work_dir: Path) -> list[str]:
    """The finetune.py flags of one mode."""
    _, train_format, length_flags = DATASETS[args.data]
    argv = [
        "--model_name_or_path", str(model_dir), "--tokenizer_name", str(TOKENIZER_DIR),
        "--train_format", train_format, "--train_file", str(data_path), *length_flags,
        "--output_dir", str(work_dir / f"out-{mode}"), "--do_train",
        "--max_steps", str(args.warmup_steps + args.steps), "--per_device_train_batch_size", str(args.batch_size),
        "--learning_rate", LEARNING_RATES[args.method], "--seed", str(SEED), "--data_seed", str(SEED),
        "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "true",
        "--preprocessing_cache_dir", str(work_dir / "tokenized"), *METHODS[args.method], *MODES[mode],
    ]
    if args.device == "cpu":
        argv.append("--use_cpu")
    if args.dtype == "bf16":
        argv.append("--bf16")
    if args.gradient_checkpointing:
        argv.append("--gradient_checkpointing")
    if args.max_train_samples:
        argv += ["--max_train_samples", str(args.max_train_samples)]
    if args.loss_chunk_size:
        argv += ["--loss_chunk_size", str(args.loss_chunk_size)]
    if args.pack_length and "--packing" in MODES[mode]:
        argv += ["--packing_row_length", str(args.pack_length)]
    return argv


def run_child(spec: dict, work_dir: Path) -> dict:
    """Runs one mode in a fresh process; returns its result (raises with the log's tail on failure)."""
    spec_path = work_dir / f"spec-{spec['mode']}.json"
    spec_path.write_text(json.dumps(spec, indent=1))
    log_path = work_dir / f"{spec['mode']}.log"
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    if spec["threads"]:
        env["OMP_NUM_THREADS"] = str(spec["threads"])
    with open(log_path, "w") as log:
        code = subprocess.run([sys.executable, __file__, "--child", str(spec_path)], stdout=log,
                              stderr=subprocess.STDOUT, env=env, cwd=str(ROOT)).returncode
    if code != 0:
        tail = log_path.read_text(errors="replace")[-4000:]
        raise RuntimeError(f"mode {spec['mode']} failed (exit {code}); the end of {log_path}:\n{tail}")
    return json.loads(Path(spec["result"]).read_text())


def percent(value) -> str:
    return "-" if value is None else f"{value:.1%}"


def optimizer_share(result: dict) -> float:
    return result["phase_seconds"]["optimizer"] / (result["step_time_s"] * len(result["step_times_s"]))


def supervised_per_cpu_second(result: dict) -> float | None:
    """Supervised tokens per CPU-second the process received: the speed to compare on a loaded machine."""
    if result.get("cpu_use") is None:
        return None
    return result["supervised_tokens"] / (result["cpu_use"] * result["step_time_s"] * len(result["step_times_s"])
                                          * result["threads"])


def format_table(results: list[dict]) -> str:
    reference = next((r for r in results if r["mode"] == "reference"), None)
    header = (f"{'mode':<20} {'real tok/s':>10} {'sup tok/s':>9} {'sup/cpu-s':>9} {'sup x ref':>9} {'padding':>8} {'step s':>7} "
              f"{'peak MB':>8} {'MFU':>6} {'MFU cpu':>7} {'HFU':>6} {'optim':>6} {'peak GF/s':>9} {'CPU use':>7} {'load':>5}")
    lines = [header, "-" * len(header)]
    for r in results:
        ratio = f"{r['supervised_tokens_per_s'] / reference['supervised_tokens_per_s']:.2f}" if reference else "-"
        lines.append(
            f"{r['mode']:<20} {r['real_tokens_per_s']:>10.0f} {r['supervised_tokens_per_s']:>9.1f} "
            f"{supervised_per_cpu_second(r) or 0:>9.1f} {ratio:>9} "
            f"{r['padding_fraction']:>8.1%} {r['step_time_s']:>7.2f} {r['peak_mem_mb']:>8.0f} {percent(r['mfu']):>6} "
            f"{percent(r['mfu_cpu_time']):>7} {percent(r['hfu']):>6} {percent(optimizer_share(r)):>6} "
            f"{r['matmul_peak_flops'] / 1e9:>9.0f} "
            f"{percent(r['cpu_use']):>7} {r['load_average']:>5.1f}")
    return "\n".join(lines)


LEGEND = (
    "sup/cpu-s: supervised tokens per CPU-second the mode received (per thread-second x threads): the speed to "
    "compare when other processes share the cores. sup x ref: supervised tokens/s over the reference mode's. MFU: useful model FLOPs per second over the "
    "matmul peak (peak GF/s, the faster of two measurements in the same process, before and after training). "
    "MFU cpu: the same per CPU-second the process received (useful FLOPs / CPU time over matmul FLOPs / CPU "
    "time): what MFU would be on an idle machine. HFU: executed FLOPs, padding included. optim: share of the "
    "step time spent in optimizer.step (AdamW over every trained parameter, whatever the batch). CPU use: process "
    "CPU time / (wall time x threads) over the timed steps. load: 1-minute load average as the mode ended.")


def describe_run(args, results: list[dict]) -> str:
    first = results[0]
    shape = first["model_shape"]
    return (f"model {args.model} ({shape['params'] / 1e6:.1f}M parameters, {shape['body_params'] / 1e6:.1f}M in "
            f"the body, hidden {shape['hidden']}, {shape['layers']} layers, vocab {shape['vocab']}), "
            f"data {args.data}, method {args.method}, {first['dtype']} on {first['device']}, "
            f"{first['threads']} threads, batch {args.batch_size}, {args.steps} timed steps after "
            f"{args.warmup_steps} warm-up")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--model", default="small", help="tiny, small, or a model folder")
    parser.add_argument("--data", choices=sorted(DATASETS), default="toolalpaca")
    parser.add_argument("--method", choices=sorted(METHODS), default="full",
                        help="full fine-tuning (default: every FLOP of the output layer counts), or P-Tuning v2")
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=DEFAULT_MODES)
    parser.add_argument("--steps", type=int, default=4, help="timed optimizer steps per mode")
    parser.add_argument("--warmup-steps", type=int, default=1, help="untimed steps before them")
    parser.add_argument("--batch-size", type=int, default=4, help="rows per step (packed rows with packing)")
    parser.add_argument("--max-train-samples", type=int, help="use only the first N records (quick runs)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when present")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default=None,
                        help="fp32 (weights) or bf16 (autocast); default fp32 on the CPU, bf16 on a GPU")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's, one per core)")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="as the reference launchers (recomputation is not counted as model FLOPs)")
    parser.add_argument("--loss-chunk-size", type=int,
                        help="finetune.py --loss_chunk_size for every mode (targets per output-layer chunk)")
    parser.add_argument("--pack-length", type=int, help="finetune.py --packing_row_length for the packing modes")
    parser.add_argument("--profile", action="store_true",
                        help="torch.profiler over the timed steps: top operators in WORK_DIR/profile-MODE.txt "
                             "(its overhead makes the timings of that run incomparable)")
    parser.add_argument("--json", help="write the results here: a list with one object per mode")
    parser.add_argument("--table", nargs="+", metavar="JSON", help="print the table of earlier --json files and exit")
    parser.add_argument("--work-dir", help="keep the data, model, logs and per-mode results here")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # a child process measures one mode
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup_steps < 0 or args.batch_size < 1:
        parser.error("--steps and --batch-size must be at least 1, --warmup-steps at least 0")
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.table:
        results = [row for path in args.table for row in json.loads(Path(path).read_text())]
        print(format_table(results))
        print(LEGEND)
        return results
    if args.child:
        return [run_mode(json.loads(Path(args.child).read_text()))]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if not TOKENIZER_DIR.is_dir():
        sys.exit(f"{TOKENIZER_DIR} is absent: this benchmark needs the real ChatGLM3 tokenizer in the shared data folder")
    with tempfile.TemporaryDirectory(prefix="bench_train-") as tmp:
        work_dir = Path(args.work_dir or tmp).resolve()
        work_dir.mkdir(parents=True, exist_ok=True)
        data_path = write_formatted_data(args.data, work_dir)
        model_dir = Path(args.model) if Path(args.model).is_dir() else None
        if model_dir is None:
            if args.model not in MODELS:
                sys.exit(f"--model {args.model}: neither {' nor '.join(MODELS)} nor a model folder")
            model_dir = build_model(args.model, work_dir)
        results = []
        for mode in args.modes:
            spec = {"mode": mode, "argv": finetune_argv(args, mode, model_dir, data_path, work_dir),
                    "warmup_steps": args.warmup_steps, "steps": args.steps, "threads": args.threads,
                    "dtype": args.dtype, "result": str(work_dir / f"result-{mode}.json"),
                    "profile": str(work_dir / f"profile-{mode}.txt") if args.profile else None}
            logger.info("%s: python finetune.py %s", mode, " ".join(spec["argv"]))
            results.append(run_child(spec, work_dir))
            logger.info("%s: %.0f real tokens/s, %.1f supervised tokens/s, step %.2f s", mode,
                        results[-1]["real_tokens_per_s"], results[-1]["supervised_tokens_per_s"],
                        results[-1]["step_time_s"])
    print(describe_run(args, results))
    print(format_table(results))
    print(LEGEND)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return results


# ---- a child: one mode through finetune.py's pipeline ---------------------------------------------

class BatchRecorder:
    """Wraps a collator; adds to every batch what it holds (under STATS_KEY, which `recording_trainer`
    takes off and keeps in step order): collation may run in a dataloader worker process."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, features):
        from chatglm3_finetune.train.supervised_loss import count_targets
        from chatglm3_finetune.data.packing import seq_lens_from_position_ids

        batch = self.collator(features)
        records = []
        for feature in features:
            if "position_ids" in feature:  # a packed row
                records += list(feature.get("seq_lens") or seq_lens_from_position_ids(feature["position_ids"]))
            else:
                records.append(len(feature["input_ids"]))
        padding_free = "cu_seq_lens_q" in batch
        batch[STATS_KEY] = ({"rows": len(features), "padded_length": int(batch["input_ids"].shape[1]),
                             "positions": int(batch["input_ids"].numel()),
                             "real_tokens": sum(records), "supervised_tokens": count_targets(batch["labels"]),
                             "record_lengths": records,
                             # what attention computes: each record alone, or each padded row whole
                             "attention_lengths": records if padding_free else [int(batch["input_ids"].shape[1])] * len(features)},)
        return batch


STATS_KEY = "bench_batch_stats"


def recording_trainer(trainer_class):
    """A subclass of trainer_class whose `batches` lists the stats of every training batch, in step order."""

    class RecordingTrainer(trainer_class):
        batches: list[dict] = []

        def training_step(self, model, inputs, *args, **kwargs):
            self.batches.append(inputs.pop(STATS_KEY)[0])
            return super().training_step(model, inputs, *args, **kwargs)

    return RecordingTrainer


PHASES = ("data", "forward_backward", "optimizer", "zero_grad")  # the parts of one optimizer step


def step_timer(cuda: bool):
    """A TrainerCallback that marks (wall, CPU) time at the start and after every optimizer step, the
    phases of each step (see `phase_seconds`), and the logged losses."""
    import torch
    from transformers import TrainerCallback

    def now() -> float:
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.marks: list[tuple[float, float]] = []  # train begin, then the end of every step
            self.step_marks: list[list[float]] = []  # per step: begin, before and after optimizer.step, end
            self.losses: list[float] = []

        def on_train_begin(self, args, state, control, **kwargs):
            self.marks.append((now(), time.process_time()))

        def on_step_begin(self, args, state, control, **kwargs):
            self.step_marks.append([now()])

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            self.step_marks[-1].append(now())

        def on_optimizer_step(self, args, state, control, **kwargs):
            self.step_marks[-1].append(now())

        def on_step_end(self, args, state, control, **kwargs):
            self.marks.append((now(), time.process_time()))
            self.step_marks[-1].append(self.marks[-1][0])

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

    return StepTimer()


def phase_seconds(marks: list[tuple[float, float]], step_marks: list[list[float]], first: int, count: int) -> dict:
    """Seconds per phase over steps first..first+count-1: data (collating the batches, and the previous
    step's logging), forward_backward (with gradient clipping), optimizer (optimizer.step), zero_grad
    (the learning-rate schedule and zeroing the gradients)."""
    totals = dict.fromkeys(PHASES, 0.0)
    for step in range(first, first + count):
        previous_end = marks[step][0]
        begin, before_optimizer, after_optimizer, end = step_marks[step]
        for phase, seconds in zip(PHASES, (begin - previous_end, before_optimizer - begin,
                                           after_optimizer - before_optimizer, end - after_optimizer)):
            totals[phase] += seconds
    return totals


def profiler_callback(warmup_steps: int, steps: int, cuda: bool, path: str):
    """A TrainerCallback running torch.profiler over the timed steps; writes the top operators to path."""
    from torch.profiler import ProfilerActivity, profile, schedule
    from transformers import TrainerCallback

    sort_by = "self_cuda_time_total" if cuda else "self_cpu_time_total"

    def write(prof):
        Path(path).write_text(prof.key_averages().table(sort_by=sort_by, row_limit=30, max_name_column_width=70))

    class Profiler(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
            self.prof = profile(activities=activities, on_trace_ready=write,
                                schedule=schedule(wait=max(warmup_steps - 1, 0), warmup=min(warmup_steps, 1), active=steps))
            self.prof.start()

        def on_step_end(self, args, state, control, **kwargs):
            self.prof.step()

        def on_train_end(self, args, state, control, **kwargs):
            self.prof.stop()

    return Profiler()


def matmul_peak(device: str, dtype, repeats: int = 3) -> tuple[float, float | None]:
    """(FLOP/s of wall time, FLOP per CPU-second) of the best of `repeats` square matmuls:
    2048 on the CPU (one FLOP per CPU-second figure is per thread-second times threads), 8192 x 10 on a GPU."""
    import torch

    size, inner = (8192, 10) if device == "cuda" else (2048, 1)
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)

    def timed() -> tuple[float, float]:
        if device == "cuda":
            torch.cuda.synchronize()
        start, cpu_start = time.perf_counter(), time.process_time()
        for _ in range(inner):
            torch.mm(a, b)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start, time.process_time() - cpu_start

    timed()  # warm-up
    runs = [timed() for _ in range(repeats)]
    flops = 2 * size ** 3 * inner
    wall = min(run[0] for run in runs)
    cpu = min(run[1] for run in runs)
    return flops / wall, (flops / cpu if device != "cuda" else None)


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2 ** 20


def run_mode(spec: dict) -> dict:
    """Trains one mode as finetune.main does (without saving) and writes its measurements to spec["result"]."""
    import torch
    from transformers import set_seed

    from arguments import check_options, parse_args
    from chatglm3_finetune.format.tokenizer import load_tokenizer
    from chatglm3_finetune.data.collation import build_collator
    from chatglm3_finetune.model.loading import load_for_training
    from chatglm3_finetune.model.packed_attention import packing_attention
    from chatglm3_finetune.train.loss_switch import use_supervised_loss
    from chatglm3_finetune.data.training_data import load_split, pack_dataset
    from finetune import setup_logging
    from trainer import ChatGLMTrainer

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    model_args, data_args, training_args = parse_args(spec["argv"])
    check_options(model_args, data_args, training_args)
    setup_logging(training_args)
    if training_args.gradient_checkpointing and not training_args.gradient_checkpointing_kwargs:
        training_args.gradient_checkpointing_kwargs = {"use_reentrant": False}
    set_seed(training_args.seed)
    tokenizer = load_tokenizer(model_args.tokenizer_name)
    train_dataset, _ = load_split(data_args.train_file, data_args.max_train_samples, tokenizer, data_args,
                                  training_args, "training")
    if data_args.packing:
        train_dataset = pack_dataset(train_dataset, data_args)
        model_args.attn_implementation = packing_attention(model_args.attn_implementation)
    collator = build_collator(tokenizer, data_args)
    model = load_for_training(model_args, training_args)
    if data_args.loss_on_targets_only:
        use_supervised_loss(model, chunk_size=data_args.loss_chunk_size)
    collator = BatchRecorder(collator)
    cuda = training_args.device.type == "cuda"
    timer = step_timer(cuda)
    callbacks = [timer]
    if spec.get("profile"):
        callbacks.append(profiler_callback(spec["warmup_steps"], spec["steps"], cuda, spec["profile"]))
    trainer = recording_trainer(ChatGLMTrainer)(model=model, args=training_args, train_dataset=train_dataset, data_collator=collator,
                             processing_class=tokenizer, callbacks=callbacks)

    dtype = torch.bfloat16 if spec["dtype"] == "bf16" else torch.float32
    device = "cuda" if cuda else "cpu"
    peak_before = matmul_peak(device, dtype)
    rss_before = current_rss_mb()
    load_before = os.getloadavg()[0]
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    peak_after = matmul_peak(device, dtype)
    # On a shared machine either measurement may be slowed by others: the faster one is the peak.
    peak = max(peak_before[0], peak_after[0])
    peak_per_cpu_s = None if cuda else max(peak_before[1], peak_after[1])

    warmup, steps = spec["warmup_steps"], spec["steps"]
    marks = timer.marks[warmup:warmup + steps + 1]
    batches = trainer.batches[warmup:warmup + steps]
    if len(marks) != steps + 1 or len(batches) != steps:
        raise RuntimeError(f"expected {warmup + steps} steps, timed {len(timer.marks) - 1} and saw "
                           f"{len(trainer.batches)} batches")
    wall = marks[-1][0] - marks[0][0]
    cpu = marks[-1][1] - marks[0][1]
    shape = model_shape(model)
    method = {"trains_weights": model_args.tuning_method == "full", "full_logits": not data_args.loss_on_targets_only,
              "prefix_len": model_args.pre_seq_len or 0}
    useful = sum(batch_flops(shape, b, **method) for b in batches)
    executed = sum(batch_flops(shape, b, **method, executed=True) for b in batches)
    real = sum(b["real_tokens"] for b in batches)
    supervised = sum(b["supervised_tokens"] for b in batches)
    positions = sum(b["positions"] for b in batches)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = {
        "mode": spec["mode"],
        "real_tokens_per_s": real / wall,
        "supervised_tokens_per_s": supervised / wall,
        "padding_fraction": 1 - real / positions,
        "step_time_s": wall / steps,
        "peak_mem_mb": torch.cuda.max_memory_allocated() / 2 ** 20 if cuda else peak_rss,
        "mfu": useful / wall / peak,
        "mfu_cpu_time": None if cuda else useful / cpu / peak_per_cpu_s,
        "hfu": executed / wall / peak,
        "model_tflops_per_s": useful / wall / 1e12,
        "matmul_peak_flops": peak, "matmul_peak_flops_before_after": [peak_before[0], peak_after[0]],
        "step_times_s": [b[0] - a[0] for a, b in zip(marks, marks[1:])],
        "phase_seconds": phase_seconds(timer.marks, timer.step_marks, warmup, steps),
        "real_tokens": real, "supervised_tokens": supervised, "padded_positions": positions,
        "rows_per_step": [b["rows"] for b in batches], "padded_lengths": [b["padded_length"] for b in batches],
        "losses": timer.losses,
        "peak_rss_mb": peak_rss, "rss_before_training_mb": rss_before,
        "cpu_use": cpu / (wall * torch.get_num_threads()) if not cuda else None,
        "load_average": os.getloadavg()[0], "load_average_before": load_before,
        "threads": torch.get_num_threads(), "device": device, "dtype": spec["dtype"],
        "method": model_args.tuning_method, "model_shape": shape, "finetune_args": spec["argv"],
    }
    Path(spec["result"]).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
