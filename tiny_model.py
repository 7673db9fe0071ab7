"""Tiny ChatGLM3-layout tokenizers and GLM models, built in code (tests, demo, benchmarks).

The tokenizer is a SentencePiece model trained on the given texts with identity
normalization (newlines survive, as in the real ChatGLM3 model) and byte fallback
(any character encodes); the nine ChatGLM3 special tokens follow its pieces.
"""

from __future__ import annotations

import io
import os

import sentencepiece as spm
from transformers import GlmConfig, GlmForCausalLM

from chatglm3_tokenizer import SPECIAL_TOKENS, TOKENIZER_MODEL_FILE, load_tokenizer

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


def build_tiny_model(out_dir: str, texts: list[str] | None = None, vocab_size: int = 600, seed: int = 0,
                     **config_kwargs) -> str:
    """Writes a tiny GlmForCausalLM plus its ChatGLM3-layout tokenizer into out_dir; returns out_dir."""
    import torch

    train_tiny_sentencepiece(out_dir, texts, vocab_size)
    tokenizer = load_tokenizer(out_dir)
    tokenizer.save_pretrained(out_dir)
    config = tiny_glm_config(len(tokenizer), eos_token_id=tokenizer.stop_token_ids, **config_kwargs)
    torch.manual_seed(seed)
    model = GlmForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.stop_token_ids
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    return out_dir


__all__ = ["BUILTIN_CORPUS", "SPECIAL_TOKENS", "train_tiny_sentencepiece", "tiny_glm_config", "build_tiny_model"]
