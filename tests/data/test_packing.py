"""Packed rows must train exactly like the same records one by one, and never let records meet."""

import pytest
import torch
from transformers import GlmForCausalLM

from chatglm3_finetune.data.collation import PackedCollator
from chatglm3_finetune.data.packing import pack_features, seq_lens_from_position_ids
from chatglm3_finetune.train.supervised_loss import count_targets, supervised_lm_loss
from chatglm3_finetune.model.tiny_model import tiny_glm_config

VOCAB = 512


def record(ids, labels):
    return {"input_ids": list(ids), "labels": list(labels)}


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def model(request):
    torch.manual_seed(0)
    glm = GlmForCausalLM(tiny_glm_config(VOCAB)).float().train()
    glm.set_attn_implementation(request.param)
    return glm


def random_records(count, seed, min_len=3, max_len=14):
    generator = torch.Generator().manual_seed(seed)
    records = []
    for _ in range(count):
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=generator))
        ids = torch.randint(3, VOCAB, (length,), generator=generator).tolist()
        prompt = int(torch.randint(1, length, (1,), generator=generator))
        records.append(record(ids, [-100] * prompt + ids[prompt:]))
    return records


def test_pack_features_golden_rows():
    records = [
        record([1, 2, 3], [-100, 2, 3]),
        record([4, 5, 6, 7, 8], [4, 5, 6, 7, 8]),  # its label 0 would cross a boundary: masked
        record([9, 10], [-100, 10]),
        record([11, 12, 13, 14], [-100, -100, 13, 14]),
    ]
    # Best-fit decreasing: 5 opens row 0, 4 does not fit its 3 free slots and opens row 1,
    # 3 fills row 0 exactly, 2 goes to row 1.
    assert pack_features(records, max_length=8) == [
        {"input_ids": [4, 5, 6, 7, 8, 1, 2, 3], "labels": [-100, 5, 6, 7, 8, -100, 2, 3],
         "position_ids": [0, 1, 2, 3, 4, 0, 1, 2], "seq_lens": [5, 3]},
        {"input_ids": [11, 12, 13, 14, 9, 10], "labels": [-100, -100, 13, 14, -100, 10],
         "position_ids": [0, 1, 2, 3, 0, 1], "seq_lens": [4, 2]},
    ]


def test_pack_features_keeps_every_record_whole_and_is_deterministic():
    records = random_records(60, seed=5, min_len=2, max_len=30)
    rows = pack_features(records, max_length=32)
    assert rows == pack_features(records, max_length=32)
    assert all(len(row["input_ids"]) <= 32 for row in rows)
    assert sum(len(row["seq_lens"]) for row in rows) == len(records)
    pieces = sorted(tuple(row["input_ids"][start:start + n]) for row in rows
                    for start, n in zip([0, *torch.tensor(row["seq_lens"]).cumsum(0).tolist()], row["seq_lens"]))
    assert pieces == sorted(tuple(r["input_ids"]) for r in records)
    assert sum(count_targets(row["labels"]) for row in rows) == sum(count_targets(r["labels"]) for r in records)
    assert sum(len(row["input_ids"]) for row in rows) / (32 * len(rows)) > 0.9


def test_pack_features_rejects_records_it_would_have_to_cut():
    with pytest.raises(ValueError, match="record 1 has 5 tokens, more than max_length=4"):
        pack_features([record([1], [-100]), record([1, 2, 3, 4, 5], [-100] * 5)], max_length=4)
    with pytest.raises(ValueError, match="record 0: 1 labels for 2 input_ids"):
        pack_features([record([1, 2], [-100])], max_length=4)


def test_positions_restart_per_record_and_lengths_come_back_from_them():
    row = pack_features([record([7] * 4, [-100] * 4), record([8] * 3, [-100] * 3), record([9], [-100])], 10)[0]
    assert row["position_ids"] == [0, 1, 2, 3, 0, 1, 2, 0]
    assert seq_lens_from_position_ids(row["position_ids"]) == row["seq_lens"] == [4, 3, 1]


def test_collator_makes_one_row_and_derives_missing_seq_lens():
    rows = pack_features([record([5, 6, 7], [-100, 6, 7]), record([8, 9], [-100, 9])], max_length=3)
    del rows[1]["seq_lens"]
    flat = PackedCollator()(rows)
    assert flat["input_ids"].tolist() == [[5, 6, 7, 8, 9]] and flat["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert flat["cu_seq_lens_q"].tolist() == [0, 3, 5] and flat["max_length_q"] == 3
    assert "attention_mask" not in flat


def test_collator_takes_plain_records_as_rows_of_one():
    plain = [record([5, 6, 7], [5, 6, 7]), record([8, 9], [-100, 9])]
    flat = PackedCollator()(plain)
    assert flat["labels"].tolist() == [[-100, 6, 7, -100, 9]] and flat["cu_seq_lens_k"].tolist() == [0, 3, 5]


def unpacked_loss_and_grads(model, records):
    """Token-weighted loss of the records run one at a time (HF's own loss), and its gradients."""
    total_targets = sum(count_targets(r["labels"]) for r in records)
    model.zero_grad(set_to_none=True)
    total_loss = 0.0
    for r in records:
        labels = torch.tensor([[-100, *r["labels"][1:]]])
        loss = model(input_ids=torch.tensor([r["input_ids"]]), labels=labels, num_items_in_batch=total_targets).loss
        loss.backward()
        total_loss += loss.item()
    return total_loss, {name: p.grad.clone() for name, p in model.named_parameters()}


def test_packed_loss_and_grads_equal_the_records_unpacked(model):
    records = random_records(9, seed=6)
    expected_loss, expected_grads = unpacked_loss_and_grads(model, records)

    batch = PackedCollator()(pack_features(records, max_length=24))
    model.zero_grad(set_to_none=True)
    loss, num_targets = supervised_lm_loss(model, batch.pop("labels"), chunk_size=16, **batch)
    loss.backward()
    assert num_targets == sum(count_targets(r["labels"]) for r in records)
    assert loss.item() == pytest.approx(expected_loss, rel=1e-5)
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(parameter.grad, expected_grads[name], rtol=1e-5, atol=1e-6, msg=name)
