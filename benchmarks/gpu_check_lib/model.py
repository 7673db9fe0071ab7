"""What the GPU check trains on: a random-weight ChatGLM3 checkpoint in the ORIGINAL THUDM layout
(config.json with model_type chatglm, pytorch_model-0000N-of-0000M.bin shards with their index, the
real tokenizer files), written shard by shard so the whole model is never in memory at once, and
synthetic conversations of exact token lengths.

The checkpoint is what a user downloads from the hub, so the check converts it with
scripts/convert_chatglm3.py as the README says. Weights are normal(0, 0.02) (norms 1, biases 0): the
loss starts near ln(65024) and is finite, which is all a memory and pipeline check needs.
"""

from __future__ import annotations

import json
import os
import shutil

VOCAB = 65024  # ChatGLM3's padded vocabulary (the tokenizer has 64798 ids)
SHAPES = {
    # ChatGLM3-6B itself: 6.24B parameters, 7 shards in the original folder
    "6b": dict(hidden_size=4096, num_layers=28, num_attention_heads=32, multi_query_group_num=2, kv_channels=128,
               ffn_hidden_size=13696, shards=7),
    # the ~1B GLM of the DeepSpeed cases on a GPU (1.26B parameters)
    "1b": dict(hidden_size=2048, num_layers=16, num_attention_heads=16, multi_query_group_num=2, kv_channels=128,
               ffn_hidden_size=5632, shards=2),
    # the DeepSpeed cases on 2 CPU ranks (186M parameters, 134M of them the embedding and output layer)
    "small": dict(hidden_size=1024, num_layers=4, num_attention_heads=8, multi_query_group_num=2, kv_channels=128,
                  ffn_hidden_size=2816, shards=2),
    # --dry: the shape of ../shared/data/chatglm3-tiny-original
    "tiny": dict(hidden_size=32, num_layers=2, num_attention_heads=4, multi_query_group_num=2, kv_channels=8,
                 ffn_hidden_size=64, shards=2),
}
TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json")


def original_config(shape: str) -> dict:
    """config.json of an original THUDM ChatGLM3 folder with this shape (ChatGLM3-6B's own settings)."""
    s = SHAPES[shape]
    return {
        "_name_or_path": f"gpu-check-chatglm3-{shape}", "model_type": "chatglm", "architectures": ["ChatGLMModel"],
        "auto_map": {"AutoConfig": "configuration_chatglm.ChatGLMConfig",
                     "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
                     "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
                     "AutoModelForSeq2SeqLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
                     "AutoModelForSequenceClassification": "modeling_chatglm.ChatGLMForSequenceClassification"},
        "add_bias_linear": False, "add_qkv_bias": True, "apply_query_key_layer_scaling": True,
        "apply_residual_connection_post_layernorm": False, "attention_dropout": 0.0, "attention_softmax_in_fp32": True,
        "bias_dropout_fusion": True, "ffn_hidden_size": s["ffn_hidden_size"], "fp32_residual_connection": False,
        "hidden_dropout": 0.0, "hidden_size": s["hidden_size"], "kv_channels": s["kv_channels"],
        "layernorm_epsilon": 1e-05, "multi_query_attention": True, "multi_query_group_num": s["multi_query_group_num"],
        "num_attention_heads": s["num_attention_heads"], "num_layers": s["num_layers"], "original_rope": True,
        "padded_vocab_size": VOCAB, "post_layer_norm": True, "rmsnorm": True, "seq_length": 8192, "use_cache": True,
        "torch_dtype": "float16", "transformers_version": "4.30.2", "tie_word_embeddings": False,
        "eos_token_id": 2, "pad_token_id": 0,
    }


