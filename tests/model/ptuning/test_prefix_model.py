"""P-Tuning v2 on the native GLM model: prefix layout, forward, checkpointing, generation, checkpoints."""

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from transformers import DynamicCache, GlmForCausalLM

from conftest import ROOT, shared_path
from chatglm3_finetune.model.ptuning.prefix_cache import PrefixCache
from chatglm3_finetune.model.ptuning.prefix_checkpoint import PREFIX_FORMAT, load_prefix_state, read_prefix_settings
from chatglm3_finetune.model.ptuning.prefix_model import PrefixEncoder, PrefixTuningModel
from chatglm3_finetune.model.tiny_model import tiny_glm_config

VOCAB = 128
LAYERS, KV_HEADS, HEAD_DIM = 2, 2, 16  # tiny_glm_config: hidden 64, 4 heads, 2 KV groups


def tiny_base(seed: int = 0, attn: str | None = None) -> GlmForCausalLM:
    torch.manual_seed(seed)
    config = tiny_glm_config(vocab_size=VOCAB)
    if attn:
        config._attn_implementation = attn
    return GlmForCausalLM(config).eval()


def tiny_prefix_model(pre_seq_len: int = 3, seed: int = 0, **kwargs) -> PrefixTuningModel:
    base = tiny_base(seed, kwargs.pop("attn", None))
    torch.manual_seed(seed + 1)
    return PrefixTuningModel(base, pre_seq_len, **kwargs)


def raw_prefix(encoder: PrefixEncoder) -> torch.Tensor:
    """[pre_seq_len, layers * 2 * kv * head_dim], computed from the weights by hand."""
    weights = dict(encoder.named_parameters())
    prefix = weights["embedding.weight"]
    if encoder.prefix_projection:
        hidden = torch.tanh(F.linear(prefix, weights["trans.0.weight"], weights["trans.0.bias"]))
        prefix = F.linear(hidden, weights["trans.2.weight"], weights["trans.2.bias"])
    return prefix


def reference_logits(model: PrefixTuningModel, input_ids, attention_mask=None) -> torch.Tensor:
    """The base model with a DynamicCache holding the prefix (read as [P, layers, 2, kv, head_dim],
    no rotary), the mask extended by P ones on the left, real-token positions from 0."""
    batch, length = input_ids.shape
    pre = model.pre_seq_len
    blocks = raw_prefix(model.prefix_encoder).view(pre, LAYERS, 2, KV_HEADS, HEAD_DIM)
    cache = DynamicCache()
    for layer in range(LAYERS):
        key = blocks[:, layer, 0].permute(1, 0, 2).unsqueeze(0).expand(batch, -1, -1, -1)
        value = blocks[:, layer, 1].permute(1, 0, 2).unsqueeze(0).expand(batch, -1, -1, -1)
        cache.update(key.contiguous(), value.contiguous(), layer)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    mask = torch.cat([torch.ones(batch, pre, dtype=attention_mask.dtype), attention_mask], dim=-1)
    return model.base_model(input_ids=input_ids, attention_mask=mask, position_ids=positions, cache=cache).logits


def random_ids(batch: int, length: int, seed: int = 5) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


# ---- the prefix layout -------------------------------------------------------------------------

@pytest.mark.parametrize("projection", [False, True])
def test_encoder_parameters_are_named_and_shaped_like_chatglm3(projection):
    encoder = PrefixEncoder(LAYERS, KV_HEADS, HEAD_DIM, pre_seq_len=4, prefix_projection=projection, hidden_size=48)
    kv_size = LAYERS * 2 * KV_HEADS * HEAD_DIM
    expected = {"embedding.weight": (4, kv_size)}
    if projection:
        expected.update({"trans.0.weight": (48, kv_size), "trans.0.bias": (48,),
                         "trans.2.weight": (kv_size, 48), "trans.2.bias": (kv_size,)})
    assert {name: tuple(p.shape) for name, p in encoder.state_dict().items()} == expected
    assert encoder().shape == (1, 4, kv_size)


