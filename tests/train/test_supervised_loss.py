"""supervised_lm_loss must equal GlmForCausalLM's own loss, gradients included (fp32, tight)."""

import pytest
import torch
from transformers import DynamicCache, GlmForCausalLM

from chatglm3_finetune.train.supervised_loss import count_targets, supervised_lm_loss
from chatglm3_finetune.model.tiny_model import tiny_glm_config

VOCAB = 512


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GlmForCausalLM(tiny_glm_config(VOCAB)).float().train()


def padded_batch(records):
    """Right-padded input_ids / labels / 2D attention_mask from (input_ids, labels) pairs."""
    length = max(len(ids) for ids, _ in records)
    input_ids = torch.zeros(len(records), length, dtype=torch.long)
    labels = torch.full((len(records), length), -100, dtype=torch.long)
    attention_mask = torch.zeros(len(records), length, dtype=torch.long)
    for row, (ids, labs) in enumerate(records):
        input_ids[row, :len(ids)] = torch.tensor(ids)
        labels[row, :len(labs)] = torch.tensor(labs)
        attention_mask[row, :len(ids)] = 1
    return input_ids, labels, attention_mask


def random_records(count, seed, min_len=6, max_len=20):
    """Records shaped like chat data: an unsupervised prompt, then supervised response tokens."""
    generator = torch.Generator().manual_seed(seed)
    records = []
    for _ in range(count):
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=generator))
        ids = torch.randint(3, VOCAB, (length,), generator=generator).tolist()
        prompt = int(torch.randint(1, length - 1, (1,), generator=generator))
        records.append((ids, [-100] * prompt + ids[prompt:]))
    return records


def loss_and_grads(model, compute):
    model.zero_grad(set_to_none=True)
    loss = compute()
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def assert_grads_close(actual, expected):
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-5, atol=1e-7, msg=name)


def test_count_targets_skips_label_zero_and_ignored():
    labels = [[5, -100, 7, 8], [-100, -100, -100], [9, 10]]
    assert count_targets(labels) == 2 + 0 + 1
    assert count_targets(torch.tensor([[5, -100, 7, 8]])) == 2
    assert count_targets([5, -100, 7, 8]) == 2
    assert count_targets([]) == 0


@pytest.mark.parametrize("num_items_in_batch", [None, 57, torch.tensor(57.0)])
@pytest.mark.parametrize("chunk_size,checkpoint_chunks", [(5, True), (5, False), (4096, True)])
def test_loss_and_grads_equal_full_computation(model, num_items_in_batch, chunk_size, checkpoint_chunks):
    records = random_records(3, seed=1)
    records.append((records[0][0][:9], [-100] * 9))  # a row without any target
    input_ids, labels, attention_mask = padded_batch(records)
    assert count_targets(labels) > chunk_size or chunk_size == 4096
    extra = {} if num_items_in_batch is None else {"num_items_in_batch": num_items_in_batch}

    expected_loss, expected_grads = loss_and_grads(model, lambda: model(
        input_ids=input_ids, attention_mask=attention_mask, labels=labels, **extra).loss)
    results = {}

    def ours():
        loss, results["num_targets"] = supervised_lm_loss(
            model, labels, input_ids=input_ids, attention_mask=attention_mask,
            chunk_size=chunk_size, checkpoint_chunks=checkpoint_chunks, **extra)
        return loss

    loss, grads = loss_and_grads(model, ours)
    assert results["num_targets"] == count_targets(labels)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-6, atol=0)
    assert_grads_close(grads, expected_grads)


@pytest.mark.parametrize("num_items_in_batch", [None, 10])
def test_batch_without_targets_gives_zero_loss_and_zero_grads(model, num_items_in_batch):
    input_ids, labels, attention_mask = padded_batch([([4, 5, 6, 7], [-100] * 4), ([8, 9], [-100, -100])])
    loss, num_targets = supervised_lm_loss(model, labels, num_items_in_batch, input_ids=input_ids,
                                           attention_mask=attention_mask)
    assert num_targets == 0 and loss.item() == 0.0 and loss.requires_grad
    model.zero_grad(set_to_none=True)
    loss.backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, name
        assert not parameter.grad.any(), name


