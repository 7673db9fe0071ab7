"""Where a run starts, decided on the main process before anything is written and then shared with
every rank: the output folder is apart from the inputs, writable and this run's alone (its lock);
then the checkpoint to resume from (the newest complete one, newer damaged ones set aside) and the
run record's verdict: a refusal, nothing to do, only the final model to write, or training."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from ..data.records import DataError
from .checkpoints import (Choice, NoGoodCheckpoint, checkpoint_problem, checkpoint_step, choose_checkpoint,
                          read_trainer_state, set_damaged_aside)
from .output_folder import check_writable, near_inputs_problem, start_over
from .run_lock import FolderLocked, RunLock
from .run_record import ResumeRefused, legacy_checkpoints_up_to, plan_run, trained_settings

logger = logging.getLogger(__name__)


def schedule(training_args) -> dict:
    return {"max_steps": training_args.max_steps, "num_train_epochs": training_args.num_train_epochs}


@dataclass
class Start:
    """What the main process decided about the output folder, shared with every rank."""
    error: str | None = None  # refused: the one line to print (exit 2)
    resume_from: str | None = None
    finished: bool = False  # nothing to do
    finish_from: str | None = None  # training ended at this checkpoint: only the final model is to write


def input_paths(model_args, data_args) -> dict:
    """The inputs the output folder must keep apart from, by option name."""
    return {"--model_name_or_path": model_args.model_name_or_path, "--tokenizer_name": model_args.tokenizer_name,
            "--ptuning_checkpoint": model_args.ptuning_checkpoint, "--train_file": data_args.train_file,
            "--validation_file": data_args.validation_file, "--test_file": data_args.test_file}


def decide_start(model_args, data_args, training_args, lock: RunLock) -> tuple[Start, object]:
    """On the main process only, before anything is written: the output folder is apart from the inputs,
    writable and this run's alone (the lock); then which checkpoint to resume from, and the plan."""
    output_dir = training_args.output_dir
    problem = (None if training_args.allow_output_near_inputs
               else near_inputs_problem(output_dir, input_paths(model_args, data_args)))
    problem = problem or check_writable(output_dir)
    if problem:
        return Start(error=problem), None
    try:
        lock.acquire()
    except FolderLocked as e:
        return Start(error=str(e)), None
    if not training_args.do_train:
        return Start(), None
    fresh = training_args.overwrite_output_dir
    if fresh:
        start_over(output_dir)
    choice, no_good = None, None
    try:
        choice = None if fresh else resume_choice(training_args)
    except NoGoodCheckpoint as e:
        no_good = e  # refused below, unless the run finished and its final model is intact
    step = choice.global_step if choice else None
    try:
        settings = trained_settings(model_args, data_args, training_args)  # DataError: a data path that is no file
        plan = plan_run(output_dir, settings, schedule(training_args), step, write=False, start_over=fresh,
                        checkpoint_at_end=bool(choice and choice.at_end))
    except DataError as e:
        return Start(error=str(e)), None
    except ResumeRefused as e:
        return Start(error=str(no_good or e)), None
    if plan.finished:
        return Start(finished=True), plan
    if no_good:
        return Start(error=str(no_good)), None
    for note in set_damaged_aside(choice) if choice else []:
        logger.warning(note)
    if plan.finish_from_checkpoint:
        return Start(finish_from=choice.path), plan
    if choice and choice.path:
        logger.info("Resuming from %s (the newest complete checkpoint in %s)", choice.path, output_dir)
    for note in plan.notes:
        logger.warning("Schedule change on resume: %s", note)
    return Start(resume_from=choice.path if choice else None), plan


def resume_choice(training_args):
    """The checkpoint to resume from: --resume_from_checkpoint, checked, or the newest complete one."""
    path = training_args.resume_from_checkpoint
    if not path:
        return choose_checkpoint(training_args.output_dir, legacy_checkpoints_up_to(training_args.output_dir))
    legacy_up_to = legacy_checkpoints_up_to(os.path.dirname(os.path.abspath(path)))
    problem = checkpoint_problem(path, legacy=legacy_up_to is not None and checkpoint_step(path) <= legacy_up_to)
    if problem:
        raise NoGoodCheckpoint(f"--resume_from_checkpoint {path}: not a complete checkpoint ({problem[1]}): name "
                               f"another, or leave the option out to resume from the newest complete one")
    state = read_trainer_state(path)
    return Choice(path=path, global_step=state["global_step"], max_steps=state.get("max_steps"))


def shared_from_main(value, training_args):
    """`value` of the main process, on every process (all of them call this at the same point)."""
    import torch.distributed as dist

    if training_args.world_size > 1 and dist.is_available() and dist.is_initialized():
        box = [value]
        device = training_args.device if training_args.device.type == "cuda" else None
        dist.broadcast_object_list(box, src=0, device=device)
        return box[0]
    return value