def test_layer_split_matches_chatglm3_reading():
    """ChatGLM3 views the output as [b, P, layers*2, kv, hd], permutes to [layers*2, P, b, kv, hd] and
    splits in pairs: layer l gets block 2l as key and 2l+1 as value, laid out [P, b, kv, hd]."""
    encoder = PrefixEncoder(LAYERS, KV_HEADS, HEAD_DIM, pre_seq_len=5)
    prefix = torch.randn(3, 5, encoder.kv_size)
    chatglm3 = prefix.view(3, 5, LAYERS * 2, KV_HEADS, HEAD_DIM).permute(2, 1, 0, 3, 4).split(2)
    ours = encoder.split_layers(prefix)
    assert len(ours) == LAYERS
    for (key, value), pair in zip(ours, chatglm3):
        assert key.shape == value.shape == (3, KV_HEADS, 5, HEAD_DIM)
        assert torch.equal(key, pair[0].permute(1, 2, 0, 3))
        assert torch.equal(value, pair[1].permute(1, 2, 0, 3))
    # one element by hand: layer 1, value, kv group 1, prefix position 2, dim 7 of row 0
    flat_index = ((1 * 2 + 1) * KV_HEADS + 1) * HEAD_DIM + 7
    assert ours[1][1][0, 1, 2, 7] == prefix[0, 2, flat_index]


def test_prefix_cache_is_read_only_and_reports_the_prefix_length():
    key, value = torch.randn(2, KV_HEADS, 3, HEAD_DIM), torch.randn(2, KV_HEADS, 3, HEAD_DIM)
    cache = PrefixCache([(key, value)] * LAYERS)
    new = torch.randn(2, KV_HEADS, 4, HEAD_DIM)
    for _ in range(2):  # a replayed layer (gradient checkpointing) sees the same keys
        keys, values = cache.update(new, new, 1)
        assert torch.equal(keys, torch.cat([key, new], dim=-2)) and torch.equal(values, torch.cat([value, new], -2))
    assert cache.get_seq_length() == cache.pre_seq_len == 3
    assert cache.get_mask_sizes(4, 0) == (7, 0)
    with pytest.raises(NotImplementedError, match="read-only"):
        cache.reorder_cache(torch.tensor([1, 0]))


# ---- forward -----------------------------------------------------------------------------------

