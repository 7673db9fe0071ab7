"""The divergence guard: a non-finite loss or gradient stops the run before anything non-finite is
saved; --nan_patience skips isolated bad batches."""

import json
import os
import re

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_finetune
from test_finetune import common_args


def tiny_trainer(tiny_model_dir, tiny_tokenizer, output_dir, poisoned_calls, **options):
    """A ChatGLMTrainer on a tiny full model whose loss is NaN at the given forward calls (1-based)."""
    from transformers import AutoModelForCausalLM

    from arguments import TrainingArguments
    from chatglm3_finetune.data.collation import DataCollatorForChatGLM
    from chatglm3_finetune.data.encoding import LengthLimits
    from chatglm3_finetune.data.training_data import tokenize_records
    from trainer import ChatGLMTrainer

    record = {"conversations": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"}]}
    dataset, _ = tokenize_records(tiny_tokenizer, [(f"d:{i}", record) for i in range(16)], "multi-turn",
                                  LengthLimits(max_seq_length=64))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    forward, calls = model.forward, []

    def poisoned_forward(*args, **kwargs):
        output = forward(*args, **kwargs)
        calls.append(1)
        if len(calls) in poisoned_calls:
            output.loss = output.loss * float("nan")
        return output

    model.forward = poisoned_forward
    args = TrainingArguments(output_dir=str(output_dir), use_cpu=True, report_to="none", per_device_train_batch_size=2,
                             logging_steps=1, learning_rate=1e-3, save_strategy="no", remove_unused_columns=False,
                             **options)
    trainer = ChatGLMTrainer(model=model, args=args, train_dataset=dataset.select_columns(["input_ids", "labels"]),
                             data_collator=DataCollatorForChatGLM(tiny_tokenizer.pad_token_id))
    return trainer, model


def test_a_nan_loss_stops_the_run_and_nothing_is_saved(tiny_model_dir, tiny_tokenizer, tmp_path):
    from chatglm3_finetune.train.divergence import TrainingDiverged

    trainer, model = tiny_trainer(tiny_model_dir, tiny_tokenizer, tmp_path / "o", poisoned_calls={3}, max_steps=5)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    with pytest.raises(TrainingDiverged, match=r"training diverged at step 3: the loss is nan\. Likely cause: the "
                                               r"learning rate is too high"):
        trainer.train()
    assert trainer.state.global_step == 2  # stopped before step 3's update
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(before[name], p) for name, p in model.named_parameters())


def test_nan_patience_skips_an_isolated_bad_batch(tiny_model_dir, tiny_tokenizer, tmp_path):
    trainer, model = tiny_trainer(tiny_model_dir, tiny_tokenizer, tmp_path / "o", poisoned_calls={3},
                                  max_steps=5, nan_patience=1)
    trainer.train()
    assert trainer.state.global_step == 5 and trainer.divergence_guard.skipped_steps == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses[2] != losses[2] and all(loss == loss and loss > 1 for i, loss in enumerate(losses) if i != 2)
    assert [entry.get("skipped_steps") for entry in trainer.state.log_history if "loss" in entry] == [None, None, 1, None, None]


def test_two_bad_batches_in_a_row_exceed_a_patience_of_one(tiny_model_dir, tiny_tokenizer, tmp_path):
    from chatglm3_finetune.train.divergence import TrainingDiverged

    trainer, _ = tiny_trainer(tiny_model_dir, tiny_tokenizer, tmp_path / "o", poisoned_calls={2, 3},
                              max_steps=5, nan_patience=1)
    with pytest.raises(TrainingDiverged, match="at step 3"):
        trainer.train()


def test_non_finite_weights_are_never_saved(tiny_model_dir, tiny_tokenizer, tmp_path):
    from chatglm3_finetune.train.divergence import TrainingDiverged

    trainer, model = tiny_trainer(tiny_model_dir, tiny_tokenizer, tmp_path / "o", poisoned_calls=set(), max_steps=1)
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float("inf")
    with pytest.raises(TrainingDiverged, match="lm_head.weight holds NaN or inf"):
        trainer.save_model()
    assert not os.path.exists(tmp_path / "o" / "model.safetensors")


