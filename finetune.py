#!/usr/bin/env python3
"""Fine-tune a ChatGLM3-family model: full fine-tuning (DeepSpeed ZeRO), P-Tuning v2 or LoRA.

    python finetune.py --model_name_or_path MODEL --train_format multi-turn \\
        --train_file formatted_data/tool_alpaca.jsonl --output_dir output/run --do_train \\
        --pre_seq_len 128 --max_steps 1000 --learning_rate 2e-2
    python finetune.py args.json      # one .json or .yaml file instead of the flags

Rerunning the same command into the same --output_dir continues from its newest complete
checkpoint; --resume_from_checkpoint PATH names one. Exit codes: 0 done, 2 a user mistake, 3 the run
diverged, 4 a checkpoint or the final model could not be written, 75 stopped by SIGTERM/SIGINT with a
checkpoint (or after the final save).
One run at a time per --output_dir (output_dir/run.lock).
"""

from __future__ import annotations

import logging
import os
import sys
import time

# bitsandbytes warns at import, on every CPU run, about an optional kernel download we never want.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

import transformers  # noqa: E402
from transformers import set_seed  # noqa: E402

from arguments import OptionError, check_fits_model_context, check_options, parse_args  # noqa: E402
from chatglm3_finetune.data.collation import build_collator  # noqa: E402
from chatglm3_finetune.train.divergence import DIVERGED_EXIT_CODE, TrainingDiverged  # noqa: E402
from chatglm3_finetune.data.encoding import print_sanity_check  # noqa: E402
from chatglm3_finetune.model.loading import ModelLoadError, load_for_training  # noqa: E402
from chatglm3_finetune.train.checkpoints import read_trainer_state  # noqa: E402
from chatglm3_finetune.train.output_folder import (WRITE_FAILED_EXIT_CODE, CheckpointWriteError,  # noqa: E402
                                                   CreatedFolder)
from chatglm3_finetune.train.preemption import PREEMPTED_EXIT_CODE, RESUME_HINT  # noqa: E402
from chatglm3_finetune.train.run_lock import RunLock  # noqa: E402
from chatglm3_finetune.train.run_start import decide_start, schedule, shared_from_main  # noqa: E402
from chatglm3_finetune.compat import (UntestedVersionError, check_versions,  # noqa: E402
                                      skip_deepspeed_cpu_shared_memory_op)
from chatglm3_finetune.model.packed_attention import packing_attention  # noqa: E402
from chatglm3_finetune.data.records import DataError  # noqa: E402
from chatglm3_finetune.train.run_record import mark_finished  # noqa: E402
from chatglm3_finetune.train.loss_switch import use_supervised_loss  # noqa: E402
from chatglm3_finetune.format.tokenizer import load_tokenizer  # noqa: E402
from chatglm3_finetune.train.run_summary import summary_lines  # noqa: E402
from chatglm3_finetune.plan import check_memory_before_loading  # noqa: E402
from chatglm3_finetune.data.training_data import (  # noqa: E402
    caps_text, length_limits, load_split, pack_dataset, read_split_records,
)

logger = logging.getLogger("finetune")


def fail(message: str, exit_code: int = 2) -> None:
    # One write, not print's two: the ranks of a run that fail together then never merge their lines.
    sys.stderr.write(f"error: {message}\n")
    sys.stderr.flush()
    sys.exit(exit_code)