@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("projection", [False, True])
def test_forward_equals_manual_prefix_computation(projection, attn):
    model = tiny_prefix_model(pre_seq_len=3, prefix_projection=projection, attn=attn).eval()
    ids = random_ids(2, 7)
    mask = torch.tensor([[1] * 7, [1] * 5 + [0] * 2])  # right padding, as in training batches
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits
        expected = reference_logits(model, ids, mask)
        base_logits = model.base_model(ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(logits[real], expected[real], atol=1e-5, rtol=1e-5)
    assert (logits[real] - base_logits[real]).abs().max() > 0.1  # the prefix matters


def test_forward_without_mask_and_with_given_positions():
    model = tiny_prefix_model().eval()
    ids = random_ids(2, 6)
    with torch.no_grad():
        no_mask = model(ids).logits
        ones = model(ids, attention_mask=torch.ones_like(ids)).logits
        given = model(ids, position_ids=torch.arange(6).expand(2, -1)).logits
        shifted = model(ids, position_ids=torch.arange(3, 9).expand(2, -1)).logits
    torch.testing.assert_close(no_mask, reference_logits(model, ids), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(no_mask, ones, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(no_mask, given, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(no_mask, shifted, atol=1e-4)  # positions are used as given


def test_mask_must_cover_the_tokens_only():
    model = tiny_prefix_model()
    ids = random_ids(1, 5)
    with pytest.raises(ValueError, match="prefix positions are added here"):
        model(ids, attention_mask=torch.ones(1, 5 + model.pre_seq_len, dtype=torch.long))


def test_bf16_base_keeps_an_fp32_prefix():
    model = tiny_prefix_model()
    model.base_model.to(torch.bfloat16)
    model = PrefixTuningModel(model.base_model, pre_seq_len=3)
    assert all(p.dtype == torch.float32 for p in model.prefix_encoder.parameters())
    out = model(random_ids(2, 5), labels=random_ids(2, 5))
    assert out.logits.dtype == torch.bfloat16
    out.loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.prefix_encoder.parameters())


# ---- training ----------------------------------------------------------------------------------

def loss_and_prefix_grads(model: PrefixTuningModel, ids, labels, **kwargs):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(123)  # the same prefix dropout in both runs
    loss = model(ids, labels=labels, **kwargs).loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.prefix_encoder.named_parameters()}


@pytest.mark.parametrize("projection", [False, True])
def test_gradient_checkpointing_gives_the_same_loss_and_grads(projection, caplog):
    model = tiny_prefix_model(prefix_projection=projection).train()
    ids, labels = random_ids(2, 9), random_ids(2, 9, seed=6)
    plain_loss, plain_grads = loss_and_prefix_grads(model, ids, labels)

    model.gradient_checkpointing_enable()
    assert model.is_gradient_checkpointing
    layers = model._checkpointed_layers()
    assert layers and all(layer.gradient_checkpointing and layer._can_checkpoint_with_cache for layer in layers)
    with caplog.at_level("WARNING"):
        checkpointed_loss, checkpointed_grads = loss_and_prefix_grads(model, ids, labels)
    assert "Caching is incompatible" not in caplog.text
    assert torch.equal(plain_loss, checkpointed_loss)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(checkpointed_grads[name], grad, atol=1e-7, rtol=1e-6)
        assert grad.abs().sum() > 0

    model.gradient_checkpointing_disable()
    assert not any(layer.gradient_checkpointing for layer in layers)
    assert not any("_can_checkpoint_with_cache" in vars(layer) for layer in layers)


def test_reentrant_checkpointing_is_refused():
    with pytest.raises(ValueError, match="use_reentrant"):
        tiny_prefix_model().gradient_checkpointing_enable({"use_reentrant": True})


def test_num_items_in_batch_reaches_the_loss():
    model = tiny_prefix_model().eval()
    ids, labels = random_ids(2, 6), random_ids(2, 6, seed=7)
    mean_loss = model(ids, labels=labels).loss
    summed_over_20 = model(ids, labels=labels, num_items_in_batch=torch.tensor(20)).loss
    torch.testing.assert_close(summed_over_20, mean_loss * 10 / 20)  # 2 rows x 5 shifted targets


def test_only_the_prefix_trains_and_the_base_stays_bitwise_unchanged():
    model = tiny_prefix_model(pre_seq_len=4, prefix_dropout=0.0).train()
    base_before = {name: p.detach().clone() for name, p in model.base_model.named_parameters()}
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(name.startswith("prefix_encoder.") for name in trainable)

    ids = random_ids(2, 8)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.2)
    losses = []
    for _ in range(8):
        loss = model(ids, labels=ids).loss
        loss.backward()
        assert all(p.grad is None for p in model.base_model.parameters())
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1
    for name, p in model.base_model.named_parameters():
        assert torch.equal(p, base_before[name]), name


def test_hf_trainer_trains_only_the_prefix_with_gradient_checkpointing(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = tiny_prefix_model(pre_seq_len=4)
    base_before = {name: p.detach().clone() for name, p in model.base_model.named_parameters()}
    prefix_before = model.prefix_encoder.embedding.weight.detach().clone()
    ids = random_ids(8, 8)
    dataset = [{"input_ids": row, "attention_mask": torch.ones_like(row), "labels": row} for row in ids]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4,
                             learning_rate=5e-2, use_cpu=True, report_to=[], save_strategy="no",
                             logging_steps=1, activation_checkpointing=True, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=dataset)
    trainer.train()
    assert all(layer.gradient_checkpointing for layer in model._checkpointed_layers())
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert not torch.equal(model.prefix_encoder.embedding.weight, prefix_before)
    for name, p in model.base_model.named_parameters():
        assert torch.equal(p, base_before[name]), name


# ---- generation --------------------------------------------------------------------------------

def manual_greedy(model: PrefixTuningModel, ids: torch.Tensor, steps: int):
    """Recomputes the whole sequence with the prefix at every step; returns (tokens, [logits per step])."""
    step_logits = []
    for _ in range(steps):
        logits = reference_logits(model, ids)[:, -1]
        step_logits.append(logits)
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=-1)
    return ids, step_logits


