#!/usr/bin/env python3
"""Memory, speed and MFU of the toolkit's training paths on ChatGLM3-6B shapes, random weights, one GPU.

    bash benchmarks/gpu_check.sh            # the GPU check (see its header for the wheels to bring)
    python benchmarks/gpu_check.py --dry    # tiny shapes on the CPU: the same code paths in seconds

Cases (each in its own process, so that every peak memory is its own):
  ptuning   P-Tuning v2 (pre_seq_len 128, PrefixTuningModel) on a GLM shaped like ChatGLM3-6B (hidden
            4096, 28 layers, 32 heads, 2 KV groups, ffn 13696, vocab 65024), frozen bf16 base, one
            record of 2048 tokens (half of them targets), non-reentrant gradient checkpointing, the
            targets-only loss, fused AdamW on the prefix
  lora      LoRA (rank 8 on q/k/v/o, peft) on the same model and batch
  packing   P-Tuning as above on one padding-free row of 2048 tokens packed from records of 64-1024
            tokens: attention per record (packed_sdpa), the prefix visible to each
  packing_fa2  the same row through flash-attention's variable-length kernel (LoRA: it takes no
            shared prefix); only when flash_attn imports
  zero3     full fine-tuning of a ~1B GLM (hidden 2048, 16 layers, 16 heads, 2 KV groups, ffn 5632)
            under DeepSpeed ZeRO-3 (configs/ds_zero3.json, "auto" filled in), bf16, 2048 tokens,
            gradient checkpointing
Timed: whole optimizer steps after warm-up ones, with CUDA synchronised. Peak memory:
torch.cuda.max_memory_allocated. MFU: model FLOPs (bench_train.batch_flops: no recomputation counted)
per second over a bf16 8192^3 matmul measured in the same process. Goal: ptuning <= 14 GB.
--dry: tiny shapes, fp32 on the CPU (ZeRO-3 with DS_ACCELERATOR=cpu), 1+1 steps: a test of the code.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from chatglm3_finetune.compat import installed_version

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 65024
SHAPES = {
    "6b": dict(hidden_size=4096, num_layers=28, num_heads=32, num_kv_heads=2, intermediate_size=13696),
    "1b": dict(hidden_size=2048, num_layers=16, num_heads=16, num_kv_heads=2, intermediate_size=5632),
    "tiny": dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128),
}
CASES = {  # name: (model shape, method, packed, attention)
    "ptuning": ("6b", "ptuning", False, "sdpa"),
    "lora": ("6b", "lora", False, "sdpa"),
    "packing": ("6b", "ptuning", True, "packed_sdpa"),
    "packing_fa2": ("6b", "lora", True, "flash_attention_2"),
    "zero3": ("1b", "full", False, "sdpa"),
}
PRE_SEQ_LEN = 128
SEQ_LEN = 2048


def bench_train():
    """benchmarks/bench_train.py as a module (its FLOPs formula and matmul peak), without touching sys.path."""
    spec = importlib.util.spec_from_file_location("bench_train", ROOT / "benchmarks" / "bench_train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def synthetic_records(seq_len: int, packed: bool, seed: int = 0) -> list[dict]:
    """One record of seq_len tokens, or records of 1/32 to 1/2 of it filling seq_len; the second half of
    each record is targets."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    shortest = seq_len // 32
    lengths, left = [], seq_len
    while left > 0:
        n = left if not packed else int(torch.randint(shortest, seq_len // 2 + 1, (1,), generator=generator))
        n = left if left - n < shortest else n  # no record shorter than the shortest drawn
        lengths.append(n)
        left -= n
    records = []
    for n in lengths:
        ids = torch.randint(5, 64000, (n,), generator=generator).tolist()
        records.append({"input_ids": ids, "labels": [-100] * (n - n // 2) + ids[n - n // 2:]})
    return records


def build_model(shape: str, attention: str, dtype, device: str, sharded: bool = False):
    import torch
    from transformers import GlmForCausalLM

    from chatglm3_finetune.model.packed_attention import use_packed_sdpa
    from chatglm3_finetune.model.tiny_model import tiny_glm_config

    config = tiny_glm_config(VOCAB, max_positions=4096, **SHAPES[shape])
    config._attn_implementation = use_packed_sdpa() if attention == "packed_sdpa" else attention
    if sharded:  # weight init would index the padding row of an empty ZeRO-3 shard
        config.pad_token_id = None
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = GlmForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    return model


def zero3_config(hidden: int) -> dict:
    config = json.loads((ROOT / "configs" / "ds_zero3.json").read_text())
    config.update(train_batch_size=1, train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=1,
                  gradient_clipping=1.0, bf16={"enabled": True}, zero_allow_untested_optimizer=True)
    config["fp16"]["enabled"] = False
    config["optimizer"]["params"].update(lr=1e-5, betas=[0.9, 0.999], eps=1e-8, weight_decay=0.0)
    zero = config["zero_optimization"]
    zero.update(reduce_bucket_size=hidden * hidden, stage3_prefetch_bucket_size=int(0.9 * hidden * hidden),
                stage3_param_persistence_threshold=10 * hidden)
    return config


def prepare(case: str, dry: bool):
    """(step function, the model, its method) for one case."""
    import torch

    from chatglm3_finetune.train.loss_switch import use_supervised_loss

    shape, method, _, attention = CASES[case]
    shape = "tiny" if dry else shape
    device = "cpu" if dry else "cuda"
    dtype = torch.float32 if dry else torch.bfloat16
    checkpointing = {"use_reentrant": False}
    if method == "full":
        import deepspeed
        import transformers.models.glm.modeling_glm  # noqa: F401  (imported inside zero.Init, torch._dynamo breaks)

        from chatglm3_finetune.model import packed_attention

        from chatglm3_finetune.model import tiny_model  # noqa: F401

        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29533"), RANK="0",
                          WORLD_SIZE="1", LOCAL_RANK="0")
        deepspeed.init_distributed(dist_backend="gloo" if dry else "nccl")
        config = zero3_config(SHAPES[shape]["hidden_size"])
        if dry:
            config["bf16"]["enabled"] = False
        with deepspeed.zero.Init(config_dict_or_path=config):
            model = build_model(shape, attention, dtype, "cpu" if dry else "cuda", sharded=True)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
        use_supervised_loss(model)
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
        engine.train()

        def step(batch):
            loss = engine(**batch).loss
            engine.backward(loss)
            engine.step()
            return loss

        return step, model, method
    base = build_model(shape, attention, dtype, device)
    if method == "ptuning":
        from chatglm3_finetune.model.ptuning.prefix_model import PrefixTuningModel

        model = PrefixTuningModel(base, 4 if dry else PRE_SEQ_LEN)
        lr = 2e-2
    else:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(base, LoraConfig(r=8, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM",
                                                target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
        lr = 1e-4
    model.activation_checkpointing_enable(activation_checkpointing_kwargs=checkpointing) if method == "ptuning" else \
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
    model.enable_input_require_grads()
    use_supervised_loss(model)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr, fused=device == "cuda")

    def step(batch):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step, model, method


def run_case(case: str, dry: bool, warmup: int, steps: int) -> dict:
    import torch

    from chatglm3_finetune.data.collation import PackedCollator
    from chatglm3_finetune.data.packing import pack_features

    bench = bench_train()
    _, method, packed, _ = CASES[case]
    seq_len = 64 if dry else SEQ_LEN
    cuda = not dry
    step, model, method = prepare(case, dry)
    records = synthetic_records(seq_len, packed)
    if packed:
        batch = PackedCollator()(pack_features(records, seq_len))
    else:
        batch = {"input_ids": torch.tensor([records[0]["input_ids"]]), "labels": torch.tensor([records[0]["labels"]]),
                 "attention_mask": torch.ones(1, seq_len, dtype=torch.long)}
    device = "cuda" if cuda else "cpu"
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    lengths = [len(r["input_ids"]) for r in records]
    stats = {"rows": 1, "padded_length": seq_len, "real_tokens": seq_len, "record_lengths": lengths,
             "supervised_tokens": sum(sum(1 for x in r["labels"][1:] if x != -100) for r in records)}

    def sync():
        if cuda:
            torch.cuda.synchronize()

    for _ in range(warmup):
        step(batch)
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    losses = [float(step(batch).detach()) for _ in range(steps)]
    sync()
    seconds = (time.perf_counter() - start) / steps
    peak_flops = bench.matmul_peak(device, torch.float32 if dry else torch.bfloat16)[0]
    shape = bench.model_shape(model.get_base_model() if method == "lora" else model)
    flops = bench.batch_flops(shape, stats, trains_weights=method == "full", full_logits=False,
                              prefix_len=(4 if dry else PRE_SEQ_LEN) if method == "ptuning" else 0)
    peak_memory = torch.cuda.max_memory_allocated() if cuda else None
    return {"case": case, "method": method, "packed": packed, "records": len(lengths), "tokens": seq_len,
            "params": shape["params"], "step_s": seconds, "tokens_per_s": seq_len / seconds,
            "peak_memory_gb": None if peak_memory is None else peak_memory / 1e9,
            "mfu": flops / seconds / peak_flops, "matmul_peak_tflops": peak_flops / 1e12,
            "losses": losses, "attention": CASES[case][3], "dry": dry}


def available_cases(dry: bool) -> list[str]:
    cases = [c for c in CASES if c != "packing_fa2"]
    if not dry and importlib.util.find_spec("flash_attn") is not None:
        cases.insert(3, "packing_fa2")
    return cases


def format_table(results: list[dict]) -> str:
    header = f"{'case':<12} {'method':<8} {'params':>8} {'tokens':>6} {'step s':>7} {'tokens/s':>9} {'peak GB':>8} {'MFU':>6}  attention"
    lines = [header, "-" * len(header)]
    for r in results:
        if "error" in r:
            lines.append(f"{r['case']:<12} FAILED: {r['error']}")
            continue
        memory = "-" if r["peak_memory_gb"] is None else f"{r['peak_memory_gb']:.1f}"
        lines.append(f"{r['case']:<12} {r['method']:<8} {r['params'] / 1e9:>7.2f}B {r['tokens']:>6} {r['step_s']:>7.3f} "
                     f"{r['tokens_per_s']:>9.0f} {memory:>8} {r['mfu']:>6.1%}  {r['attention']}")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry", action="store_true", help="tiny shapes on the CPU (the test suite runs this)")
    parser.add_argument("--cases", nargs="+", choices=list(CASES), help="default: all that can run here")
    parser.add_argument("--steps", type=int, help="timed steps (default 5; --dry 1)")
    parser.add_argument("--warmup-steps", type=int, help="untimed steps first (default 2; --dry 1)")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--timeout", type=int, default=300, help="seconds per case")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # a child process runs one case
    args = parser.parse_args(argv)
    dry = args.dry or os.environ.get("GPU_CHECK_DRY") == "1"
    steps = args.steps or (1 if dry else 5)
    warmup = args.warmup_steps if args.warmup_steps is not None else (1 if dry else 2)
    if args.case:
        print("RESULT " + json.dumps(run_case(args.case, dry, warmup, steps)), flush=True)
        return []
    if not dry:
        import torch

        if not torch.cuda.is_available():
            sys.exit("no GPU here: run with --dry for the CPU smoke test")
    results = []
    for case in args.cases or available_cases(dry):
        env = {**os.environ, **({"DS_ACCELERATOR": "cpu"} if dry else {})}
        command = [sys.executable, __file__, "--case", case, "--steps", str(steps), "--warmup-steps", str(warmup),
                   *(["--dry"] if dry else [])]
        try:
            child = subprocess.run(command, capture_output=True, text=True, env=env, cwd=str(ROOT), timeout=args.timeout)
            lines = [line for line in child.stdout.splitlines() if line.startswith("RESULT ")]
            if child.returncode != 0 or not lines:
                tail = (child.stdout + child.stderr).strip().splitlines()[-12:]
                results.append({"case": case, "error": f"exit {child.returncode}: " + " | ".join(tail)[-600:]})
            else:
                results.append(json.loads(lines[-1][len("RESULT "):]))
        except subprocess.TimeoutExpired:
            results.append({"case": case, "error": f"over {args.timeout} s"})
        print(format_table(results[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
    versions = {name: installed_version(name) for name in ("torch", "transformers", "peft", "deepspeed")}
    print("versions: " + ", ".join(f"{name} {version}" for name, version in versions.items()))
    print(format_table(results))
    print(json.dumps(results, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    if any("error" in r for r in results):
        sys.exit(1)
    return results


if __name__ == "__main__":
    main()