def test_gradient_accumulation_weights_every_target_equally(model):
    """4 micro-batches of 2, each divided by the total target count, add up to one batch of 8."""
    records = random_records(8, seed=2)
    full_batch = padded_batch(records)
    total_targets = count_targets(full_batch[1])

    def one_batch():
        input_ids, labels, attention_mask = full_batch
        return supervised_lm_loss(model, labels, input_ids=input_ids, attention_mask=attention_mask)[0]

    expected_loss, expected_grads = loss_and_grads(model, one_batch)

    model.zero_grad(set_to_none=True)
    accumulated_loss = 0.0
    for start in range(0, 8, 2):
        input_ids, labels, attention_mask = padded_batch(records[start:start + 2])
        loss, _ = supervised_lm_loss(model, labels, num_items_in_batch=total_targets, input_ids=input_ids,
                                     attention_mask=attention_mask, chunk_size=7)
        loss.backward()
        accumulated_loss += loss.item()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    assert accumulated_loss == pytest.approx(expected_loss.item(), rel=1e-6)
    assert_grads_close(grads, expected_grads)


def test_passes_cache_mask_and_positions_through(model):
    """A key/value prefix in `cache` (as P-Tuning passes it) reaches the decoder like in the full model."""
    prefix_ids = torch.tensor([[11, 12, 13], [14, 15, 16]])

    def prefix_cache():
        with torch.no_grad():
            return model(input_ids=prefix_ids, use_cache=True).cache

    records = random_records(2, seed=3)
    input_ids, labels, attention_mask = padded_batch(records)
    extended_mask = torch.cat([torch.ones(2, 3, dtype=torch.long), attention_mask], dim=1)
    position_ids = torch.arange(input_ids.shape[1]).expand(2, -1)
    inputs = dict(input_ids=input_ids, attention_mask=extended_mask, position_ids=position_ids)

    expected_loss, expected_grads = loss_and_grads(
        model, lambda: model(**inputs, cache=prefix_cache(), labels=labels).loss)
    loss, grads = loss_and_grads(
        model, lambda: supervised_lm_loss(model, labels, cache=prefix_cache(), chunk_size=3, **inputs)[0])
    assert isinstance(prefix_cache(), DynamicCache)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-6, atol=0)
    assert_grads_close(grads, expected_grads)


def test_works_without_grad_and_rejects_a_model_without_lm_head(model):
    input_ids, labels, attention_mask = padded_batch(random_records(2, seed=4))
    with torch.no_grad():
        loss, _ = supervised_lm_loss(model, labels, input_ids=input_ids, attention_mask=attention_mask, chunk_size=2)
        expected = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)
    with pytest.raises(TypeError, match="needs a causal LM"):
        supervised_lm_loss(model.model, labels, input_ids=input_ids)


ZERO3_CHECK = r'''
import copy, json, sys
import torch, deepspeed
from deepspeed.utils import safe_get_full_grad
from transformers import GlmForCausalLM
from chatglm3_finetune.compat import skip_deepspeed_cpu_shared_memory_op
from chatglm3_finetune.train.supervised_loss import supervised_lm_loss
from chatglm3_finetune.model.tiny_model import tiny_glm_config
skip_deepspeed_cpu_shared_memory_op()  # as finetune.py does: nothing to compile

torch.manual_seed(0)
reference = GlmForCausalLM(tiny_glm_config(512)).float()
model = copy.deepcopy(reference)
input_ids = torch.randint(3, 512, (2, 24))
labels = input_ids.clone()
labels[:, :10] = -100
labels[1, :20] = -100
config = {"train_micro_batch_size_per_gpu": 2, "zero_allow_untested_optimizer": True,
          "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0), config=config)
loss, _ = supervised_lm_loss(engine.module, labels, input_ids=input_ids, chunk_size=5)
engine.backward(loss)
expected = reference(input_ids=input_ids, labels=labels).loss
expected.backward()
print(json.dumps({
    "lm_head_local_numel": engine.module.lm_head.weight.numel(),
    "loss": loss.item(), "expected": expected.item(),
    "worst_grad_diff": max((safe_get_full_grad(p) - r.grad).abs().max().item()
                           for p, r in zip(engine.module.parameters(), reference.parameters())),
}))
'''


@pytest.mark.slow
def test_zero3_partitioned_model_gives_the_same_loss_and_grads(tmp_path):
    """Under ZeRO-3 the weights are empty placeholders: only submodule calls may touch them."""
    import json
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("deepspeed")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "PYTHONPATH": str(root)}
    done = subprocess.run([sys.executable, "-c", ZERO3_CHECK], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["lm_head_local_numel"] == 0  # really partitioned
    assert result["loss"] == pytest.approx(result["expected"], rel=1e-6)
    assert result["worst_grad_diff"] < 1e-6