def generate_greedy(model, ids, steps, **kwargs):
    out = model.generate(ids, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                         return_dict_in_generate=True, output_logits=True, **kwargs)
    return out.sequences, list(out.logits)


@pytest.mark.parametrize("projection", [False, True])
def test_generate_equals_a_full_recompute_greedy_loop(projection):
    model = tiny_prefix_model(pre_seq_len=3, prefix_projection=projection).eval()
    ids = random_ids(1, 6)
    with torch.no_grad():
        expected_tokens, expected_logits = manual_greedy(model, ids, steps=6)
    tokens, logits = generate_greedy(model, ids, 6)
    assert torch.equal(tokens, expected_tokens)
    for step, (got, want) in enumerate(zip(logits, expected_logits)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=f"step {step}")

    base_out = model.base_model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False,
                                         return_dict_in_generate=True, output_logits=True)
    assert (base_out.logits[0] - logits[0]).abs().max() > 0.1  # generation really uses the prefix


def test_generate_a_left_padded_batch_like_each_row_alone():
    model = tiny_prefix_model(pre_seq_len=3).eval()
    long_row, short_row = random_ids(1, 7, seed=8), random_ids(1, 4, seed=9)
    pad = torch.zeros(1, 3, dtype=torch.long)
    batch = torch.cat([long_row, torch.cat([pad, short_row], dim=-1)])
    mask = torch.tensor([[1] * 7, [0] * 3 + [1] * 4])
    tokens, logits = generate_greedy(model, batch, 5, attention_mask=mask)
    for row, ids in enumerate((long_row, short_row)):
        with torch.no_grad():
            expected_tokens, expected_logits = manual_greedy(model, ids, steps=5)
        assert torch.equal(tokens[row, 7:], expected_tokens[0, ids.shape[1]:])
        for got, want in zip(logits, expected_logits):
            torch.testing.assert_close(got[row], want[0], atol=1e-5, rtol=1e-5)


def test_beam_search_and_sampling_run_with_several_sequences_per_prompt():
    model = tiny_prefix_model(pre_seq_len=3).eval()
    ids = random_ids(2, 5)
    beams = model.generate(ids, max_new_tokens=4, min_new_tokens=4, num_beams=2, num_return_sequences=2,
                           do_sample=False)
    assert beams.shape == (4, 9)
    assert torch.equal(beams[:, :5], ids.repeat_interleave(2, dim=0))
    single_beam = model.generate(ids, max_new_tokens=4, min_new_tokens=4, num_beams=2, do_sample=False)
    assert single_beam.shape == (2, 9)
    torch.manual_seed(0)
    samples = model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=True, top_k=20,
                             num_return_sequences=3)
    assert samples.shape == (6, 9)
    assert model.generate(ids, max_new_tokens=3, min_new_tokens=3, do_sample=False).shape == (2, 8)


def test_generate_rejects_what_it_builds_itself():
    model = tiny_prefix_model()
    with pytest.raises(ValueError, match="use_cache=True"):
        model.generate(random_ids(1, 4), max_new_tokens=2, use_cache=False)
    with pytest.raises(ValueError, match="position_ids"):
        model.generate(random_ids(1, 4), max_new_tokens=2, position_ids=torch.arange(4)[None])


# ---- checkpoints -------------------------------------------------------------------------------

