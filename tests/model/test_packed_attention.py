"""packed_sdpa: padding-free packed rows train exactly like their records alone (P-Tuning prefix
included), records never meet, and batches with a mask behave as under plain sdpa."""

import pytest
import torch
from transformers import GlmForCausalLM

from chatglm3_finetune.model.packed_attention import PACKED_SDPA, use_packed_sdpa
from chatglm3_finetune.data.collation import PackedCollator
from chatglm3_finetune.data.packing import pack_features
from chatglm3_finetune.model.ptuning.prefix_model import PrefixTuningModel
from chatglm3_finetune.train.supervised_loss import count_targets, supervised_lm_loss
from chatglm3_finetune.model.tiny_model import tiny_glm_config
from test_packing import VOCAB, random_records, record, unpacked_loss_and_grads


def tiny_glm(attn: str, seed: int = 0) -> GlmForCausalLM:
    torch.manual_seed(seed)
    glm = GlmForCausalLM(tiny_glm_config(VOCAB)).float().train()
    glm.set_attn_implementation(use_packed_sdpa() if attn == PACKED_SDPA else attn)
    return glm


def packed_loss_and_grads(model, records, max_length=24, checkpointing=False):
    batch = PackedCollator()(pack_features(records, max_length=max_length))
    assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch
    model.zero_grad(set_to_none=True)
    loss, num_targets = supervised_lm_loss(model, batch.pop("labels"), chunk_size=16, **batch)
    loss.backward()
    assert num_targets == sum(count_targets(r["labels"]) for r in records)
    return loss.item(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("checkpointing", [False, True])
def test_padding_free_rows_equal_the_records_alone(checkpointing):
    records = random_records(9, seed=6)
    reference = tiny_glm("sdpa")
    expected_loss, expected_grads = unpacked_loss_and_grads(reference, records)
    model = tiny_glm(PACKED_SDPA)
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    loss, grads = packed_loss_and_grads(model, records)
    assert loss == pytest.approx(expected_loss, rel=1e-5)
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-5, atol=1e-6, msg=name)


def prefix_model(attn: str) -> PrefixTuningModel:
    model = PrefixTuningModel(tiny_glm(attn), pre_seq_len=3, prefix_dropout=0.0).train()
    torch.manual_seed(1)
    torch.nn.init.normal_(model.prefix_encoder.embedding.weight)  # a prefix that matters to every record
    model.supervised_loss = True
    return model


def test_every_packed_record_sees_the_whole_prefix():
    records = random_records(7, seed=8)
    total = sum(count_targets(r["labels"]) for r in records)
    reference = prefix_model("sdpa")
    expected_loss = 0.0
    for r in records:  # one record at a time through the plain sdpa prefix model
        out = reference(input_ids=torch.tensor([r["input_ids"]]), labels=torch.tensor([[-100, *r["labels"][1:]]]),
                        attention_mask=torch.ones(1, len(r["input_ids"]), dtype=torch.long), num_items_in_batch=total)
        out.loss.backward()
        expected_loss += out.loss.item()
    expected_grad = reference.prefix_encoder.embedding.weight.grad

    model = prefix_model(PACKED_SDPA)
    batch = PackedCollator()(pack_features(records, max_length=30))
    loss = model(**batch).loss
    loss.backward()
    assert loss.item() == pytest.approx(expected_loss, rel=1e-5)
    torch.testing.assert_close(model.prefix_encoder.embedding.weight.grad, expected_grad, rtol=1e-5, atol=1e-6)
    assert expected_grad.abs().sum() > 0


def test_records_in_one_padding_free_row_never_see_each_other():
    model = tiny_glm(PACKED_SDPA).eval()
    rows = pack_features([record([10, 11, 12, 13], [-100] * 4), record([20, 21, 22], [-100] * 3),
                          record([30, 31], [-100] * 2)], max_length=9)
    perturbed = [{**rows[0], "input_ids": rows[0]["input_ids"][:4] + [40, 41, 42] + rows[0]["input_ids"][7:]}]
    collate = PackedCollator()
    with torch.no_grad():
        logits = model(**{k: v for k, v in collate(rows).items() if k != "labels"}).logits
        changed = model(**{k: v for k, v in collate(perturbed).items() if k != "labels"}).logits
    torch.testing.assert_close(changed[0, :4], logits[0, :4], rtol=0, atol=1e-6)
    torch.testing.assert_close(changed[0, 7:], logits[0, 7:], rtol=0, atol=1e-6)
    assert not torch.allclose(changed[0, 4:7], logits[0, 4:7])


def test_masked_batches_and_generation_match_plain_sdpa():
    sdpa, packed = tiny_glm("sdpa").eval(), tiny_glm(PACKED_SDPA).eval()
    input_ids = torch.tensor([[5, 6, 7, 8, 9], [0, 0, 11, 12, 13]])
    attention_mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    with torch.no_grad():
        for mask in (attention_mask, None):
            torch.testing.assert_close(packed(input_ids=input_ids, attention_mask=mask).logits,
                                       sdpa(input_ids=input_ids, attention_mask=mask).logits)
    options = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(packed.generate(input_ids=input_ids, attention_mask=attention_mask, **options),
                       sdpa.generate(input_ids=input_ids, attention_mask=attention_mask, **options))


def test_a_padding_free_row_is_one_row():
    model = tiny_glm(PACKED_SDPA)
    with pytest.raises(ValueError, match="does not cover the 5 tokens"):
        model(input_ids=torch.tensor([[5, 6, 7, 8, 9]]), position_ids=torch.tensor([[0, 1, 2, 0, 1]]),
              cu_seq_lens_q=torch.tensor([0, 3, 4], dtype=torch.int32))
