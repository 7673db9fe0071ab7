"""Tiny ChatGLM3-layout tokenizers and GLM models, built in code (tests, demo, benchmarks).

The tokenizer is a SentencePiece model trained on the given texts with identity
normalization (newlines survive, as in the real ChatGLM3 model) and byte fallback
(any character encodes); the nine ChatGLM3 special tokens follow its pieces.

The model starts with random weights; `pretrain_tiny_model` gives it a short causal-LM
"pretraining" on plain texts, so that P-Tuning on it has a base that knows something
(on a random base the prefix cannot lower the loss: the logits stay near uniform).
"""

from __future__ import annotations

import io
import json
import logging
import math
import os

import sentencepiece as spm
from transformers import GlmConfig, GlmForCausalLM

from ..format.chat_format import SPECIAL_TOKENS
from ..train.file_modes import respect_umask
from ..format.tokenizer import TOKENIZER_MODEL_FILE, load_tokenizer

PRETRAINING_FILE = "pretraining.json"

logger = logging.getLogger(__name__)

BUILTIN_CORPUS = [
    "Answer the following questions as best as you can. You have access to the following tools:",
    "I need to use the weather tool to find out the temperature in Paris tomorrow.",
    "The user wants to know the response details. Here is the final answer.",
    "tool_call(city='Paris', days=3) ```python print(1 + 2) ``` observation result",
    '{"name": "get_weather", "description": "Get the weather", "parameters": {"city": "string"}}',
    "你好，请问今天北京的天气怎么样？ 今天北京晴，气温二十度，适合出门。",
    "类型#裙*版型#显瘦*颜色#黑色 这款连衣裙采用黑色设计，显瘦又时尚，优雅大方。",
    "Hello! How can I help you today? Thank you, that was helpful. Goodbye.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n5\n",
    "The quick brown fox jumps over the lazy dog. 0123456789 + - * / = ( ) [ ] { } : ; , . ! ?",
]


def train_tiny_sentencepiece(out_dir: str, texts: list[str] | None = None, vocab_size: int = 600) -> str:
    """Trains a small SentencePiece BPE model like ChatGLM3's (unk 0, bos 1, eos 2); returns its path."""
    os.makedirs(out_dir, exist_ok=True)
    corpus = [t for t in (texts or []) + BUILTIN_CORPUS for t in t.split("\n") if t.strip()]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=model, vocab_size=vocab_size,
        model_type="bpe", character_coverage=0.9995, byte_fallback=True, split_digits=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, hard_vocab_limit=False,
        minloglevel=2,
    )
    path = os.path.join(out_dir, TOKENIZER_MODEL_FILE)
    with open(path, "wb") as f:
        f.write(model.getvalue())
    return path


def tiny_glm_config(vocab_size: int, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4,
                    num_kv_heads: int = 2, intermediate_size: int = 128, max_positions: int = 4096,
                    eos_token_id=None) -> GlmConfig:
    """A GlmConfig with ChatGLM3's block design (2 KV groups, half-rotary, q/k/v bias)."""
    return GlmConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        head_dim=hidden_size // num_heads, max_position_embeddings=max_positions, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
        pad_token_id=0, eos_token_id=eos_token_id if eos_token_id is not None else 2,
        attention_bias=True, tie_word_embeddings=False,
    )


def token_stream(tokenizer, texts: list[str]) -> list[int]:
    """The texts as one causal-LM stream: each encoded on its own (plain text, no chat format), then eos."""
    ids = []
    for text in texts:
        ids += tokenizer.encode_text(text) + [tokenizer.eos_token_id]
    return ids


def lm_loss(model, stream, seq_len: int = 128) -> float:
    """Mean next-token loss of the model over the stream, cut into consecutive windows of seq_len."""
    import torch

    windows = _windows(stream, seq_len)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(windows), 16):
            batch = windows[start:start + 16]
            total += model(input_ids=batch, labels=batch).loss.item() * batch.numel()
            count += batch.numel()
    model.train(was_training)
    return total / count