@pytest.mark.parametrize("projection", [False, True])
def test_save_and_load_round_trip(tmp_path, projection):
    model = tiny_prefix_model(pre_seq_len=5, prefix_projection=projection,
                              prefix_hidden_size=24 if projection else None, base_model_name_or_path="tiny-base")
    with torch.no_grad():
        model.prefix_encoder.embedding.weight.mul_(1.5)  # "trained"
    model.save_pretrained(str(tmp_path))

    assert sorted(os.listdir(tmp_path)) == ["prefix_config.json", "prefix_encoder.safetensors"]
    with safe_open(str(tmp_path / "prefix_encoder.safetensors"), framework="pt") as f:
        names = set(f.keys())
        assert all(f.get_tensor(name).dtype == torch.float32 for name in names)
    assert names == set(model.prefix_encoder.state_dict())
    saved = json.loads((tmp_path / "prefix_config.json").read_text())
    assert saved == {"format": PREFIX_FORMAT, **model.settings}
    assert model.settings == {"pre_seq_len": 5, "prefix_projection": projection,
                              "prefix_hidden_size": 24 if projection else None, "num_layers": LAYERS,
                              "num_kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "base_model_name_or_path": "tiny-base"}
    assert read_prefix_settings(str(tmp_path)) == {"format": PREFIX_FORMAT, **model.settings}

    loaded = PrefixTuningModel.from_pretrained(tiny_base(), str(tmp_path))
    assert loaded.settings == model.settings and not loaded.training
    assert not any(p.requires_grad for p in loaded.parameters())
    ids = random_ids(2, 6)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model.eval()(ids).logits)
    trainable = PrefixTuningModel.from_pretrained(tiny_base(), str(tmp_path), pre_seq_len=5, trainable=True)
    assert all(p.requires_grad for p in trainable.prefix_encoder.parameters())


def test_save_keeps_fp32_from_a_half_precision_base(tmp_path):
    base = tiny_base().to(torch.float16)
    PrefixTuningModel(base, pre_seq_len=2).save_pretrained(str(tmp_path))
    settings, state = load_prefix_state(str(tmp_path))
    assert settings["pre_seq_len"] == 2 and state["embedding.weight"].dtype == torch.float32


def test_a_state_without_the_frozen_base_loads_strictly():
    """What a DeepSpeed checkpoint of the model holds (the prefix alone) loads with strict=True; the prefix
    itself, or a key of another model, may not be missing or extra."""
    model, trained = tiny_prefix_model(), tiny_prefix_model(seed=3)
    prefix_only = {key: value for key, value in trained.state_dict().items() if key.startswith("prefix_encoder.")}
    model.load_state_dict(prefix_only)
    assert torch.equal(model.prefix_encoder.embedding.weight, trained.prefix_encoder.embedding.weight)
    assert not torch.equal(model.base_model.lm_head.weight, trained.base_model.lm_head.weight)  # the base stays
    with pytest.raises(RuntimeError, match=r"missing keys \['prefix_encoder.embedding.weight'\]"):
        model.load_state_dict({})
    with pytest.raises(RuntimeError, match=r"unexpected keys \['extra'\]"):
        model.load_state_dict({**prefix_only, "extra": torch.zeros(1)})
    model.load_state_dict({}, strict=False)


def test_pre_seq_len_mismatch_names_both_values(tmp_path):
    tiny_prefix_model(pre_seq_len=5).save_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match=r"pre_seq_len 7 was asked for.*pre_seq_len 5"):
        PrefixTuningModel.from_pretrained(tiny_base(), str(tmp_path), pre_seq_len=7)


def test_a_prefix_for_another_model_is_refused(tmp_path):
    tiny_prefix_model().save_pretrained(str(tmp_path))
    torch.manual_seed(0)
    other = GlmForCausalLM(tiny_glm_config(vocab_size=VOCAB, num_layers=3))
    with pytest.raises(ValueError, match="num_layers 2 \\(model: 3\\)"):
        PrefixTuningModel.from_pretrained(other, str(tmp_path))


def test_folders_that_are_not_prefix_checkpoints_get_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_prefix_settings(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="not a P-Tuning checkpoint"):
        read_prefix_settings(str(tmp_path))
    model_dir = tmp_path / "model"
    tiny_base().save_pretrained(str(model_dir))
    with pytest.raises(ValueError, match="no pre_seq_len"):
        read_prefix_settings(str(model_dir))
    half_saved = tmp_path / "half"
    tiny_prefix_model().save_pretrained(str(half_saved))
    (half_saved / "prefix_encoder.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no prefix_encoder.safetensors"):
        read_prefix_settings(str(half_saved))


# ---- the original ChatGLM3 P-Tuning checkpoint ---------------------------------------------------

def original_sized_base() -> GlmForCausalLM:
    """A random Glm with the shared tiny ChatGLM3's attention shape (2 layers, 2 KV groups, head 8)."""
    torch.manual_seed(0)
    return GlmForCausalLM(tiny_glm_config(vocab_size=VOCAB, hidden_size=32, num_heads=4, intermediate_size=64)).eval()


