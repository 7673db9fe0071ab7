#!/usr/bin/env python3
"""Fine-tune a ChatGLM3-family model: full fine-tuning (DeepSpeed ZeRO), P-Tuning v2 or LoRA.

    python finetune.py --model_name_or_path MODEL --train_format multi-turn \\
        --train_file formatted_data/tool_alpaca.jsonl --output_dir output/run --do_train \\
        --pre_seq_len 128 --max_steps 1000 --learning_rate 2e-2
    python finetune.py args.json      # one .json or .yaml file instead of the flags

Rerunning the same command into the same --output_dir continues from its newest complete
checkpoint; --resume_from_checkpoint PATH names one. Exit codes: 0 done, 2 a user mistake, 3 the run
diverged, 4 a checkpoint could not be written, 75 stopped by SIGTERM/SIGINT with a checkpoint.
"""

from __future__ import annotations

import json
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
from chatglm3_finetune.train.output_folder import (WRITE_FAILED_EXIT_CODE, CheckpointWriteError,  # noqa: E402
                                             check_writable, start_over)
from chatglm3_finetune.train.preemption import PREEMPTED_EXIT_CODE, RESUME_HINT  # noqa: E402
from chatglm3_finetune.compat import UntestedVersionError, check_versions  # noqa: E402
from chatglm3_finetune.model.packed_attention import packing_attention  # noqa: E402
from chatglm3_finetune.data.records import DataError  # noqa: E402
from chatglm3_finetune.train.run_record import ResumeRefused, mark_finished, plan_run, trained_settings  # noqa: E402
from chatglm3_finetune.train.loss_switch import use_supervised_loss  # noqa: E402
from chatglm3_finetune.format.tokenizer import load_tokenizer  # noqa: E402
from chatglm3_finetune.train.run_summary import summary_lines  # noqa: E402
from chatglm3_finetune.plan import check_memory_before_loading  # noqa: E402
from chatglm3_finetune.data.training_data import (  # noqa: E402
    caps_text, length_limits, load_split, pack_dataset, read_split_records,
)

logger = logging.getLogger("finetune")


def fail(message: str, exit_code: int = 2) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(exit_code)


def setup_logging(training_args) -> None:
    level = logging.INFO if training_args.should_log else logging.WARNING
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        handlers=[logging.StreamHandler(sys.stdout)], level=level)
    transformers.utils.logging.set_verbosity(level)
    transformers.utils.logging.enable_explicit_format()


def checkpoint_step(path: str) -> int:
    with open(os.path.join(path, "trainer_state.json")) as f:
        return json.load(f)["global_step"]


def resume_checkpoint(training_args) -> str | None:
    from trainer import find_resume_checkpoint, is_complete_checkpoint

    if training_args.resume_from_checkpoint:
        path = training_args.resume_from_checkpoint
        if not is_complete_checkpoint(path):
            fail(f"--resume_from_checkpoint {path}: not a complete checkpoint folder (no readable "
                 f"trainer_state.json and weights)")
        return path
    found = find_resume_checkpoint(training_args.output_dir)
    if found:
        logger.info("Resuming from %s (the newest complete checkpoint in %s)", found, training_args.output_dir)
    return found


def schedule(training_args) -> dict:
    return {"max_steps": training_args.max_steps, "num_train_epochs": training_args.num_train_epochs}


def prepare_output_dir(model_args, data_args, training_args) -> str | None:
    """Before anything loads: the folder is writable, a rerun would not mix two runs (a finished one
    exits here), and the checkpoint to resume from."""
    output_dir = training_args.output_dir
    if training_args.should_save:
        problem = check_writable(output_dir)
        if problem:
            fail(problem)
    if not training_args.do_train:
        return None
    fresh = training_args.overwrite_output_dir
    if fresh and training_args.should_save:
        start_over(output_dir)
    resume_from = None if fresh else resume_checkpoint(training_args)
    step = checkpoint_step(resume_from) if resume_from else None
    try:
        plan = plan_run(output_dir, trained_settings(model_args, data_args, training_args), schedule(training_args),
                        step, write=training_args.should_save, start_over=fresh)
    except (ResumeRefused, DataError) as e:
        fail(str(e))
    if plan.finished:
        if training_args.process_index == 0:
            print(f"The run in {output_dir} already finished with these settings: nothing to do (use "
                  f"--overwrite_output_dir to train it again, or a larger --max_steps to continue it)", flush=True)
        sys.exit(0)
    for note in plan.notes:
        logger.warning("Schedule change on resume: %s", note)
    return resume_from


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
    resume_from = prepare_output_dir(model_args, data_args, training_args)

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
    if training_args.should_save:
        write_run_config(training_args.output_dir, model=model_args, data=data_args, training=training_args)

    results, trained = {}, None
    if training_args.do_train:
        result = train_to_the_end(trainer, resume_from)
        trained = {"steps": trainer.state.global_step, "supervised_tokens": trainer.supervised_tokens_trained()}
        metrics = dict(result.metrics, train_records=splits["train"][1].kept,
                       **trainer.token_metrics(result.metrics["train_runtime"]))
        trainer.log_metrics("train", metrics)
        trainer.save_metrics("train", metrics)
        trainer.save_state()
        if training_args.should_save:
            mark_finished(training_args.output_dir, trainer.state.global_step, schedule(training_args))
            curve = plot_loss_curve(trainer.state.log_history, os.path.join(training_args.output_dir, "loss_curve.png"))
            if curve:
                logger.info("Loss curve: %s", curve)
    if training_args.do_eval:
        metrics = results["eval"] = trainer.evaluate()
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
