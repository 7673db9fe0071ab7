"""The supervised-positions loss and packing as training uses them: inside the models' forward."""

import torch
from transformers import GlmForCausalLM

from chatglm3_finetune.train.loss_switch import use_supervised_loss
from chatglm3_finetune.data.packing import pack_features
from chatglm3_finetune.model.packed_attention import use_packed_sdpa
from chatglm3_finetune.model.ptuning.prefix_model import PrefixTuningModel
from chatglm3_finetune.data.collation import DataCollatorForChatGLM, PackedCollator
from chatglm3_finetune.model.tiny_model import tiny_glm_config

X = -100


def records(vocab=96, lengths=(9, 14, 6), seed=0):
    generator = torch.Generator().manual_seed(seed)
    out = []
    for length in lengths:
        ids = torch.randint(3, vocab, (length,), generator=generator).tolist()
        labels = [X] * (length // 2) + ids[length // 2:]
        out.append({"input_ids": ids, "labels": labels})
    return out


def tiny_glm(seed=0):
    torch.manual_seed(seed)
    return GlmForCausalLM(tiny_glm_config(96, hidden_size=32, num_layers=2)).float()


def targets(batch):
    return int((batch["labels"][:, 1:] != X).sum())


def test_full_model_training_forward_matches_the_full_logits_loss():
    features = records()
    batch = DataCollatorForChatGLM()(features)
    reference, patched = tiny_glm(), use_supervised_loss(tiny_glm())
    reference.train()
    patched.train()
    expected = reference(**batch, num_items_in_batch=targets(batch)).loss
    loss = patched(**batch, num_items_in_batch=targets(batch)).loss
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    expected.backward()
    loss.backward()
    for (name, p), q in zip(reference.named_parameters(), patched.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)
    patched.eval()
    assert patched(**batch).logits.shape == (3, 14, 96)  # evaluation keeps the normal output


def test_prefix_model_packed_batch_equals_unpacked():
    features = records()
    unpacked = DataCollatorForChatGLM()(features)
    packed = PackedCollator()(pack_features(features, max_length=32))
    assert packed["input_ids"].shape[0] == 1  # all three records in one row

    def loss_and_grad(batch, supervised):
        base = tiny_glm()
        base.set_attn_implementation(use_packed_sdpa())  # what --packing loads: attention per record
        model = PrefixTuningModel(base, pre_seq_len=4, prefix_dropout=0.0)
        torch.manual_seed(1)
        torch.nn.init.normal_(model.prefix_encoder.embedding.weight)
        if supervised:
            use_supervised_loss(model)
        model.train()
        loss = model(**batch, num_items_in_batch=targets(unpacked)).loss
        loss.backward()
        return loss.detach(), model.prefix_encoder.embedding.weight.grad

    expected_loss, expected_grad = loss_and_grad(unpacked, supervised=False)
    for batch, supervised in ((unpacked, True), (packed, False), (packed, True)):
        loss, grad = loss_and_grad(batch, supervised)
        torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-7)
