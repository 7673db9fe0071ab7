"""Packed rows must train exactly like the same records one by one, and never let records meet."""

import pytest
import torch
from transformers import GlmForCausalLM

from chatglm3_finetune.collation import PackedCollator, packed_attention_mask
from chatglm3_finetune.packing import pack_features, seq_lens_from_position_ids
from chatglm3_finetune.supervised_loss import attention_mask_for, count_targets, supervised_lm_loss
from chatglm3_finetune.tiny_model import tiny_glm_config

VOCAB = 512
MIN = torch.finfo(torch.float32).min


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


def test_packed_attention_mask_values():
    # One row: a record of 2 tokens, a record of 1, one padding position.
    assert packed_attention_mask([[2, 1]], 4, torch.bool)[0, 0].int().tolist() == [
        [1, 0, 0, 0],
        [1, 1, 0, 0],
        [0, 0, 1, 0],
        [0, 0, 0, 1],  # padding sees only itself: never an all-masked (NaN) row
    ]
    additive = packed_attention_mask([[2, 1], [3]], 4, torch.float32)
    assert additive.shape == (2, 1, 4, 4) and additive.dtype == torch.float32
    assert additive[0, 0].tolist() == [[0, MIN, MIN, MIN], [0, 0, MIN, MIN], [MIN, MIN, 0, MIN], [MIN, MIN, MIN, 0]]
    assert additive[1, 0, 2].tolist() == [0, 0, 0, MIN]


def test_packed_attention_mask_with_a_prefix_every_record_sees():
    mask = packed_attention_mask([[2, 1], [1]], 4, torch.bool, prefix_len=3)
    assert mask.shape == (2, 1, 4, 3 + 4)
    assert mask[0, 0].int().tolist() == [
        [1, 1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 1, 0, 0],
        [1, 1, 1, 0, 0, 1, 0],
        [0, 0, 0, 0, 0, 0, 1],
    ]
    assert mask[1, 0, :, :3].int().tolist() == [[1, 1, 1], [0, 0, 0], [0, 0, 0], [0, 0, 0]]
    additive = packed_attention_mask([[2, 1], [1]], 4, torch.bfloat16, prefix_len=3)
    assert additive.dtype == torch.bfloat16
    assert torch.equal(additive == 0, mask)
    with pytest.raises(ValueError, match="more than the mask length"):
        packed_attention_mask([[3, 2]], 4)


def test_attention_mask_for_gives_eager_an_additive_mask_and_sdpa_a_boolean_one():
    allowed = packed_attention_mask([[2, 1]], 4)
    assert allowed.dtype == torch.bool
    eager = attention_mask_for("eager", allowed, torch.bfloat16)
    assert eager.dtype == torch.bfloat16
    assert torch.equal(eager == 0, allowed) and (eager[~allowed] == torch.finfo(torch.bfloat16).min).all()
    assert torch.equal(attention_mask_for("sdpa", eager, torch.bfloat16), allowed)
    assert attention_mask_for("sdpa", allowed, torch.float32) is allowed


def test_collator_pads_rows_and_derives_missing_seq_lens():
    rows = pack_features([record([5, 6, 7], [-100, 6, 7]), record([8, 9], [-100, 9])], max_length=3)
    del rows[1]["seq_lens"]
    batch = PackedCollator(pad_token_id=0, pad_to_multiple_of=4)(rows)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0], [8, 9, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100], [-100, 9, -100, -100]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0], [0, 1, 0, 1]]
    assert torch.equal(batch["attention_mask"], packed_attention_mask([[3], [2]], 4))

    flat = PackedCollator(padding_free=True)(rows)
    assert flat["input_ids"].tolist() == [[5, 6, 7, 8, 9]] and flat["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert flat["cu_seq_lens_q"].tolist() == [0, 3, 5] and flat["max_length_q"] == 3
    assert "attention_mask" not in flat


def test_collator_takes_plain_records_as_rows_of_one():
    plain = [record([5, 6, 7], [5, 6, 7]), record([8, 9], [-100, 9])]
    batch = PackedCollator()(plain)
    assert batch["labels"].tolist() == [[-100, 6, 7], [-100, 9, -100]]
    assert batch["position_ids"].tolist() == [[0, 1, 2], [0, 1, 0]]
    assert torch.equal(batch["attention_mask"], packed_attention_mask([[3], [2]], 3))
    flat = PackedCollator(padding_free=True)(plain)
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


@pytest.mark.parametrize("padding_free", [False, True])
def test_packed_loss_and_grads_equal_the_records_unpacked(model, padding_free):
    records = random_records(9, seed=6)
    expected_loss, expected_grads = unpacked_loss_and_grads(model, records)

    batch = PackedCollator(pad_to_multiple_of=8, padding_free=padding_free)(pack_features(records, max_length=24))
    model.zero_grad(set_to_none=True)
    loss, num_targets = supervised_lm_loss(model, batch.pop("labels"), chunk_size=16, **batch)
    loss.backward()
    assert num_targets == sum(count_targets(r["labels"]) for r in records)
    assert loss.item() == pytest.approx(expected_loss, rel=1e-5)
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(parameter.grad, expected_grads[name], rtol=1e-5, atol=1e-6, msg=name)


def test_records_never_see_each_other_and_padding_stays_finite(model):
    records = [record([10, 11, 12, 13], [-100] * 4), record([20, 21, 22], [-100] * 3), record([30, 31], [-100] * 2)]
    rows = pack_features(records, max_length=9)
    assert rows[0]["seq_lens"] == [4, 3, 2]
    perturbed = [{**rows[0], "input_ids": rows[0]["input_ids"][:4] + [40, 41, 42] + rows[0]["input_ids"][7:]}]
    # Straight into the model: eager attention ADDS the mask, so it takes the float mask only.
    mask_dtypes = [torch.float32] + ([torch.bool] if model.config._attn_implementation == "sdpa" else [])
    for mask_dtype in mask_dtypes:
        collate = PackedCollator(pad_to_multiple_of=16, mask_dtype=mask_dtype)
        with torch.no_grad():
            logits = model(**{k: v for k, v in collate(rows).items() if k != "labels"}).logits
            changed = model(**{k: v for k, v in collate(perturbed).items() if k != "labels"}).logits
        assert torch.isfinite(logits).all()  # padding rows included
        torch.testing.assert_close(changed[0, :4], logits[0, :4], rtol=0, atol=1e-6)
        torch.testing.assert_close(changed[0, 7:9], logits[0, 7:9], rtol=0, atol=1e-6)
        assert not torch.allclose(changed[0, 4:7], logits[0, 4:7])


def test_half_precision_mask_keeps_padding_finite():
    torch.manual_seed(0)
    glm = GlmForCausalLM(tiny_glm_config(VOCAB)).to(torch.bfloat16)
    glm.set_attn_implementation("eager")
    rows = pack_features([record([10, 11, 12], [-100] * 3), record([20, 21], [-100] * 2)], max_length=8)
    batch = PackedCollator(pad_to_multiple_of=8, mask_dtype=torch.bfloat16)(rows)
    with torch.no_grad():
        logits = glm(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                     attention_mask=batch["attention_mask"]).logits
    assert torch.isfinite(logits).all()
