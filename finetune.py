#!/usr/bin/env python3
"""Fine-tune a ChatGLM3-family model: full fine-tuning (DeepSpeed ZeRO), P-Tuning v2 or LoRA.

    python finetune.py --model_name_or_path MODEL --train_format multi-turn \\
        --train_file formatted_data/tool_alpaca.jsonl --output_dir output/run --do_train \\
        --pre_seq_len 128 --max_steps 1000 --learning_rate 2e-2
    python finetune.py args.json      # one .json or .yaml file instead of the flags

Rerunning the same command into the same --output_dir continues from its newest complete
checkpoint; --resume_from_checkpoint PATH names one.
"""

from __future__ import annotations

import logging
import os
import sys

# bitsandbytes warns at import, on every CPU run, about an optional kernel download we never want.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

import transformers  # noqa: E402
from transformers import set_seed  # noqa: E402

from arguments import OptionError, check_options, parse_args  # noqa: E402
from chatglm3_finetune.collation import build_collator  # noqa: E402
from chatglm3_finetune.encoding import print_sanity_check  # noqa: E402
from chatglm3_finetune.model_loading import ModelLoadError, load_for_training  # noqa: E402
from chatglm3_finetune.records import DataError  # noqa: E402
from chatglm3_finetune.supervised_loss import use_supervised_loss  # noqa: E402
from chatglm3_finetune.tokenizer import load_tokenizer  # noqa: E402
from chatglm3_finetune.training_data import load_split, pack_dataset  # noqa: E402

logger = logging.getLogger("finetune")


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def setup_logging(training_args) -> None:
    level = logging.INFO if training_args.should_log else logging.WARNING
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        handlers=[logging.StreamHandler(sys.stdout)], level=level)
    transformers.utils.logging.set_verbosity(level)
    transformers.utils.logging.enable_explicit_format()


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


def main(argv: list[str] | None = None) -> None:
    model_args, data_args, training_args = parse_args(argv)
    try:
        check_options(model_args, data_args, training_args)
    except OptionError as e:
        fail(str(e))
    setup_logging(training_args)
    if training_args.activation_checkpointing and not training_args.activation_checkpointing_kwargs:
        training_args.activation_checkpointing_kwargs = {"use_reentrant": False}
    set_seed(training_args.seed)

    try:
        tokenizer = load_tokenizer(model_args.tokenizer_name or model_args.model_name_or_path)
    except FileNotFoundError as e:
        fail(str(e))

    splits = {}
    generating = training_args.predict_with_generate and (training_args.do_eval or training_args.do_predict)
    try:
        if training_args.do_train:
            splits["train"] = load_split(data_args.train_file, data_args.max_train_samples, tokenizer,
                                         data_args, training_args, "training", data_args.train_split, "--train_split")
        if training_args.do_eval and not generating:
            splits["eval"] = load_split(data_args.validation_file, data_args.max_eval_samples, tokenizer, data_args,
                                        training_args, "validation", data_args.validation_split, "--validation_split")
        if training_args.do_predict and not generating:
            splits["test"] = load_split(data_args.test_file, data_args.max_predict_samples, tokenizer,
                                        data_args, training_args, "test", data_args.test_split, "--test_split")
        if generating:  # prompt-only splits, scored with ROUGE/BLEU (+ tool calls) in evaluation.py
            from chatglm3_finetune.evaluation import GenerationEval

            generation = GenerationEval.from_args(tokenizer, data_args, training_args)
            splits.update({name: (dataset, None) for name, dataset in generation.datasets.items()})
    except DataError as e:
        fail(str(e))
    if "train" in splits and training_args.process_index == 0:
        first = splits["train"][0][0]
        print_sanity_check(tokenizer, first["input_ids"], first["labels"])
    train_dataset = splits.get("train", (None,))[0]
    if train_dataset is not None and data_args.packing:
        train_dataset = pack_dataset(train_dataset, data_args)

    resume_from = resume_checkpoint(training_args) if training_args.do_train else None
    if training_args.deepspeed and training_args.world_size > 1:
        start_deepspeed_comm()
    try:
        model = load_for_training(model_args, training_args)
    except ModelLoadError as e:
        fail(str(e))
    if data_args.loss_on_targets_only:
        use_supervised_loss(model)

    from trainer import ChatGLMTrainer, plot_loss_curve, write_run_config

    trainer = ChatGLMTrainer(
        model=model, args=training_args, train_dataset=train_dataset,
        eval_dataset=splits.get("eval", (None,))[0], data_collator=build_collator(tokenizer, data_args),
        processing_class=tokenizer, compute_metrics=generation.compute_metrics if generating else None,
        max_new_tokens=data_args.max_target_length,
    )
    if training_args.should_save:
        write_run_config(training_args.output_dir, model=model_args, data=data_args, training=training_args)

    if training_args.do_train:
        result = trainer.train(resume_from_checkpoint=resume_from)
        trainer.save_model()
        metrics = dict(result.metrics, train_records=splits["train"][1].kept,
                       train_supervised_tokens=splits["train"][1].targets)
        trainer.log_metrics("train", metrics)
        trainer.save_metrics("train", metrics)
        trainer.save_state()
        if training_args.should_save:
            curve = plot_loss_curve(trainer.state.log_history, os.path.join(training_args.output_dir, "loss_curve.png"))
            if curve:
                logger.info("Loss curve: %s", curve)
    if training_args.do_eval:
        metrics = trainer.evaluate()
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
    if training_args.do_predict:
        if generating:
            result = trainer.predict(splits["test"][0], metric_key_prefix="predict")
            metrics = result.metrics
        else:  # loss only: Trainer.predict would gather every logit
            metrics = trainer.evaluate(splits["test"][0], metric_key_prefix="predict")
        trainer.log_metrics("predict", metrics)
        trainer.save_metrics("predict", metrics)
        if generating and training_args.should_save:
            path = generation.write_predictions("test", result.predictions, result.label_ids,
                                                os.path.join(training_args.output_dir, "generated_predictions.jsonl"))
            logger.info("Generated predictions: %s", path)
    finish_distributed()


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
