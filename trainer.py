"""The Trainer subclass: saves only what was trained (the P-Tuning prefix, LoRA adapters) or the
whole model for full fine-tuning (never non-finite weights), counts real and supervised tokens on the
device (read at log and save time), keeps run totals
across resumes, runs the divergence guard and the stop-and-save handler, writes run_config.json and
a loss curve. Checkpoints and the final model are complete only with their manifest (written last;
the final model aside, then moved into place: chatglm3_finetune.train.final_model).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil

import torch
from transformers import Seq2SeqTrainer
from transformers.trainer_pt_utils import nested_gather

from chatglm3_finetune.train import final_model
from chatglm3_finetune.train.checkpoints import choose_checkpoint, rotate
from chatglm3_finetune.train.divergence import DivergenceGuard, TrainingDiverged, first_non_finite_parameter
from chatglm3_finetune.train.file_modes import respect_umask
from chatglm3_finetune.train.manifest import write_manifest
from chatglm3_finetune.train.output_folder import WRITE_ERRORS, final_write_failed, write_failed
from chatglm3_finetune.train.preemption import PreemptionSaver
from chatglm3_finetune.model.ptuning.prefix_model import PrefixTuningModel
from chatglm3_finetune.compat import (declare_causal_label_shift, deepspeed_saves_trained_parameters_only,
                                      require_trainer_hooks, set_deepspeed_master_weights, trainer_generation_kwargs,
                                      trainer_prepare_inputs, training_args_file_name)
from chatglm3_finetune.train.token_counts import input_tokens, supervised_tokens

logger = logging.getLogger(__name__)

RUN_TOTALS = "run_totals"  # key in the trainer state's stateful_callbacks: totals that survive resumes


class ChatGLMTrainer(require_trainer_hooks(Seq2SeqTrainer, "_load_from_checkpoint", "_get_grad_norm", "_save_checkpoint",
                                          "_load_callback_state", "_load_optimizer_and_scheduler",
                                          "_track_num_input_tokens", "_save_optimizer_and_scheduler",
                                          "_prepare_for_training")):
    """The loss contract: models declare `accepts_loss_kwargs` (loss_switch.SupervisedLossSwitch)
    and every model kind's targets are counted with the causal label shift, here and in the
    Trainer's `num_items_in_batch` (`count_targets`)."""

    def __init__(self, *args, max_new_tokens: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        declare_causal_label_shift(self)
        self._pending_token_counts = None  # device tensor [input tokens, supervised tokens] since the last read
        self._supervised_at_start = None
        self._loss_sum_before = 0.0  # the summed step losses of the sessions before a resume
        self.max_new_tokens = max_new_tokens  # generation length for --predict_with_generate
        self.args.logging_nan_inf_filter = False  # it logs 0 for a NaN; the guard stops such runs instead
        self.divergence_guard = DivergenceGuard(patience=getattr(self.args, "nan_patience", 0),
                                                fp16=self._uses_fp16(), deepspeed=self.is_deepspeed_enabled)
        self.preemption = PreemptionSaver(getattr(self.args, "save_every_minutes", 0) or 0)
        self.add_callback(self.divergence_guard)
        self.add_callback(self.preemption)

    def _uses_fp16(self) -> bool:
        if self.args.fp16:
            return True
        config = getattr(self.args, "hf_deepspeed_config", None)
        return bool(config is not None and config.is_true("fp16.enabled"))

    def _unwrapped(self):
        return self.accelerator.unwrap_model(self.model, keep_torch_compile=False)

    # ---- loss and logging ----------------------------------------------------------------------

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.divergence_guard.observe_loss(loss)
        return self.divergence_guard.loss_to_accumulate(loss)

    def _get_grad_norm(self, model, grad_norm=None):
        grad_norm = super()._get_grad_norm(model, grad_norm)
        self.divergence_guard.observe_grad_norm(grad_norm)
        return grad_norm

    # ---- token accounting (chatglm3_finetune.train.token_counts) -------------------------------------

    def _track_num_input_tokens(self, inputs):
        """Every training micro-batch: input tokens (real ones unless --include_num_input_tokens_seen all)
        and supervised tokens, added up on the device: no host synchronisation per micro-batch."""
        if "labels" not in inputs:
            return
        if self._supervised_at_start is None:
            self._supervised_at_start = getattr(self.state, "supervised_tokens", 0)
        counts = torch.stack([input_tokens(inputs, self.args.include_num_input_tokens_seen),
                              supervised_tokens(inputs)]).to(self.args.device)
        self._pending_token_counts = counts if self._pending_token_counts is None else self._pending_token_counts + counts

    def supervised_tokens_trained(self) -> int:
        """Supervised tokens trained so far, summed over all processes; also moves the pending input-token
        count into num_input_tokens_seen (every rank must call it: at each log and save)."""
        pending = self._pending_token_counts
        if pending is None:
            pending = torch.zeros(2, dtype=torch.long, device=self.args.device)
        input_count, supervised_count = self.accelerator.reduce(pending, reduction="sum").tolist()
        self._pending_token_counts = None
        if self.args.include_num_input_tokens_seen != "no":
            self.state.num_input_tokens_seen += input_count
        self.state.supervised_tokens = getattr(self.state, "supervised_tokens", 0) + supervised_count
        return self.state.supervised_tokens

    def token_metrics(self, runtime_s: float) -> dict:
        """Final summary: tokens trained in all (resumed runs included) and per second in this run."""
        supervised = self.supervised_tokens_trained()
        metrics = {"train_supervised_tokens": supervised,
                   "train_supervised_tokens_per_second": round((supervised - (self._supervised_at_start or 0)) / runtime_s, 3)}
        if self.args.include_num_input_tokens_seen != "no":
            seen = self.state.num_input_tokens_seen
            metrics.update(train_num_input_tokens_seen=seen,
                           train_tokens_per_second=round((seen - self._initial_num_input_tokens_seen) / runtime_s, 3))
        return metrics

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        supervised = self.supervised_tokens_trained()  # before super().log reads num_input_tokens_seen
        if "loss" in logs:
            self.divergence_guard.correct_logged_loss(logs, self.state.global_step)
            logs["supervised_tokens"] = supervised
        super().log(logs, start_time)

    # ---- totals over the whole run, across resumes ------------------------------------------------

    def _load_callback_state(self) -> None:
        """Called right after a resumed run loaded its trainer state: take the run's totals back."""
        totals = self.state.stateful_callbacks.get(RUN_TOTALS) or {}
        self.state.supervised_tokens = totals.get("supervised_tokens", 0)
        self._loss_sum_before = totals.get("loss_sum", 0.0)
        super()._load_callback_state()

    def _store_run_totals(self) -> None:
        self.supervised_tokens_trained()
        pending_loss = nested_gather(self._tr_loss.detach(), self.args.parallel_mode).mean().item()
        self.state.stateful_callbacks[RUN_TOTALS] = {
            "supervised_tokens": self.state.supervised_tokens,
            "loss_sum": self._loss_sum_before + self._total_loss_scalar + pending_loss}

    def train(self, *args, **kwargs):
        """As Trainer.train, but train_loss covers every step of the run, not only this session's."""
        result = super().train(*args, **kwargs)
        if self.state.global_step:
            whole = (self._loss_sum_before + self._total_loss_scalar) / self.state.global_step
            result = result._replace(training_loss=whole, metrics={**result.metrics, "train_loss": whole})
            if "train_loss" in self.state.log_history[-1]:
                self.state.log_history[-1]["train_loss"] = whole
        return result

    # ---- generation-based evaluation (--predict_with_generate; the logic is in evaluation.py) -----

    def get_eval_dataloader(self, eval_dataset=None):
        with self._generation_batches():
            return super().get_eval_dataloader(eval_dataset)

    def get_test_dataloader(self, test_dataset):
        with self._generation_batches():
            return super().get_test_dataloader(test_dataset)

    @contextlib.contextmanager
    def _generation_batches(self):
        """Evaluation batches of left-padded prompts (and item indices as labels) instead of training batches."""
        if not self.args.predict_with_generate:
            yield
            return
        from chatglm3_finetune.data.collation import GenerationCollator

        training_collator, self.data_collator = self.data_collator, GenerationCollator(self.processing_class.pad_token_id)
        try:
            yield
        finally:
            self.data_collator = training_collator

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None, **gen_kwargs):
        if not self.args.predict_with_generate or prediction_loss_only:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)
        from chatglm3_finetune.evaluate.evaluation import generate_new_tokens

        inputs = trainer_prepare_inputs(self, inputs)
        options = {**trainer_generation_kwargs(self), **gen_kwargs}
        if options.get("max_new_tokens") is None and options.get("max_length") is None:
            options["max_new_tokens"] = self.max_new_tokens
        # self.model, not the DeepSpeed engine: generate() lives on the module (ZeRO-3 hooks gather weights)
        new_tokens = generate_new_tokens(self.model, inputs, self.processing_class, options)
        return None, new_tokens, inputs["labels"]

    # ---- saving and loading --------------------------------------------------------------------

    def _check_finite_before_saving(self, path: str) -> None:
        bad = first_non_finite_parameter(self._unwrapped())
        if bad:
            raise TrainingDiverged(
                f"training diverged at or before step {self.state.global_step}: the trained parameter {bad} holds "
                f"NaN or inf values, so {path} was not saved. Likely cause: the learning rate is too high "
                f"(--learning_rate {self.args.learning_rate}): lower it")

    def _save_checkpoint(self, model, trial) -> None:
        """As the Trainer's, plus the manifest, written once every rank's files are: only then is the
        checkpoint complete, and only then are older ones rotated out (--save_total_limit)."""
        path = os.path.join(self.args.output_dir, f"checkpoint-{self.state.global_step}")
        self._check_finite_before_saving(path)
        self._store_run_totals()
        limit = self.args.save_total_limit
        try:
            if self.args.should_save and os.path.isdir(path):
                shutil.rmtree(path)  # a save of this step that an earlier session did not complete
            self.accelerator.wait_for_everyone()
            self.args.save_total_limit = None  # rotated below, once this one is complete
            super()._save_checkpoint(model, trial)
            self.accelerator.wait_for_everyone()
            if self.args.should_save:
                write_manifest(path, self.state.global_step)
        except WRITE_ERRORS as e:
            raise write_failed(path, e) from e
        finally:
            self.args.save_total_limit = limit
        if self.args.should_save:
            rotate(self.args.output_dir, limit, keep=(path, self.state.best_model_checkpoint))

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Saves what was trained (every checkpoint too), with the permissions the umask gives; never
        non-finite weights (checkpoints are checked, and their write errors reported, in _save_checkpoint).
        The final model is written aside and moved into place with its manifest (final_model.publish)."""
        if _internal_call:
            self._save_trained(output_dir, _internal_call)
            if self.args.should_save and os.path.isdir(output_dir):
                respect_umask(output_dir)
            return
        output_dir = output_dir or self.args.output_dir
        self._check_finite_before_saving(output_dir)
        try:
            if self.args.should_save:
                final_model.prepare_aside(output_dir)
            self.accelerator.wait_for_everyone()
            self._save_trained(final_model.aside_folder(output_dir), False)
            self.accelerator.wait_for_everyone()
            if self.args.should_save:
                names = final_model.publish(output_dir, self.state.global_step)
                logger.info("Saved the final model to %s (%d files, and their manifest)", output_dir, len(names))
        except WRITE_ERRORS as e:
            if self.args.should_save:
                final_model.discard_aside(output_dir)  # frees the space a full disk needs back
            raise final_write_failed(output_dir, self.state.global_step, e) from e
        self.accelerator.wait_for_everyone()

    def _save_trained(self, output_dir: str, _internal_call: bool) -> None:
        model = self._unwrapped()
        if not isinstance(model, PrefixTuningModel):
            return super().save_model(output_dir, _internal_call)
        # Every rank calls this: under ZeRO-3 the prefix is gathered (only the prefix, not the base).
        model.save_pretrained(output_dir, is_main_process=self.args.should_save)
        if self.args.should_save:
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)
            torch.save(self.args, os.path.join(output_dir, training_args_file_name()))

    # ---- DeepSpeed checkpoints of a frozen base (P-Tuning, LoRA) -------------------------------------

    def _frozen_base_under_deepspeed(self) -> bool:
        from peft import PeftModel

        return self.is_deepspeed_enabled and isinstance(self._unwrapped(), (PrefixTuningModel, PeftModel))

    def _save_optimizer_and_scheduler(self, output_dir):
        """DeepSpeed checkpoints of P-Tuning and LoRA hold what trains and its optimizer state, not the base
        (transformers leaves frozen parameters out for peft models only, and neither leaves out a 4/8-bit
        base's quantization constants). Resuming loads the base from the model folder."""
        if not self._frozen_base_under_deepspeed():
            return super()._save_optimizer_and_scheduler(output_dir)
        with deepspeed_saves_trained_parameters_only(self.model_wrapped):
            super()._save_optimizer_and_scheduler(output_dir)

    def _prepare_for_training(self, max_steps, train_dataloader, resume_from_checkpoint):
        """A new P-Tuning run under DeepSpeed fp16/bf16 ZeRO-1/2 starts from the prefix's exact fp32 values:
        DeepSpeed would make its fp32 master copy from the half-precision one it casts the module to."""
        model = self._unwrapped()
        prefix = None
        if self.is_deepspeed_enabled and isinstance(model, PrefixTuningModel) and not resume_from_checkpoint:
            prefix = model.prefix_state_dict()
        prepared = super()._prepare_for_training(max_steps, train_dataloader, resume_from_checkpoint)
        if prefix is not None:
            set_deepspeed_master_weights(model.prefix_encoder, prefix)
        return prepared

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint:
            self._learning_rate_from_the_schedule()

    def _learning_rate_from_the_schedule(self) -> None:
        """On resume the optimizer's learning rate is the one the checkpoint's last step left; set the one
        this run's schedule gives for the step, so a changed max_steps is applied from the first step."""
        scheduler = getattr(self.lr_scheduler, "scheduler", self.lr_scheduler)
        if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
            step = scheduler.last_epoch
            for group, base, factor in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
                group["lr"] = base * factor(step)
            scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]  # what gets logged

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        target = self.accelerator.unwrap_model(model or self.model)
        if isinstance(target, PrefixTuningModel):
            target.load_prefix(resume_from_checkpoint)
            logger.info("Loaded the prefix from %s", resume_from_checkpoint)
            return
        super()._load_from_checkpoint(resume_from_checkpoint, model)