class HubReminderFilter(logging.Filter):
    """Drops the Trainer's "share your model on the Hub" line (this toolkit works offline)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "share your model" not in record.getMessage()


def setup_logging(training_args) -> None:
    """INFO from this toolkit and from the Trainer's run and metric reports; warnings only from the rest
    of transformers (its config dumps and file-by-file loading notes would bury the run summary)."""
    level = logging.INFO if training_args.should_log else logging.WARNING
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        handlers=[logging.StreamHandler(sys.stdout)], level=level)
    transformers.utils.logging.set_verbosity(logging.WARNING)
    for name in ("transformers.trainer", "transformers.trainer_pt_utils"):
        logging.getLogger(name).setLevel(level)
    trainer_logger = logging.getLogger("transformers.trainer")
    if not any(isinstance(f, HubReminderFilter) for f in trainer_logger.filters):
        trainer_logger.addFilter(HubReminderFilter())
    transformers.utils.logging.enable_explicit_format()


def prepare_output_dir(model_args, data_args, training_args, lock: RunLock):
    """Before anything loads: the main process decides (decide_start) and every rank follows; a refusal,
    a finished run and a run that only lacks its final model end the process here. Returns the
    checkpoint to resume from and the run plan (on the main process only)."""
    main = training_args.process_index == 0
    start, run_plan = decide_start(model_args, data_args, training_args, lock) if main else (None, None)
    start = shared_from_main(start, training_args)
    if start.error:
        if main:
            fail(start.error)
        sys.exit(2)
    output_dir = training_args.output_dir
    if start.finished:
        if main:
            print(f"The run in {output_dir} already finished with these settings: nothing to do (use "
                  f"--overwrite_output_dir to train it again, or a larger --max_steps to continue it)", flush=True)
        sys.exit(0)
    if start.finish_from:
        if main:
            finish_from_checkpoint(start.finish_from, run_plan, model_args, training_args)
        sys.exit(0)
    return start.resume_from, run_plan


def finish_from_checkpoint(checkpoint: str, run_plan, model_args, training_args) -> None:
    """The run trained its last step and saved it in `checkpoint`, but its final model is missing or
    incomplete (the final save was cut short): the final model is the checkpoint's."""
    from chatglm3_finetune.train import final_model
    from chatglm3_finetune.train.output_folder import final_write_failed
    from chatglm3_finetune.train.run_summary import inference_command
    from trainer import RUN_TOTALS, plot_loss_curve

    output_dir = training_args.output_dir
    state = read_trainer_state(checkpoint)
    try:
        final_model.finish_from_checkpoint(checkpoint, output_dir, state["global_step"])
    except OSError as e:
        fail(str(final_write_failed(output_dir, state["global_step"], e)), WRITE_FAILED_EXIT_CODE)
    run_plan.save_start(output_dir)
    final_model.write_results(output_dir, "train", {**final_model.run_totals_metrics(state, RUN_TOTALS),
                                                    "finished_from_checkpoint": checkpoint})
    mark_finished(output_dir, state["global_step"], schedule(training_args))
    plot_loss_curve(state["log_history"], os.path.join(output_dir, "loss_curve.png"))
    skipped = " (evaluation and prediction were not run)" if training_args.do_eval or training_args.do_predict else ""
    print(f"The run in {output_dir} had trained all {state['global_step']} steps, but its final model was missing or "
          f"incomplete (its final save was cut short): wrote it from {checkpoint}{skipped}. Done.\n"
          f"chat with it: {inference_command(model_args.tuning_method, output_dir, model_args.model_name_or_path)}",
          flush=True)


def train_to_the_end(trainer, resume_from: str | None):
    """trainer.train then the final save; a divergence, a failed write or a stop request ends the
    process here with one message and its own exit code."""
    main_process = trainer.is_world_process_zero()
    try:
        result = trainer.train(resume_from_checkpoint=resume_from)
        if not trainer.preemption.preempted:
            trainer.save_model()
    except TrainingDiverged as e:
        from trainer import find_resume_checkpoint

        newest = find_resume_checkpoint(trainer.args.output_dir)
        fail(f"{e}; the newest checkpoint, still good: {newest or 'none'}" if main_process
             else "training diverged (see the main process)", DIVERGED_EXIT_CODE)
    except CheckpointWriteError as e:
        fail(str(e), WRITE_FAILED_EXIT_CODE)
    if trainer.preemption.preempted:
        finish_distributed()
        if main_process:
            print(f"Stopped at step {trainer.state.global_step} with a complete checkpoint: {RESUME_HINT}",
                  file=sys.stderr, flush=True)
        sys.exit(PREEMPTED_EXIT_CODE)
    return result


def stop_after_the_final_save(trainer) -> None:
    """A stop request that came after the last step: the final model is complete and the run marked
    finished, so a rerun has nothing left to do; what would come next (evaluation) is skipped."""
    finish_distributed()
    if trainer.is_world_process_zero():
        args = trainer.args
        skipped = "; the evaluation asked for was skipped" if args.do_eval or args.do_predict else ""
        print(f"Stopped on request after the final save: training finished at step {trainer.state.global_step} and "
              f"the final model in {args.output_dir} is complete{skipped}. Rerunning the same command has nothing "
              f"left to do", file=sys.stderr, flush=True)
    sys.exit(PREEMPTED_EXIT_CODE)