def test_original_chatglm3_checkpoint_loads_with_its_settings():
    ptuning = shared_path("chatglm3-tiny-original", "ptuning")
    settings, state = load_prefix_state(str(ptuning))
    assert settings == {"format": "chatglm3-original", "pre_seq_len": 4, "prefix_projection": False,
                        "prefix_hidden_size": None, "num_layers": 2, "num_kv_heads": 2, "head_dim": 8,
                        "base_model_name_or_path": "tiny-chatglm3-shared"}
    assert {name: tuple(t.shape) for name, t in state.items()} == {"embedding.weight": (4, 64)}

    model = PrefixTuningModel.from_pretrained(original_sized_base(), str(ptuning))
    original = torch.load(ptuning / "pytorch_model.bin", weights_only=True)
    weight = original["transformer.prefix_encoder.embedding.weight"].float()
    assert torch.equal(model.prefix_encoder.embedding.weight, weight)
    key, value = model.prefix_key_values(1)[1]
    assert key.shape == (1, 2, 4, 8)
    assert torch.equal(key[0, 1, 3], weight[3].view(4, 2, 8)[2, 1])  # layer 1 key = block 2, group 1
    assert torch.equal(value[0, 0, 2], weight[2].view(4, 2, 8)[3, 0])  # layer 1 value = block 3, group 0
    with pytest.raises(ValueError, match="pre_seq_len 128 was asked for.*pre_seq_len 4"):
        PrefixTuningModel.from_pretrained(original_sized_base(), str(ptuning), pre_seq_len=128)


def test_original_checkpoint_reproduces_the_original_model_outputs(tmp_path):
    from chatglm3_finetune.model import conversion
    model_dir = shared_path("chatglm3-tiny-original", "model")
    ptuning = shared_path("chatglm3-tiny-original", "ptuning")
    from safetensors.torch import load_file

    reference = load_file(str(shared_path("chatglm3-tiny-original", "reference_outputs.safetensors")))
    converted = conversion.convert_checkpoint(str(model_dir), str(tmp_path / "converted"), dtype="float32")
    base = GlmForCausalLM.from_pretrained(converted, dtype=torch.float32).eval()
    model = PrefixTuningModel.from_pretrained(base, str(ptuning))
    for i in range(2):
        ids = reference[f"prompt{i}.input_ids"]
        with torch.no_grad():
            logits = model(ids).logits[0, -4:]
        torch.testing.assert_close(logits, reference[f"prompt{i}.ptuning_logits"], atol=1e-4, rtol=1e-4)
        new_tokens = model.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1]:]
        assert new_tokens.tolist() == reference[f"prompt{i}.ptuning_greedy8"].tolist()


# ---- DeepSpeed ZeRO-3 --------------------------------------------------------------------------

