"""RunSpecs of tiny and small GLM runs built in code, shared by the plan's tests."""

import random

import torch

from chatglm3_finetune.model.tiny_model import tiny_glm_config
from chatglm3_finetune.plan.spec import Row, RunSpec

SHAPES = {
    "tiny": dict(vocab_size=1024, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128),
    # benchmarks/bench_train.py's small model: ChatGLM3's vocabulary, 86M parameters
    "small": dict(vocab_size=65024, hidden_size=512, num_layers=6, num_heads=8, num_kv_heads=2, intermediate_size=1712),
}


def synthetic_rows(count: int, length: int, vocab_size: int, seed: int = 0) -> tuple[Row, ...]:
    """`count` records of decreasing length from `length`, the second half of each a target."""
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        n = max(length - 13 * i, 8)
        ids = tuple(rng.randrange(3, vocab_size) for _ in range(n))
        rows.append(Row(ids, (-100,) * (n // 2) + ids[n // 2:]))
    return tuple(rows)


def packed(rows: tuple[Row, ...], row_length: int) -> tuple[Row, ...]:
    from chatglm3_finetune.data.packing import pack_features

    return tuple(Row(tuple(r["input_ids"]), tuple(r["labels"]), tuple(r["position_ids"]), tuple(r["seq_lens"]))
                 for r in pack_features([row.as_feature() for row in rows], row_length))


def make_spec(shape: str = "tiny", method: str = "ptuning", batch: int = 1, length: int = 96,
              checkpointing: bool = True, projection: bool = False, packing: bool = False, **changes) -> RunSpec:
    dims = dict(SHAPES[shape])
    vocab = dims.pop("vocab_size")
    config = tiny_glm_config(vocab, **dims)
    rows = synthetic_rows(max(batch, 1) * (4 if packing else 1), length, vocab)
    if packing:
        rows = packed(rows, 2 * length)
    method_args = {"ptuning": dict(pre_seq_len=8, prefix_projection=projection), "lora": dict(lora_rank=4),
                   "full": {}}[method]
    spec = RunSpec(model_path="in-memory", config=config, method=method, weights_dtype=torch.float32,
                   mixed_precision=None, rows=rows, rows_source="synthetic", micro_batch=batch,
                   gradient_checkpointing=checkpointing, packing=packing,
                   typical={"tokens": float(length), "targets": length / 2, "square": float(length ** 2), "records": 100},
                   use_cpu=True, **method_args)
    return spec.replace(**changes)