def tensor_shapes(shape: str) -> dict[str, tuple[int, ...]]:
    """Every tensor of the original checkpoint, in the original names and order."""
    s = SHAPES[shape]
    hidden, heads, kv, head_dim = s["hidden_size"], s["num_attention_heads"], s["multi_query_group_num"], s["kv_channels"]
    qkv = heads * head_dim + 2 * kv * head_dim
    shapes = {"transformer.embedding.word_embeddings.weight": (VOCAB, hidden),
              "transformer.rotary_pos_emb.inv_freq": (head_dim // 4,)}
    for i in range(s["num_layers"]):
        layer = f"transformer.encoder.layers.{i}."
        shapes.update({
            layer + "input_layernorm.weight": (hidden,),
            layer + "self_attention.query_key_value.weight": (qkv, hidden),
            layer + "self_attention.query_key_value.bias": (qkv,),
            layer + "self_attention.dense.weight": (hidden, heads * head_dim),
            layer + "post_attention_layernorm.weight": (hidden,),
            layer + "mlp.dense_h_to_4h.weight": (2 * s["ffn_hidden_size"], hidden),
            layer + "mlp.dense_4h_to_h.weight": (hidden, s["ffn_hidden_size"]),
        })
    shapes["transformer.encoder.final_layernorm.weight"] = (hidden,)
    shapes["transformer.output_layer.weight"] = (VOCAB, hidden)
    return shapes


def parameter_count(shape: str) -> int:
    from math import prod

    return sum(prod(dims) for name, dims in tensor_shapes(shape).items() if not name.endswith("inv_freq"))


def split_into_shards(shapes: dict[str, tuple[int, ...]], count: int) -> list[list[str]]:
    """Consecutive tensors in `count` shards of about equal size (the original splits this way)."""
    from math import prod

    total = sum(prod(dims) for dims in shapes.values())
    shards, current, filled = [], [], 0
    for name, dims in shapes.items():
        current.append(name)
        filled += prod(dims)
        if filled >= total * (len(shards) + 1) / count and len(shards) < count - 1:
            shards.append(current)
            current = []
    shards.append(current)
    return [shard for shard in shards if shard]


POOL_SIZE = 1 << 24  # random values the CPU draws once; tensors are filled with windows of them


class RandomWeights:
    """normal(0, 0.02) weights. On a GPU every value is drawn; a CPU draws about 25M values a second,
    too slow for 6.2B, so there tensors are filled chunk by chunk with windows of one random pool at
    random offsets (no two chunks alike, which is all a memory and pipeline check needs)."""

    def __init__(self, seed: int, device: str):
        import torch

        self.device = device
        self.generator = torch.Generator(device=device).manual_seed(seed)
        if device == "cpu":
            self.pool = torch.empty(2 * POOL_SIZE, dtype=torch.float16).normal_(0.0, 0.02, generator=self.generator)

    def __call__(self, name: str, dims: tuple[int, ...]):
        import torch

        if name.endswith("inv_freq"):
            return 1.0 / (10000 ** (torch.arange(0, 2 * dims[0], 2, dtype=torch.float32) / (2 * dims[0])))
        if name.endswith("layernorm.weight"):
            return torch.ones(dims, dtype=torch.float16)
        if name.endswith(".bias"):
            return torch.zeros(dims, dtype=torch.float16)
        if self.device != "cpu":
            values = torch.empty(dims, dtype=torch.float16, device=self.device)
            return values.normal_(0.0, 0.02, generator=self.generator).cpu()
        values = torch.empty(dims, dtype=torch.float16).view(-1)
        for start in range(0, values.numel(), POOL_SIZE):
            length = min(POOL_SIZE, values.numel() - start)
            offset = int(torch.randint(0, POOL_SIZE, (1,), generator=self.generator))
            values[start:start + length] = self.pool[offset:offset + length]
        return values.view(dims)


def write_original_checkpoint(folder: str, shape: str, tokenizer_dir: str, seed: int = 0, device: str = "cpu",
                              progress=print) -> str:
    """Writes the checkpoint into `folder` (made empty first), one shard in memory at a time; returns it.
    `device` draws the random weights there (a GPU draws 6B in seconds); they are saved from the CPU."""
    import torch

    missing = [name for name in TOKENIZER_FILES if not os.path.isfile(os.path.join(tokenizer_dir, name))]
    if missing:
        raise FileNotFoundError(f"{tokenizer_dir}: no {', '.join(missing)} (the real ChatGLM3 tokenizer files)")
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    shapes = tensor_shapes(shape)
    shards = split_into_shards(shapes, SHAPES[shape]["shards"])
    random_weights = RandomWeights(seed, device)
    weight_map, total_bytes = {}, 0
    for number, names in enumerate(shards, start=1):
        file_name = f"pytorch_model-{number:05d}-of-{len(shards):05d}.bin"
        state = {name: random_weights(name, shapes[name]) for name in names}
        torch.save(state, os.path.join(folder, file_name))
        total_bytes += sum(t.numel() * t.element_size() for t in state.values())
        weight_map.update(dict.fromkeys(names, file_name))
        del state
        progress(f"  wrote {file_name} ({number}/{len(shards)})")
    with open(os.path.join(folder, "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total_bytes}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(original_config(shape), f, indent=2)
    for name in TOKENIZER_FILES:
        shutil.copyfile(os.path.join(tokenizer_dir, name), os.path.join(folder, name))
    return folder


# --- data ------------------------------------------------------------------------------------------
def one_token_words(tokenizer, count: int = 400) -> list[str]:
    """ASCII words that the tokenizer encodes as one piece each, alone and after a space."""
    words = []
    for piece_id in range(1000, 30000):
        piece = tokenizer.sp.id_to_piece(piece_id)
        word = piece[1:]
        if piece.startswith("\u2581") and word.isascii() and word.isalpha() and len(word) > 2:
            if len(tokenizer.encode_text(word)) == 1 and len(tokenizer.encode_text(f"{word} {word}")) == 2:
                words.append(word)
                if len(words) == count:
                    break
    return words


def conversation_of_length(tokenizer, length: int, seed: int, words: list[str]) -> dict:
    """A user/assistant conversation that encodes to exactly `length` tokens, about half of them
    targets (the assistant's reply and the eos)."""
    import random

    from chatglm3_finetune.data.encoding import encode_multi_turn

    overhead = len(encode_multi_turn(tokenizer, {"conversations": [{"role": "user", "content": "a"},
                                                                   {"role": "assistant", "content": "a"}]}).input_ids) - 2
    text_tokens = length - overhead
    if text_tokens < 2:
        raise ValueError(f"a conversation needs at least {overhead + 2} tokens, asked for {length}")
    rng = random.Random(seed)
    user = " ".join(rng.choice(words) for _ in range(text_tokens // 2))
    reply = " ".join(rng.choice(words) for _ in range(text_tokens - text_tokens // 2))
    record = {"conversations": [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]}
    encoded = len(encode_multi_turn(tokenizer, record).input_ids)
    if encoded != length:
        raise AssertionError(f"the synthetic conversation encodes to {encoded} tokens, not {length}")
    return record


def write_conversations(path: str, tokenizer, lengths: list[int], copies: int = 1, seed: int = 0) -> str:
    """A multi-turn .jsonl file: one conversation per length, the whole list repeated `copies` times
    (so every optimizer step of a run sees the same batch and its loss can be compared)."""
    words = one_token_words(tokenizer)
    records = [conversation_of_length(tokenizer, n, seed + i, words) for i, n in enumerate(lengths)]
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(copies):
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


def prompt_response_of_length(tokenizer, prompt_tokens: int, response_tokens: int, seed: int, words: list[str]) -> dict:
    """A prompt/response record of `prompt_tokens` ([gMASK] sop included) + `response_tokens` (the eos
    included) tokens."""
    import random

    from chatglm3_finetune.data.encoding import encode_prompt_response

    rng = random.Random(seed)
    record = {"prompt": " ".join(rng.choice(words) for _ in range(prompt_tokens - 2)),
              "response": " ".join(rng.choice(words) for _ in range(response_tokens - 1))}
    encoded = len(encode_prompt_response(tokenizer, record).input_ids)
    if encoded != prompt_tokens + response_tokens:
        raise AssertionError(f"the synthetic record encodes to {encoded} tokens, not {prompt_tokens + response_tokens}")
    return record