ZERO3_SCRIPT = textwrap.dedent("""
    import copy, json, os, sys
    import torch
    import deepspeed
    from transformers import GlmForCausalLM
    from chatglm3_finetune.compat import set_deepspeed_master_weights, skip_deepspeed_cpu_shared_memory_op
    from chatglm3_finetune.model.ptuning.prefix_checkpoint import load_prefix_state
    from chatglm3_finetune.model.ptuning.prefix_model import PrefixTuningModel
    from chatglm3_finetune.model.tiny_model import tiny_glm_config

    skip_deepspeed_cpu_shared_memory_op()  # as finetune.py does: nothing to compile
    deepspeed.init_distributed(dist_backend="gloo")
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
              "zero_allow_untested_optimizer": True}
    torch.manual_seed(0)
    model = PrefixTuningModel(GlmForCausalLM(tiny_glm_config(vocab_size=128)), pre_seq_len=3,
                              prefix_projection=True, prefix_dropout=0.0)
    plain = copy.deepcopy(model)
    base_before = {n: p.detach().clone() for n, p in model.base_model.named_parameters()}
    ids = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(1))

    def adamw(m):
        return torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)

    plain_optimizer, plain_losses = adamw(plain), []
    for _ in range(3):
        loss = plain(ids, labels=ids).loss
        loss.backward(); plain_optimizer.step(); plain_optimizer.zero_grad()
        plain_losses.append(loss.item())

    model.gradient_checkpointing_enable()
    engine, *_ = deepspeed.initialize(model=model, optimizer=adamw(model), config=config)
    partitioned = all(p.numel() == 0 for p in model.parameters())
    zero3_losses = []
    for _ in range(3):
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss); engine.step()
        zero3_losses.append(loss.item())
    model.eval()
    generated = model.generate(ids, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    model.save_pretrained(sys.argv[1])
    with torch.no_grad():
        logits_before = model(ids).logits
        with deepspeed.zero.GatheredParameters(list(model.prefix_encoder.parameters()), modifier_rank=0):
            for p in model.prefix_encoder.parameters():
                p.zero_()
        set_deepspeed_master_weights(model.prefix_encoder,
                                     {n: torch.zeros(p.ds_shape) for n, p in model.prefix_encoder.named_parameters()})
        model.load_prefix(sys.argv[1])  # partitioned parameters are filled through a gather
        reloaded_equal = torch.equal(model(ids).logits, logits_before)
    saved_again = model.prefix_state_dict()  # the optimizer's fp32 copy: load_prefix set it too
    reloaded_equal = reloaded_equal and all(torch.equal(saved_again[n], p) for n, p in
                                            load_prefix_state(sys.argv[1])[1].items())
    with deepspeed.zero.GatheredParameters(list(model.base_model.parameters())):
        base_unchanged = all(torch.equal(p, base_before[n]) for n, p in model.base_model.named_parameters())
    print("RESULT " + json.dumps({"partitioned": partitioned, "plain": plain_losses, "zero3": zero3_losses,
                                  "base_unchanged": base_unchanged, "reloaded_equal": reloaded_equal,
                                  "generated": list(generated.shape)}))
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_zero3_trains_generates_and_saves_the_prefix(tmp_path):
    pytest.importorskip("deepspeed")
    script = tmp_path / "zero3_prefix.py"
    script.write_text(ZERO3_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}
    run = subprocess.run([sys.executable, str(script), str(tmp_path / "saved")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    assert run.returncode == 0 and lines, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT "):])
    assert result["partitioned"] and result["base_unchanged"] and result["reloaded_equal"]
    assert result["generated"] == [2, 10]
    assert result["zero3"] == pytest.approx(result["plain"], abs=1e-5)
    assert result["zero3"][-1] < result["zero3"][0]

    # the gathered prefix is the trained one: reloading gives a model of the same settings and weights
    settings, state = load_prefix_state(str(tmp_path / "saved"))
    assert settings["prefix_projection"] and state["embedding.weight"].shape == (3, LAYERS * 2 * KV_HEADS * HEAD_DIM)
    assert state["trans.0.weight"].shape == (64, LAYERS * 2 * KV_HEADS * HEAD_DIM)


def test_continuing_an_original_prefix_records_the_base_trained_on(tmp_path):
    """finetune.py --ptuning_checkpoint ORIGINAL: the saved prefix names the base it was trained on
    (so inference.py --pt-checkpoint finds it without --model), not the original's own _name_or_path;
    its weights are saved with the umask's permissions, not safetensors' 0600."""
    from types import SimpleNamespace

    from chatglm3_finetune.train.file_modes import current_umask
    from chatglm3_finetune.model.loading import add_prefix_tuning

    ptuning = shared_path("chatglm3-tiny-original", "ptuning")
    original_name = read_prefix_settings(str(ptuning))["base_model_name_or_path"]
    base_path = str(tmp_path / "my-converted-base")
    assert original_name != base_path
    model_args = SimpleNamespace(ptuning_checkpoint=str(ptuning), pre_seq_len=None, prefix_dropout=0.0)
    model = add_prefix_tuning(original_sized_base(), model_args, base_path)
    model.save_pretrained(str(tmp_path / "continued"))
    assert read_prefix_settings(str(tmp_path / "continued"))["base_model_name_or_path"] == base_path
    mode = os.stat(tmp_path / "continued" / "prefix_encoder.safetensors").st_mode & 0o777
    assert mode == 0o666 & ~current_umask()