def evaluated_at_the_last_step(trainer) -> dict | None:
    """The metrics of the evaluation that --eval_strategy already ran at the step training ended on
    (the same model and data: evaluating again would only repeat it)."""
    step = trainer.state.global_step
    for entry in reversed(trainer.state.log_history):
        if entry.get("step") == step and "eval_loss" in entry:
            return {key: value for key, value in entry.items() if key != "step"}
    return None


def main(argv: list[str] | None = None, plan: bool = False) -> None:
    started = time.monotonic()
    try:
        model_args, data_args, training_args = parse_args(argv, plan=plan)
        check_options(model_args, data_args, training_args)
        check_versions()
    except (OptionError, UntestedVersionError) as e:
        fail(str(e))
    if training_args.plan:  # --plan / --plan_json: the memory and time plan, nothing loaded or written
        sys.exit(make_plan(model_args, data_args, training_args))
    setup_logging(training_args)
    if training_args.activation_checkpointing and not training_args.activation_checkpointing_kwargs:
        training_args.activation_checkpointing_kwargs = {"use_reentrant": False}
    set_seed(training_args.seed)
    if training_args.do_train:  # a GPU run too big for its GPU stops here, before anything loads or is written
        check_memory_plan(model_args, data_args, training_args)
    lock = RunLock(training_args.output_dir)
    created = CreatedFolder(training_args.output_dir)
    try:
        run(model_args, data_args, training_args, lock, started)
    finally:
        lock.release()
        if training_args.process_index == 0:
            created.remove_if_empty()  # quietly: a failed try's error stays its last line


