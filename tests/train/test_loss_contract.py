"""The loss contract: a supervised label at position 0 is never counted nor trained, whatever the model kind."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import GlmForCausalLM, Seq2SeqTrainingArguments

from chatglm3_finetune.model.ptuning.prefix_model import PrefixTuningModel
from chatglm3_finetune.train.loss_switch import use_supervised_loss
from chatglm3_finetune.train.supervised_loss import count_targets
from chatglm3_finetune.model.tiny_model import tiny_glm_config
from trainer import ChatGLMTrainer

X = -100
VOCAB = 96


def tiny_glm():
    torch.manual_seed(0)
    return GlmForCausalLM(tiny_glm_config(VOCAB, hidden_size=32, num_layers=2)).float()


def build(kind):
    if kind == "plain":
        return tiny_glm()
    if kind == "ptuning":
        model = PrefixTuningModel(tiny_glm(), pre_seq_len=3, prefix_dropout=0.0)
        torch.nn.init.normal_(model.prefix_encoder.embedding.weight)
        return model
    model = get_peft_model(tiny_glm(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    return model


def batches():
    """The same two rows, once with real labels at position 0 and once with -100 there."""
    generator = torch.Generator().manual_seed(3)
    input_ids = torch.randint(3, VOCAB, (2, 10), generator=generator)
    labels = torch.full_like(input_ids, X)
    labels[:, 4:] = input_ids[:, 4:]
    labels[0, 7] = X
    with_label_zero = labels.clone()
    with_label_zero[:, 0] = input_ids[:, 0]
    attention_mask = torch.ones_like(input_ids)
    return ({"input_ids": input_ids, "attention_mask": attention_mask, "labels": with_label_zero},
            {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels})


def loss_and_grads(kind, batch, supervised):
    model = use_supervised_loss(build(kind), enabled=supervised)
    model.train()
    loss = model(**batch, num_items_in_batch=count_targets(batch["labels"])).loss
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("kind", ["plain", "ptuning", "lora"])
@pytest.mark.parametrize("supervised", [True, False])
def test_a_label_at_position_0_is_not_trained(kind, supervised):
    with_label_zero, without = batches()
    assert count_targets(with_label_zero["labels"]) == count_targets(without["labels"]) == 11
    loss, grads = loss_and_grads(kind, with_label_zero, supervised)
    expected_loss, expected_grads = loss_and_grads(kind, without, supervised)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-6, atol=1e-7)
    assert grads and all(g.abs().sum() > 0 for g in grads)
    for grad, expected in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("kind", ["plain", "ptuning", "lora"])
def test_the_trainer_counts_targets_with_the_shift_for_every_model_kind(tmp_path, kind):
    model = use_supervised_loss(build(kind))
    args = Seq2SeqTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    trainer = ChatGLMTrainer(model=model, args=args)
    assert trainer.model_accepts_loss_kwargs  # declared by the model, not guessed from its signature
    with_label_zero, _ = batches()
    counted = trainer._get_num_items_in_batch([with_label_zero], torch.device("cpu"))
    assert int(counted) == count_targets(with_label_zero["labels"]) == 11
    trainer.compute_loss(model, dict(with_label_zero), num_items_in_batch=counted)
    trainer._track_num_input_tokens(dict(with_label_zero))  # what the training loop calls per micro-batch
    assert trainer.supervised_tokens_trained() == 11


def test_switching_keeps_the_class_and_its_saved_architecture(tmp_path):
    model = use_supervised_loss(tiny_glm())
    assert isinstance(model, GlmForCausalLM) and type(model).__name__ == "GlmForCausalLM"
    assert "forward" not in vars(model)  # the class reads the switch: no method set on the instance
    model.save_pretrained(str(tmp_path))
    assert GlmForCausalLM.from_pretrained(str(tmp_path)).config.architectures == ["GlmForCausalLM"]
    use_supervised_loss(model, enabled=False)
    model.train()
    with_label_zero, _ = batches()
    assert model(**with_label_zero).logits.shape == (2, 10, VOCAB)  # switched off: the class's own output
