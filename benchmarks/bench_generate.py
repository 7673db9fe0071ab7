"""New tokens per second of ChatModel generation: greedy, a fixed number of new tokens per row
(stop tokens are suppressed until then, and the tokens returned are counted), batch 1 and 8,
for the plain tiny model, the same model with a P-Tuning prefix, and streaming at batch 1.

    python benchmarks/bench_generate.py                        # CPU, builds the demo-sized tiny model
    python benchmarks/bench_generate.py --model models/tiny-chatglm3 --threads 1 --max-new-tokens 128
    python benchmarks/bench_generate.py --device cuda --hidden 256 --layers 4

Prompts are chat prompts of different lengths (so batches are left-padded); each row is timed
as the median of --repeats runs after one warm-up run.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from chatglm3_finetune.serve.chat_engine import ChatModel  # noqa: E402
from chatglm3_finetune.format.tokenizer import load_tokenizer  # noqa: E402
from chatglm3_finetune.format.chat_format import Message  # noqa: E402

QUESTIONS = [
    "What is the weather in Paris?",
    "Hello! How can I help you today?",
    "I need to use the weather tool to find out the temperature in Paris tomorrow.",
    "类型#裙*版型#显瘦*颜色#黑色",
    "The quick brown fox jumps over the lazy dog.",
    "Thank you, that was helpful.",
    "def add(a, b): return a + b",
    "你好，请问今天北京的天气怎么样？",
]


def load_models(args):
    from transformers import GlmForCausalLM

    from chatglm3_finetune.model.ptuning.prefix_model import PrefixTuningModel

    folder = args.model
    if folder is None:
        from chatglm3_finetune.model.tiny_model import build_tiny_model

        folder = build_tiny_model(tempfile.mkdtemp(prefix="bench-generate-"), hidden_size=args.hidden,
                                  num_layers=args.layers, intermediate_size=2 * args.hidden)
    tokenizer = load_tokenizer(folder)
    base = GlmForCausalLM.from_pretrained(folder).to(args.device).eval()
    torch.manual_seed(0)
    prefixed = PrefixTuningModel(base, pre_seq_len=args.pre_seq_len).to(args.device).eval()
    return {"plain": ChatModel(base, tokenizer), f"P-Tuning (prefix {args.pre_seq_len})": ChatModel(prefixed, tokenizer)}


def prompts(chat: ChatModel, batch: int) -> list[list[int]]:
    return [chat.chat_input_ids([Message("user", "", QUESTIONS[i % len(QUESTIONS)], False)]) for i in range(batch)]


def timed(run, repeats: int) -> tuple[float, int]:
    """(median seconds, new tokens of one run) after a warm-up run."""
    run()
    times, tokens = [], 0
    for _ in range(repeats):
        start = time.perf_counter()
        tokens = run()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), tokens


def generate_run(chat: ChatModel, batch: int, new_tokens: int):
    rows = prompts(chat, batch)

    def run() -> int:
        out = chat.generate(rows, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
        return sum(len(row) for row in out)

    return run


def stream_run(chat: ChatModel, new_tokens: int):
    row = prompts(chat, 1)[0]

    def run() -> int:
        stream = chat.stream(row, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
        for _ in stream:
            pass
        return len(stream.token_ids)

    return run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="model folder (default: build a tiny one in a temp folder)")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--pre-seq-len", type=int, default=16)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    models = load_models(args)
    params = sum(p.numel() for p in next(iter(models.values())).model.parameters())
    print(f"device {args.device}, torch threads {torch.get_num_threads()}, {params / 1e6:.2f}M parameters, "
          f"greedy, {args.max_new_tokens} new tokens per row, median of {args.repeats}")
    print("| model | mode | batch | new tokens | seconds | new tokens/s |")
    print("|---|---|---:|---:|---:|---:|")
    for name, chat in models.items():
        cases = [("generate", batch, generate_run(chat, batch, args.max_new_tokens)) for batch in args.batch_sizes]
        cases.append(("stream", 1, stream_run(chat, args.max_new_tokens)))
        for mode, batch, run in cases:
            seconds, tokens = timed(run, args.repeats)
            print(f"| {name} | {mode} | {batch} | {tokens} | {seconds:.3f} | {tokens / seconds:,.0f} |", flush=True)


if __name__ == "__main__":
    main()