def run(model_args, data_args, training_args, lock: RunLock, started: float) -> None:
    resume_from, run_plan = prepare_output_dir(model_args, data_args, training_args, lock)

    try:
        tokenizer = load_tokenizer(model_args.tokenizer_name or model_args.model_name_or_path)
    except FileNotFoundError as e:
        fail(f"{'--tokenizer_name' if model_args.tokenizer_name else '--model_name_or_path'}: {e}")

    splits = {}
    generating = training_args.predict_with_generate and (training_args.do_eval or training_args.do_predict)
    descriptions = {"train": "training", "eval": "validation", "test": "test"}
    try:
        records = read_split_records(data_args, training_args)
        if not data_args.allow_longer_than_model:  # --train_format auto/alpaca: the caps are known now
            check_fits_model_context(model_args, data_args)
        for name, (source, split_records) in records.items():
            if name == "train" or not generating:
                splits[name] = load_split(source, None, tokenizer, data_args, training_args, descriptions[name],
                                          records=split_records)
        if generating:  # prompt-only splits, scored with ROUGE/BLEU (+ tool calls) in evaluation.py
            from chatglm3_finetune.evaluate.evaluation import GenerationEval

            generation = GenerationEval.from_args(tokenizer, data_args, training_args,
                                                  {name: records[name][1] for name in ("eval", "test") if name in records})
            splits.update({name: (dataset, None) for name, dataset in generation.datasets.items()})
    except (OptionError, DataError) as e:
        fail(str(e))
    if "train" in splits and training_args.process_index == 0:
        first = splits["train"][0][0]
        print_sanity_check(tokenizer, first["input_ids"], first["labels"], full=data_args.full_sanity_check)
    train_dataset = splits.get("train", (None,))[0]
    if train_dataset is not None and data_args.packing:
        try:
            train_dataset = pack_dataset(train_dataset, data_args)
        except DataError as e:
            fail(str(e))

    if training_args.deepspeed:
        skip_deepspeed_cpu_shared_memory_op()
    if training_args.deepspeed and training_args.world_size > 1:
        start_deepspeed_comm()
    if data_args.packing:
        model_args.attn_implementation = packing_attention(model_args.attn_implementation)
    try:
        model = load_for_training(model_args, training_args)
    except ModelLoadError as e:
        fail(str(e))
    if data_args.loss_on_targets_only:
        use_supervised_loss(model, chunk_size=data_args.loss_chunk_size)

    from trainer import ChatGLMTrainer, plot_loss_curve, write_run_config

    trainer = ChatGLMTrainer(
        model=model, args=training_args, train_dataset=train_dataset,
        eval_dataset=splits.get("eval", (None,))[0], data_collator=build_collator(tokenizer, data_args),
        processing_class=tokenizer, compute_metrics=generation.compute_metrics if generating else None,
        max_new_tokens=data_args.max_target_length,
    )
    if run_plan is not None:
        run_plan.save_start(training_args.output_dir)  # training starts now: the record gets this start
    if training_args.should_save:
        write_run_config(training_args.output_dir, model=model_args, data=data_args, training=training_args)

    results, trained = {}, None
    if training_args.do_train:
        try:
            result = train_to_the_end(trainer, resume_from)
            trained = {"steps": trainer.state.global_step, "supervised_tokens": trainer.supervised_tokens_trained()}
            metrics = dict(result.metrics, train_records=splits["train"][1].kept,
                           **trainer.token_metrics(result.metrics["train_runtime"]))
            trainer.log_metrics("train", metrics)
            trainer.save_metrics("train", metrics)
            trainer.save_state()
            if training_args.should_save:
                mark_finished(training_args.output_dir, trainer.state.global_step, schedule(training_args))
                curve = plot_loss_curve(trainer.state.log_history,
                                        os.path.join(training_args.output_dir, "loss_curve.png"))
                if curve:
                    logger.info("Loss curve: %s", curve)
            if trainer.preemption.stop_requested(training_args.device):
                stop_after_the_final_save(trainer)
        finally:
            trainer.preemption.release()
    if training_args.do_eval:
        metrics = results["eval"] = evaluated_at_the_last_step(trainer) or trainer.evaluate()
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
    if training_args.do_predict:
        if generating:
            result = trainer.predict(splits["test"][0], metric_key_prefix="predict")
            metrics = result.metrics
        else:  # loss only: Trainer.predict would gather every logit
            metrics = trainer.evaluate(splits["test"][0], metric_key_prefix="predict")
        results["predict"] = metrics
        trainer.log_metrics("predict", metrics)
        trainer.save_metrics("predict", metrics)
        if generating and training_args.should_save:
            path = generation.write_predictions("test", result.predictions, result.label_ids,
                                                os.path.join(training_args.output_dir, "generated_predictions.jsonl"))
            logger.info("Generated predictions: %s", path)
    if training_args.process_index == 0:
        print("\n".join(summary_lines(
            time.monotonic() - started, {name: source for name, (source, _) in records.items()},
            {name: report for name, (_, report) in splits.items()}, caps_text(length_limits(data_args)), trained,
            results, training_args.output_dir, model_args.tuning_method, model_args.model_name_or_path)), flush=True)
    finish_distributed()


def make_plan(model_args, data_args, training_args) -> int:
    from chatglm3_finetune.data.records import DataError
    from chatglm3_finetune.plan import PlanInputError, print_plan

    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    try:
        return print_plan(model_args, data_args, training_args)
    except (PlanInputError, DataError, OptionError) as e:
        fail(str(e))


def check_memory_plan(model_args, data_args, training_args) -> None:
    """GPU runs: the plan's summary line, and a stop (exit 2) when the run clearly does not fit. A plan
    that cannot be made does not stop the run: loading reports what is wrong with the model or data."""
    from chatglm3_finetune.data.records import DataError

    try:
        too_big = check_memory_before_loading(model_args, data_args, training_args)
    except DataError as e:
        fail(str(e))
    except Exception as e:  # noqa: BLE001 - the plan is advice; the run itself decides what fails
        logger.warning("No memory plan for this run (%s: %s); going on without the check", type(e).__name__, e)
        return
    if too_big:
        fail(too_big)


def plan_main(argv: list[str] | None = None) -> None:
    """The console command chatglm3-plan: finetune.py's options, planned (as with --plan)."""
    main(argv, plan=True)


def start_deepspeed_comm() -> None:
    """With --use_cpu accelerate starts torch.distributed but not DeepSpeed's own comm layer, and
    ZeRO-3's model loading (zero.Init) would then see a world of one process."""
    import deepspeed
    import torch.distributed as dist

    deepspeed.init_distributed(dist_backend=dist.get_backend() if dist.is_initialized() else None)


def finish_distributed() -> None:
    """A barrier and an orderly teardown: without it a ZeRO-3 rank can abort at exit."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
