"""Serving speed of api_server.py: requests/s, completion tokens/s and time to first token
(streaming) at 1, 8 and 32 concurrent clients, with batched decoding on (--max-batch-size 32) and
off (--max-batch-size 1), side by side in one run, all on 127.0.0.1.

By default the model is the tests' tiny GLM (hidden 64, 2 layers), first taught the ChatGLM3 chat
layout for a few steps on the bundled AdvertiseGen samples so that its answers are plain text
that streams (a random model's first line is never empty, so the server would hold its whole
answer as a would-be tool call and the first token would arrive with the last). The server
runs in its own process (one per mode, started in turn); each client sends streaming requests
back to back (greedy, max_tokens fixed) and times the first content chunk and the end.

    python benchmarks/bench_serve.py --threads 1              # tiny model on the CPU
    python benchmarks/bench_serve.py --model models/base --pt-checkpoint output/pt --device cuda
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SAMPLES = ROOT / "data" / "sample" / "advertise_gen_train.json"


def sample_records() -> list[dict]:
    with open(SAMPLES, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [{"conversations": [{"role": "user", "content": row["content"]},
                               {"role": "assistant", "content": row["summary"]}]} for row in rows]


def build_chat_tuned_tiny_model(out_dir: str, steps: int, seed: int = 0) -> str:
    """The tests' tiny model, trained `steps` AdamW steps on the sample chats (full fine-tuning)."""
    import torch
    from transformers import GlmForCausalLM

    from chatglm3_finetune.format.tokenizer import load_tokenizer
    from chatglm3_finetune.data.collation import DataCollatorForChatGLM
    from chatglm3_finetune.data.encoding import encode_multi_turn
    from chatglm3_finetune.model.tiny_model import build_tiny_model

    records = sample_records()
    texts = [turn["content"] for record in records for turn in record["conversations"]]
    build_tiny_model(out_dir, texts=texts, seed=seed)
    tokenizer = load_tokenizer(out_dir)
    model = GlmForCausalLM.from_pretrained(out_dir)
    features = [encode_multi_turn(tokenizer, record).as_dict() for record in records]
    collate = DataCollatorForChatGLM(tokenizer.pad_token_id)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        batch = collate([features[i] for i in torch.randint(len(features), (8,), generator=generator).tolist()])
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    model.save_pretrained(out_dir)
    return out_dir


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, model_dir: str, port: int, max_batch_size: int) -> subprocess.Popen:
    command = [sys.executable, str(ROOT / "api_server.py"), "--model", model_dir, "--model-name", "bench",
               "--port", str(port), "--device", args.device, "--log-level", "warning",
               "--max-batch-size", str(max_batch_size), "--max-queue", str(max(64, max(args.clients)))]
    for flag, value in (("--tokenizer", args.tokenizer), ("--pt-checkpoint", args.pt_checkpoint),
                        ("--lora", args.lora), ("--dtype", args.dtype), ("--threads", args.threads)):
        if value:
            command += [flag, value]
    process = subprocess.Popen(command, cwd=str(ROOT), env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    deadline = time.monotonic() + 600
    while True:
        if process.poll() is not None:
            raise SystemExit(f"the server exited with {process.returncode}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/v1/models")
            if conn.getresponse().status == 200:
                return process
        except OSError:
            if time.monotonic() > deadline:
                process.kill()
                raise SystemExit("the server did not come up in 10 minutes")
            time.sleep(0.2)


def timed_request(port: int, prompt: str, max_tokens: int) -> dict:
    """One streaming request: seconds to the first content chunk and to the end, tokens generated."""
    body = {"model": "bench", "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    started = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    if response.status != 200:
        raise RuntimeError(f"status {response.status}: {response.read()[:500]!r}")
    first = None
    tokens = 0
    for line in response:  # parsed only as far as needed: the clients share the CPU with the server
        if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
            continue
        if first is None:
            delta = (json.loads(line[6:]).get("choices") or [{}])[0].get("delta", {})
            if delta.get("content") or delta.get("tool_calls"):
                first = time.perf_counter() - started
        elif b'"usage"' in line:
            tokens = json.loads(line[6:])["usage"]["completion_tokens"]
    total = time.perf_counter() - started
    conn.close()
    return {"ttft": first if first is not None else total, "latency": total, "tokens": tokens}


def run_level(port: int, clients: int, requests: int, prompts: list[str], max_tokens: int) -> dict:
    """`requests` requests spread over `clients` threads that each send theirs back to back."""
    counter = iter(range(requests))
    lock = threading.Lock()

    def client() -> list[dict]:
        results = []
        while True:
            with lock:
                index = next(counter, None)
            if index is None:
                return results
            results.append(timed_request(port, prompts[index % len(prompts)], max_tokens))

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [r for rs in pool.map(lambda _: client(), range(clients)) for r in rs]
    wall = time.perf_counter() - started
    ttfts = sorted(r["ttft"] for r in results)
    return {"clients": clients, "requests": len(results), "wall_s": wall, "requests_per_s": len(results) / wall,
            "tokens_per_s": sum(r["tokens"] for r in results) / wall,
            "mean_tokens": statistics.mean(r["tokens"] for r in results),
            "ttft_p50_s": percentile(ttfts, 50), "ttft_p95_s": percentile(ttfts, 95),
            "latency_mean_s": statistics.mean(r["latency"] for r in results)}


def percentile(sorted_values: list[float], percent: float) -> float:
    """The nearest-rank percentile."""
    rank = max(1, round(percent / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def print_table(rows: list[dict]) -> None:
    print(f"{'batching':>8} {'clients':>7} {'requests':>8} {'req/s':>7} {'tok/s':>7} {'tokens/req':>10} "
          f"{'TTFT p50':>8} {'TTFT p95':>8} {'latency':>8}")
    for r in rows:
        print(f"{r['batching']:>8} {r['clients']:>7} {r['requests']:>8} {r['requests_per_s']:>7.2f} "
              f"{r['tokens_per_s']:>7.1f} {r['mean_tokens']:>10.1f} {r['ttft_p50_s'] * 1000:>6.0f}ms "
              f"{r['ttft_p95_s'] * 1000:>6.0f}ms {r['latency_mean_s'] * 1000:>6.0f}ms")


def goals(rows: list[dict]) -> list[str]:
    """The issue's goals, read off the batched rows: 8 clients >= 3x the tokens/s of 1, TTFT p50
    at 8 clients within 3x that at 1."""
    by_clients = {r["clients"]: r for r in rows if r["batching"] == "on"}
    if 1 not in by_clients or 8 not in by_clients:
        return []
    one, eight = by_clients[1], by_clients[8]
    speedup = eight["tokens_per_s"] / one["tokens_per_s"]
    ttft = eight["ttft_p50_s"] / one["ttft_p50_s"]
    return [f"8 clients / 1 client, completion tokens/s: {speedup:.2f}x (goal >= 3x): {'met' if speedup >= 3 else 'MISSED'}",
            f"8 clients / 1 client, TTFT p50: {ttft:.2f}x (goal <= 3x): {'met' if ttft <= 3 else 'MISSED'}"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="model folder to serve (default: a chat-tuned tiny model built here)")
    parser.add_argument("--tokenizer")
    parser.add_argument("--pt-checkpoint")
    parser.add_argument("--lora")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--threads", help="torch CPU threads in the server (api_server.py --threads)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=64,
                        help="requests per concurrency level (at least 4 per client)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="measure every level this many times, interleaved, and keep each one's best "
                             "round (by completion tokens/s): other jobs on a shared machine come and go")
    parser.add_argument("--modes", nargs="+", choices=["on", "off"], default=["on", "off"],
                        help="batched decoding on (--max-batch-size = the most clients) and/or off (1)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--tune-steps", type=int, default=60, help="chat-layout steps for the default tiny model")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)

    prompts = [record["conversations"][0]["content"] for record in sample_records()]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model or build_chat_tuned_tiny_model(os.path.join(tmp, "tiny-chat"), args.tune_steps)
        rows = []
        for mode in args.modes:
            port = free_port()
            server = start_server(args, model_dir, port, max(args.clients) if mode == "on" else 1)
            try:
                run_level(port, 1, 2, prompts, args.max_tokens)  # warm-up
                rounds = [[run_level(port, clients, max(args.requests, 4 * clients), prompts, args.max_tokens)
                           for clients in args.clients] for _ in range(args.rounds)]
                for measured in zip(*rounds):
                    rows.append({"batching": mode, **max(measured, key=lambda r: r["tokens_per_s"])})
            finally:
                server.terminate()
                server.wait(timeout=30)
    load = os.getloadavg()
    print(f"model: {args.model or f'tiny GLM (hidden 64, 2 layers), {args.tune_steps} chat-layout steps'}, "
          f"device {args.device}, threads {args.threads or 'torch default'}, max_tokens {args.max_tokens}, greedy, "
          f"streaming, best of {args.rounds} rounds; load average at the end {load[0]:.1f} on {os.cpu_count()} CPUs")
    print_table(rows)
    for line in goals(rows):
        print(line)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