@pytest.mark.slow
@pytest.mark.parametrize("method", [[], ["--pre_seq_len", "4"]], ids=["full", "ptuning"])
def test_a_huge_learning_rate_exits_3_and_keeps_the_last_good_checkpoint(tiny_model_dir, formatted_samples, tmp_path,
                                                                         method):
    output_dir = tmp_path / "o"
    result = run_finetune(*common_args(tiny_model_dir, formatted_samples["multi-turn"], output_dir, *method,
                                       "--max_steps", "8", "--save_steps", "1", "--learning_rate", "1e30" if not method else "1e38"), check=False)
    assert result.returncode == 3, result.stderr[-3000:]
    errors = [line[line.index("error: "):] for line in result.stderr.splitlines() if "error: " in line]
    assert len(errors) == 1 and "training diverged at" in errors[0] and "--learning_rate 1e+3" in errors[0], errors
    assert "Traceback" not in result.stderr
    assert "'loss': '0'" not in result.stdout and "'loss': 0.0" not in result.stdout
    diverged_at = int(re.search(r"diverged at (?:or before )?step (\d+)", errors[0]).group(1))
    checkpoints = sorted(int(name.split("-")[1]) for name in os.listdir(output_dir) if name.startswith("checkpoint-"))
    assert checkpoints == list(range(1, diverged_at)), (checkpoints, diverged_at)
    newest = f"checkpoint-{checkpoints[-1]}" if checkpoints else "none"
    assert errors[0].endswith(f"the newest checkpoint, still good: {output_dir / newest if checkpoints else newest}")
    assert not os.path.exists(output_dir / "train_results.json")
    assert json.loads((output_dir / "run_record.json").read_text())["finished"] is None
    for step in checkpoints:
        folder = output_dir / f"checkpoint-{step}"
        weights = "prefix_encoder.safetensors" if method else "model.safetensors"
        assert all(torch.isfinite(t).all() for t in load_file(folder / weights).values())


def test_a_nan_learning_rate_is_refused_before_loading(tiny_model_dir, formatted_samples, tmp_path):
    result = run_finetune(*common_args(tiny_model_dir, formatted_samples["multi-turn"], tmp_path / "o",
                                       "--learning_rate", "nan"), check=False)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: --learning_rate must be a finite number >= 0, got nan"


class FakeArgs:
    device = torch.device("cpu")
    learning_rate = 1e-3
    output_dir = "out"


class FakeState:
    global_step = 0


def test_fp16_stops_after_a_long_run_of_skipped_steps_only():
    from types import SimpleNamespace

    from chatglm3_finetune.train.divergence import FP16_SKIPPED_STEPS_LIMIT, DivergenceGuard, TrainingDiverged

    guard, state = DivergenceGuard(fp16=True), FakeState()
    skipped, stepped = SimpleNamespace(step_was_skipped=True), SimpleNamespace(step_was_skipped=False)
    for optimizer in [skipped] * (FP16_SKIPPED_STEPS_LIMIT - 1) + [stepped] + [skipped] * (FP16_SKIPPED_STEPS_LIMIT - 1):
        state.global_step += 1
        guard.observe_grad_norm(float("inf"))  # overflowing gradients alone are the loss scaler's business
        guard.on_pre_optimizer_step(FakeArgs, state, None, model=None)
        guard.on_step_end(FakeArgs, state, None, optimizer=optimizer)
    state.global_step += 1
    with pytest.raises(TrainingDiverged, match=f"the last {FP16_SKIPPED_STEPS_LIMIT} optimizer steps were all skipped "
                                               f"by fp16 loss scaling.*Likely cause: fp16 overflow"):
        guard.on_step_end(FakeArgs, state, None, optimizer=skipped)


def test_under_deepspeed_a_non_finite_gradient_norm_stops_at_the_step_end():
    from chatglm3_finetune.train.divergence import DivergenceGuard, TrainingDiverged

    guard, state = DivergenceGuard(deepspeed=True), FakeState()
    guard.observe_loss(torch.tensor(2.0))
    guard.observe_grad_norm(2.0)
    guard.on_step_end(FakeArgs, state, None)
    state.global_step = 2
    guard.observe_loss(torch.tensor(2.0))
    guard.observe_grad_norm(float("nan"))
    with pytest.raises(TrainingDiverged, match="diverged at step 2: the gradient norm is nan"):
        guard.on_step_end(FakeArgs, state, None)