# ---- resuming ----------------------------------------------------------------------------------

def find_resume_checkpoint(output_dir: str) -> str | None:
    """The newest complete checkpoint in output_dir (its manifest matches its files), or None."""
    from chatglm3_finetune.train.checkpoints import NoGoodCheckpoint
    from chatglm3_finetune.train.run_record import legacy_checkpoints_up_to

    try:
        return choose_checkpoint(output_dir, legacy_checkpoints_up_to(output_dir)).path
    except NoGoodCheckpoint:
        return None


# ---- run records --------------------------------------------------------------------------------

def write_run_config(output_dir: str, **option_groups) -> str:
    """run_config.json: every option used, grouped as given (model, data, training)."""
    os.makedirs(output_dir, exist_ok=True)
    record = {}
    for group, options in option_groups.items():
        values = options.to_dict() if hasattr(options, "to_dict") else dataclasses.asdict(options)
        record[group] = json.loads(json.dumps(values, default=str))
    path = os.path.join(output_dir, "run_config.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2, ensure_ascii=False)
    return path


def plot_loss_curve(log_history: list[dict], path: str) -> str | None:
    """A PNG of training (and evaluation) loss against the step; None when nothing was logged."""
    train = [(entry["step"], entry["loss"]) for entry in log_history if "loss" in entry]
    evaluation = [(entry["step"], entry["eval_loss"]) for entry in log_history if "eval_loss" in entry]
    if not train and not evaluation:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="training loss")
    if evaluation:
        ax.plot(*zip(*evaluation), marker="o", label="evaluation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
