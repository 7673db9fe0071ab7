#!/usr/bin/env python3
"""Builds the demo's tiny ChatGLM3-architecture model and its tokenizer, both trained on the samples.

    python scripts/make_tiny_model.py                      # -> models/tiny-chatglm3 (~40 s)
    python scripts/make_tiny_model.py --pretrain-steps 0   # random weights, a few seconds
    python scripts/make_tiny_model.py --hidden-size 64 --pretrain-steps 600

The SentencePiece vocabulary is trained on the bundled sample data (data/sample), so the
demo's prompts, tool documentation and answers split into meaningful pieces. The model is then
"pretrained" briefly as a causal LM on the same texts as plain text (no chat format), so that it
knows the language of the samples but not the chat layout: P-Tuning on it visibly lowers the loss,
which it cannot do on random weights. The folder loads with AutoModelForCausalLM.from_pretrained
and chatglm3_tokenizer.load_tokenizer; pretraining.json in it records the pretraining.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

from ..data.converters.advertise_gen import convert_advertise_gen
from ..data.converters.tool_alpaca import convert_tool_alpaca
from ..data.records import split_lines

SAMPLE_DIR = ROOT / "data" / "sample"
TOOL_ALPACA_SAMPLE = SAMPLE_DIR / "tool_alpaca_train.json"
ADVERTISE_GEN_SAMPLE = SAMPLE_DIR / "advertise_gen_train.json"
DEFAULT_HIDDEN_SIZE = 128  # with 2 layers and 400 steps, P-Tuning lowers both sample tasks' loss by > 0.5 nats
DEFAULT_PRETRAIN_STEPS = 400
# Windows as long as most formatted ToolAlpaca records (360-800 tokens): positions never seen in
# pretraining would cost the base its knowledge in the later turns.
PRETRAIN_SETTINGS = {"seq_len": 512, "batch_size": 2, "lr": 3e-3}


def tool_call_text(parameters: dict) -> str:
    """The code block a tool turn becomes (REFERENCE.md), so its pieces are in the vocabulary."""
    arguments = ", ".join(f"{key}={value!r}" for key, value in parameters.items())
    return f"```python\ntool_call({arguments})\n```"


def tool_alpaca_texts(records: list) -> list[str]:
    """Every string a formatted ToolAlpaca conversation shows the model."""
    rows, _ = convert_tool_alpaca(records)
    texts = []
    for api in records:
        texts.append(api["NLDocumentation"])
        texts.append(json.dumps([api["NLDocumentation"]], indent=4, ensure_ascii=False))
    for row in rows:
        for turn in row["conversations"]:
            if turn["role"] == "tool":
                observation = turn["observation"]
                texts += [turn["name"], tool_call_text(turn["parameters"]),
                          observation if isinstance(observation, str) else json.dumps(observation, ensure_ascii=False)]
            else:
                texts.append(turn["content"])
    return texts


def advertise_gen_texts(lines: list[str]) -> list[str]:
    return [text for row in convert_advertise_gen(lines) for text in (row["prompt"], row["response"])]


def sample_texts(tool_alpaca_path: Path = TOOL_ALPACA_SAMPLE, advertise_gen_path: Path = ADVERTISE_GEN_SAMPLE) -> list[str]:
    """The texts of the bundled samples, as the demo feeds them to the model."""
    with open(tool_alpaca_path, encoding="utf-8") as f:
        texts = tool_alpaca_texts(json.load(f))
    with open(advertise_gen_path, encoding="utf-8", newline="") as f:
        texts += advertise_gen_texts(split_lines(f.read()))
    return texts


def make_tiny_model(output: str, vocab_size: int = 600, hidden_size: int = DEFAULT_HIDDEN_SIZE, layers: int = 2,
                    seed: int = 0, pretrain_steps: int = DEFAULT_PRETRAIN_STEPS) -> dict:
    """Writes the model and tokenizer into output; returns what was built (for printing and tests)."""
    from ..format.tokenizer import load_tokenizer
    from .tiny_model import build_tiny_model, read_pretraining
    from transformers import GlmForCausalLM

    if hidden_size <= 0 or hidden_size % 16:
        raise ValueError(f"--hidden-size {hidden_size}: use a positive multiple of 16 (4 heads, "
                         f"each with an even rotary half)")
    if pretrain_steps < 0:
        raise ValueError(f"--pretrain-steps {pretrain_steps}: use 0 (random weights) or more")
    try:
        build_tiny_model(output, texts=sample_texts(), vocab_size=vocab_size, seed=seed,
                         pretrain_steps=pretrain_steps, pretrain_kwargs=PRETRAIN_SETTINGS,
                         hidden_size=hidden_size, num_layers=layers, intermediate_size=2 * hidden_size)
    except RuntimeError as error:
        needed = re.search(r"smaller than required_chars\. \d+ vs (\d+)", str(error))
        if not needed:
            raise
        raise ValueError(f"--vocab-size {vocab_size} is too small: the sample texts need at least "
                         f"{needed.group(1)} pieces (256 byte pieces, 3 control pieces, every character)") from None
    tokenizer = load_tokenizer(output)
    model = GlmForCausalLM.from_pretrained(output)
    return {
        "output": output,
        "parameters": sum(p.numel() for p in model.parameters()),
        "pieces": tokenizer.num_pieces,
        "vocab_size": len(tokenizer),
        "special_tokens": dict(tokenizer.special_token_ids),
        "hidden_size": model.config.hidden_size,
        "layers": model.config.num_hidden_layers,
        "pretraining": read_pretraining(output),
        "files": sorted(p.name for p in Path(output).iterdir()),
    }


def weights_line(pretraining: dict | None) -> str:
    if not pretraining:
        return "random weights"
    return (f"pretrained {pretraining['steps']} steps on {pretraining['tokens']:,} tokens of plain sample text, "
            f"LM loss {pretraining['loss_before']:.2f} -> {pretraining['loss_after']:.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default="models/tiny-chatglm3")
    parser.add_argument("--vocab-size", type=int, default=600, help="SentencePiece pieces (special tokens come after)")
    parser.add_argument("--hidden-size", type=int, default=DEFAULT_HIDDEN_SIZE)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pretrain-steps", type=int, default=DEFAULT_PRETRAIN_STEPS,
                        help="causal-LM steps on the sample texts (0: random weights)")
    args = parser.parse_args(argv)
    if args.pretrain_steps > 0:
        print(f"building {args.output}: tokenizer, then {args.pretrain_steps} causal-LM steps on the sample texts",
              flush=True)
    try:
        built = make_tiny_model(args.output, args.vocab_size, args.hidden_size, args.layers, args.seed,
                                args.pretrain_steps)
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    special = ", ".join(f"{name} {token_id}" for name, token_id in built["special_tokens"].items())
    print(f"wrote {built['output']}: {', '.join(built['files'])}")
    print(f"model: GlmForCausalLM, {built['layers']} layers, hidden {built['hidden_size']}, "
          f"{built['parameters']:,} parameters ({weights_line(built['pretraining'])})")
    print(f"tokenizer: {built['pieces']} SentencePiece pieces trained on {SAMPLE_DIR.relative_to(ROOT)}, "
          f"vocab {built['vocab_size']} with special tokens {special}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
