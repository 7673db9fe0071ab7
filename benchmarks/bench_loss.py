"""Forward+backward time and peak memory: full-vocabulary logits loss vs supervised_lm_loss.

A GLM with ChatGLM3's 65,024-wide output layer and a small body (the output layer dominates),
one sequence of 2048 tokens of which ~20% are targets (chat-like: long prompts, short answers).
Each variant runs in its own child process on CPU so that its peak RSS is its own; on CUDA the
allocator's peak is reset between variants instead.

    python benchmarks/bench_loss.py                      # CPU, fp32, hidden 256, 2 layers
    python benchmarks/bench_loss.py --device cuda --dtype bf16 --batch 8
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

from chatglm3_finetune.data.encoding import IGNORE_INDEX  # noqa: E402
from chatglm3_finetune.train.supervised_loss import count_targets, supervised_lm_loss  # noqa: E402
from chatglm3_finetune.model.tiny_model import tiny_glm_config  # noqa: E402

VARIANTS = {  # chunk_size None stands for --chunk-size
    "full logits (HF labels=)": {},
    "supervised_lm_loss defaults": {},
    "small chunks + checkpoint": {"chunk_size": None, "checkpoint_chunks": True},
    "small chunks, no checkpoint": {"chunk_size": None, "checkpoint_chunks": False},
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def build(args):
    from transformers import GlmForCausalLM

    torch.manual_seed(0)
    config = tiny_glm_config(args.vocab, hidden_size=args.hidden, num_layers=args.layers,
                             num_heads=args.hidden // 64, num_kv_heads=2, intermediate_size=args.hidden * 4,
                             max_positions=args.seq)
    model = GlmForCausalLM(config).to(device=args.device, dtype=DTYPES[args.dtype]).train()
    input_ids = torch.randint(3, args.vocab, (args.batch, args.seq), device=args.device)
    # Chat-like rows: each 256-token turn is 80% prompt (not a target), 20% answer.
    labels = input_ids.clone()
    turn = torch.arange(args.seq, device=args.device) % 256
    labels[:, turn < round(256 * (1 - args.supervised))] = IGNORE_INDEX
    return model, input_ids, labels


def step(model, input_ids, labels, options):
    if options is not None:
        loss, _ = supervised_lm_loss(model, labels, input_ids=input_ids, **options)
    else:
        loss = model(input_ids=input_ids, labels=labels, use_cache=False).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    return loss.item()


def current_rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def measure(args, name) -> dict:
    model, input_ids, labels = build(args)
    options = None if name.startswith("full") else {
        key: args.chunk_size if value is None else value for key, value in VARIANTS[name].items()}
    cuda = args.device.startswith("cuda")
    baseline = torch.cuda.memory_allocated() / 2**20 if cuda else current_rss_mib()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    loss = step(model, input_ids, labels, options)  # warm-up
    times, cpu_times = [], []
    for _ in range(args.repeats):
        if cuda:
            torch.cuda.synchronize()
        start, cpu_start = time.perf_counter(), time.process_time()
        step(model, input_ids, labels, options)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"name": name, "loss": loss, "seconds": min(times), "cpu_seconds": min(cpu_times), "peak_mib": peak, "extra_mib": peak - baseline,
            "targets": count_targets(labels)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=65024)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--supervised", type=float, default=0.2, help="fraction of target positions")
    parser.add_argument("--chunk-size", type=int, default=128, help="targets per output-layer call, small chunks")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # a child process measures this one
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    if args.variant:
        print(json.dumps(measure(args, args.variant)))
        return
    if args.device.startswith("cuda"):
        rows = [measure(args, name) for name in VARIANTS]
    else:
        rows = [json.loads(subprocess.run([sys.executable, __file__, *sys.argv[1:], "--variant", name],
                                          check=True, capture_output=True, text=True).stdout.splitlines()[-1])
                for name in VARIANTS]

    memory = "GPU allocated" if args.device.startswith("cuda") else "RSS"
    print(f"GLM vocab {args.vocab}, hidden {args.hidden}, {args.layers} layers, batch {args.batch} x seq {args.seq}, "
          f"{rows[0]['targets']} targets ({args.supervised:.0%}), {args.dtype} on {args.device}, "
          f"small chunks of {args.chunk_size}, best of {args.repeats} forward+backward")
    print(f"{'variant':<30} {'loss':>9} {'wall s':>8} {'CPU s':>8} {'peak ' + memory + ' MiB':>20} "
          f"{'above weights MiB':>18} {'time x':>7} {'mem x':>6}")
    full = rows[0]
    for row in rows:
        print(f"{row['name']:<30} {row['loss']:>9.5f} {row['seconds']:>8.3f} {row['cpu_seconds']:>8.3f} "
              f"{row['peak_mib']:>20.0f} {row['extra_mib']:>18.0f} {full['seconds'] / row['seconds']:>7.2f} "
              f"{full['extra_mib'] / max(row['extra_mib'], 1):>6.2f}")
    print("time x / mem x: how many times faster (wall) / smaller (memory above the weights) than the full loss")


if __name__ == "__main__":
    main()