def _windows(stream, seq_len: int):
    import torch

    if len(stream) < seq_len:
        raise ValueError(f"the texts hold {len(stream)} tokens, fewer than seq_len {seq_len}: "
                         f"give more text or a smaller seq_len")
    usable = len(stream) // seq_len * seq_len
    return torch.tensor(stream[:usable]).view(-1, seq_len)


def pretrain_tiny_model(model, tokenizer, texts: list[str], steps: int, seq_len: int = 128, batch_size: int = 8,
                        lr: float = 3e-3, seed: int = 0) -> dict:
    """Trains the model in place as a causal LM on the plain texts; returns its LM loss before and after.

    The texts become one token stream (`token_stream`); every step takes batch_size windows of
    seq_len tokens at random offsets. AdamW in fp32 with a short warmup and cosine decay,
    gradients clipped at 1. Runs on one CPU thread: for matrices this small that is several times
    faster than two on a busy machine, and the result does not depend on the thread count.
    Deterministic: the same seed, model and texts give the same weights.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _pretrain(model, tokenizer, texts, steps, seq_len, batch_size, lr, seed)
    finally:
        torch.set_num_threads(threads)


def _pretrain(model, tokenizer, texts, steps, seq_len, batch_size, lr, seed) -> dict:
    import torch

    stream = token_stream(tokenizer, texts)
    data = torch.tensor(stream)
    loss_before = lm_loss(model, stream, seq_len)
    if steps <= 0:
        return {"steps": 0, "tokens": len(stream), "loss_before": loss_before, "loss_after": loss_before}
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min((step + 1) / warmup, 0.5 * (1 + math.cos(math.pi * step / steps))))
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(stream) - seq_len + 1, (batch_size,), generator=generator)
        batch = torch.stack([data[start:start + seq_len] for start in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    loss_after = lm_loss(model, stream, seq_len)
    logger.info("pretrained %d steps on %d tokens: LM loss %.3f -> %.3f", steps, len(stream), loss_before, loss_after)
    return {"steps": steps, "tokens": len(stream), "loss_before": loss_before, "loss_after": loss_after}


def build_tiny_model(out_dir: str, texts: list[str] | None = None, vocab_size: int = 600, seed: int = 0,
                     pretrain_steps: int = 0, pretrain_kwargs: dict | None = None, **config_kwargs) -> str:
    """Writes a tiny GlmForCausalLM plus its ChatGLM3-layout tokenizer into out_dir; returns out_dir.

    Random weights by default. With pretrain_steps > 0 the model is first trained on the texts
    plus the built-in corpus (`pretrain_tiny_model`, given pretrain_kwargs such as seq_len,
    batch_size, lr), and what it did is written to pretraining.json beside the weights."""
    import torch

    train_tiny_sentencepiece(out_dir, texts, vocab_size)
    tokenizer = load_tokenizer(out_dir)
    tokenizer.save_pretrained(out_dir)
    config = tiny_glm_config(len(tokenizer), eos_token_id=tokenizer.stop_token_ids, **config_kwargs)
    torch.manual_seed(seed)
    model = GlmForCausalLM(config)
    record = os.path.join(out_dir, PRETRAINING_FILE)
    if os.path.exists(record):
        os.remove(record)
    if pretrain_steps > 0:
        settings = {"seed": seed, **(pretrain_kwargs or {})}
        result = pretrain_tiny_model(model, tokenizer, (texts or []) + BUILTIN_CORPUS, pretrain_steps, **settings)
        with open(record, "w", encoding="utf-8") as f:
            json.dump({**settings, **result}, f, indent=2)
    model.generation_config.eos_token_id = tokenizer.stop_token_ids
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    respect_umask(out_dir)
    return out_dir


def read_pretraining(model_dir: str) -> dict | None:
    """What `build_tiny_model` pretrained (steps, settings, LM loss before/after), or None for random weights."""
    path = os.path.join(model_dir, PRETRAINING_FILE)
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


__all__ = ["BUILTIN_CORPUS", "SPECIAL_TOKENS", "train_tiny_sentencepiece", "tiny_glm_config", "token_stream", "lm_loss",
           "pretrain_tiny_model", "build_tiny_model", "read_pretraining", "PRETRAINING_FILE"]
