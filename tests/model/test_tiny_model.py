"""tiny_model: the short causal-LM pretraining that gives the tiny demo/test model some knowledge."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, GlmForCausalLM

from chatglm3_finetune.format.tokenizer import load_tokenizer
from chatglm3_finetune.model.tiny_model import (BUILTIN_CORPUS, PRETRAINING_FILE, build_tiny_model, lm_loss, pretrain_tiny_model,
                        read_pretraining, tiny_glm_config, token_stream)

SMALL = {"hidden_size": 32, "num_layers": 2, "intermediate_size": 64}
SHORT_RUN = {"seq_len": 64, "batch_size": 4, "lr": 1e-2}


def random_model(tokenizer, seed=0):
    torch.manual_seed(seed)
    return GlmForCausalLM(tiny_glm_config(len(tokenizer), **SMALL))


def test_token_stream_is_each_plain_text_then_eos(tiny_tokenizer):
    stream = token_stream(tiny_tokenizer, ["Hello! How can I help you today?", "你好"])
    first, second = tiny_tokenizer.encode_text("Hello! How can I help you today?"), tiny_tokenizer.encode_text("你好")
    assert stream == first + [2] + second + [2]
    assert not any(i >= tiny_tokenizer.num_pieces for i in stream), "plain text: no role or [gMASK] tokens"


def test_pretraining_lowers_the_lm_loss_and_is_deterministic(tiny_tokenizer):
    threads = torch.get_num_threads()
    models = [random_model(tiny_tokenizer) for _ in range(3)]
    results = [pretrain_tiny_model(model, tiny_tokenizer, BUILTIN_CORPUS, steps=30, seed=seed, **SHORT_RUN)
               for model, seed in zip(models, (0, 0, 1))]

    first, again, other_seed = results
    assert first["steps"] == 30 and first["tokens"] == len(token_stream(tiny_tokenizer, BUILTIN_CORPUS))
    assert first["loss_before"] > 6.0  # ~ln(609): near uniform
    assert first["loss_after"] < first["loss_before"] - 1.5
    assert first["loss_after"] == pytest.approx(lm_loss(models[0], token_stream(tiny_tokenizer, BUILTIN_CORPUS), 64))
    assert first == again
    a, b, c = (model.state_dict() for model in models)
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert not all(torch.equal(a[name], c[name]) for name in a), "the seed picks the batches"
    assert other_seed["loss_after"] < first["loss_before"] - 1.5
    assert torch.get_num_threads() == threads


def test_zero_steps_leaves_the_model_alone(tiny_tokenizer):
    model = random_model(tiny_tokenizer)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    result = pretrain_tiny_model(model, tiny_tokenizer, BUILTIN_CORPUS, steps=0, **SHORT_RUN)
    assert result["steps"] == 0 and result["loss_after"] == result["loss_before"]
    assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())


def test_too_little_text_for_a_window_is_a_clear_error(tiny_tokenizer):
    with pytest.raises(ValueError, match="fewer than seq_len 512: give more text or a smaller seq_len"):
        pretrain_tiny_model(random_model(tiny_tokenizer), tiny_tokenizer, ["short"], steps=1, seq_len=512)


def test_built_pretrained_model_loads_with_auto_model_and_records_its_pretraining(tmp_path):
    folder = str(tmp_path / "tiny")
    build_tiny_model(folder, seed=2, pretrain_steps=20, pretrain_kwargs=SHORT_RUN, **SMALL)
    pretrained = AutoModelForCausalLM.from_pretrained(folder)
    assert type(pretrained).__name__ == "GlmForCausalLM" and pretrained.config.hidden_size == 32

    record = read_pretraining(folder)
    assert record["steps"] == 20 and record["seed"] == 2 and record["seq_len"] == 64
    assert record["loss_after"] < record["loss_before"] - 1.0
    with open(tmp_path / "tiny" / PRETRAINING_FILE, encoding="utf-8") as f:
        assert json.load(f) == record
    # The saved weights are the pretrained ones: same LM loss as recorded.
    stream = token_stream(load_tokenizer(folder), BUILTIN_CORPUS)
    assert lm_loss(pretrained, stream, 64) == pytest.approx(record["loss_after"], abs=1e-5)

    # Rebuilding the folder with random weights drops the stale record.
    build_tiny_model(folder, seed=2, **SMALL)
    assert read_pretraining(folder) is None
    random_weights = AutoModelForCausalLM.from_pretrained(folder)
    assert lm_loss(random_weights, stream, 64) == pytest.approx(record["loss_before"], abs=1e-5)
