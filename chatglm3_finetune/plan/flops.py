"""Model FLOPs of a training step: the formula benchmarks/bench_train.py measures MFU with, plus the
recomputation that gradient checkpointing and the chunked loss add (the time a step really takes).

Per batch (bench_train.py's module doc has the derivation):
  linear layers   k x N_body x real tokens      k = 6 when the weights train, 4 when frozen
  attention       6 x layers x d_attn x sum(L^2) per record of L tokens (+ 12 x layers x d_attn x
                  pre_seq_len x tokens for a P-Tuning prefix)
  output layer    k x hidden x vocab x positions (supervised tokens, or every token with full logits)
Recomputation (`recompute_flops`): gradient checkpointing runs each layer's forward again
(2 x N_body x tokens + the forward third of the attention); the targets-only loss recomputes each
chunk's output layer in the backward when there is more than one chunk (2 x hidden x vocab x targets).
"""

from __future__ import annotations


def model_shape(model) -> dict:
    """What the FLOPs formula needs, read off the loaded model (a P-Tuning wrapper's base included)."""
    causal_lm = model.base_model if hasattr(model, "prefix_encoder") else model  # unwrap P-Tuning
    config = causal_lm.config
    output_ids = {id(p) for p in causal_lm.get_input_embeddings().parameters()} | {
        id(p) for p in causal_lm.get_output_embeddings().parameters()}
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads

    def numel(p):  # a ZeRO-3 shard is empty; ds_numel is the whole parameter
        return getattr(p, "ds_numel", p.numel())

    return {"params": sum(numel(p) for p in causal_lm.parameters()),
            "body_params": sum(numel(p) for p in causal_lm.parameters() if id(p) not in output_ids),
            "hidden": config.hidden_size, "layers": config.num_hidden_layers,
            "attn_dim": config.num_attention_heads * head_dim, "vocab": causal_lm.get_output_embeddings().out_features}


def batch_flops(shape: dict, batch: dict, trains_weights: bool, full_logits: bool, prefix_len: int = 0,
                executed: bool = False) -> float:
    """Model FLOPs of one training step on a batch (see the module doc); `executed` counts padding too."""
    k = 6 if trains_weights else 4
    if executed:
        tokens = batch.get("positions", batch["rows"] * batch["padded_length"])
        lengths = batch.get("attention_lengths", [batch["padded_length"]] * batch["rows"])
    else:
        tokens, lengths = batch["real_tokens"], batch["record_lengths"]
    output_positions = tokens if full_logits else batch["supervised_tokens"]
    attention = 6 * shape["layers"] * shape["attn_dim"] * sum(n * n for n in lengths)
    attention += 12 * shape["layers"] * shape["attn_dim"] * prefix_len * tokens
    return k * shape["body_params"] * tokens + attention + k * shape["hidden"] * shape["vocab"] * output_positions


def recompute_flops(shape: dict, batch: dict, checkpointing: bool, loss_chunk_size: int | None,
                    prefix_len: int = 0) -> float:
    """FLOPs done again in the backward: the layers' forward under gradient checkpointing, and the
    output layer of each loss chunk when the targets fill more than one (padding included, as run)."""
    flops = 0.0
    if checkpointing:
        tokens = batch.get("positions", batch["real_tokens"])
        lengths = batch["record_lengths"]
        flops += 2 * shape["body_params"] * tokens + 2 * shape["layers"] * shape["attn_dim"] * sum(n * n for n in lengths)
        flops += 4 * shape["layers"] * shape["attn_dim"] * prefix_len * tokens
    if loss_chunk_size and batch["supervised_tokens"] > loss_chunk_size:
        flops += 2 * shape["hidden"] * shape["vocab"] * batch["supervised_tokens"]
    return flops


__all__ = ["model_shape", "batch_flops", "recompute_flops"]
