"""Choosing the checkpoint to resume from: the newest complete one; newer damaged ones are reported
and set aside, incomplete ones skipped; no good one among damaged ones refuses; the rotation keeps
complete checkpoints before incomplete ones."""

import json
import os

import pytest

from chatglm3_finetune.train.checkpoints import (NoGoodCheckpoint, checkpoint_problem, choose_checkpoint, rotate,
                                                 set_damaged_aside)
from chatglm3_finetune.train.manifest import write_manifest


def make_checkpoint(output_dir, step, max_steps=8, manifest=True, deepspeed=False):
    folder = output_dir / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "prefix_encoder.safetensors").write_bytes(os.urandom(256))
    if deepspeed:
        (folder / f"global_step{step}").mkdir()
        (folder / f"global_step{step}" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(os.urandom(64))
    else:
        (folder / "optimizer.pt").write_bytes(os.urandom(512))
        (folder / "scheduler.pt").write_bytes(os.urandom(64))
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step, "max_steps": max_steps}))
    if manifest:
        write_manifest(str(folder), step)
    return folder


def test_the_newest_complete_checkpoint_is_chosen(tmp_path):
    for step in (2, 4, 6):
        make_checkpoint(tmp_path, step)
    choice = choose_checkpoint(str(tmp_path))
    assert (choice.path, choice.global_step, choice.at_end) == (str(tmp_path / "checkpoint-6"), 6, False)
    assert choose_checkpoint(str(tmp_path / "none")).path is None


def test_a_checkpoint_at_the_end_of_its_schedule_says_so(tmp_path):
    make_checkpoint(tmp_path, 8, max_steps=8)
    assert choose_checkpoint(str(tmp_path)).at_end


def test_damaged_and_incomplete_newer_checkpoints_are_reported_and_the_damaged_set_aside(tmp_path):
    make_checkpoint(tmp_path, 2)
    os.remove(make_checkpoint(tmp_path, 4) / "scheduler.pt")
    make_checkpoint(tmp_path, 6, manifest=False)
    choice = choose_checkpoint(str(tmp_path))
    assert choice.path == str(tmp_path / "checkpoint-2")
    assert choice.damaged == [(str(tmp_path / "checkpoint-4"), "scheduler.pt is missing")]
    assert choice.incomplete == [(str(tmp_path / "checkpoint-6"), "no manifest.json: its save did not complete")]
    notes = set_damaged_aside(choice)
    assert notes == [f"Not resuming from {tmp_path / 'checkpoint-4'}: it is damaged (scheduler.pt is missing); moved it "
                     f"to {tmp_path / 'damaged-checkpoint-4'}",
                     f"Not resuming from {tmp_path / 'checkpoint-6'}: it is incomplete (no manifest.json: its save did "
                     f"not complete)"]
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-2", "checkpoint-6", "damaged-checkpoint-4"]


def test_only_incomplete_checkpoints_mean_a_fresh_start(tmp_path):
    make_checkpoint(tmp_path, 2, manifest=False)
    choice = choose_checkpoint(str(tmp_path))
    assert choice.path is None and len(choice.incomplete) == 1


def test_no_good_checkpoint_among_damaged_ones_is_refused_naming_each(tmp_path):
    folder = make_checkpoint(tmp_path, 2)
    (folder / "optimizer.pt").write_bytes(b"\0" * 512)
    os.truncate(make_checkpoint(tmp_path, 4) / "prefix_encoder.safetensors", 10)
    with pytest.raises(NoGoodCheckpoint) as refused:
        choose_checkpoint(str(tmp_path))
    message = str(refused.value)
    assert message.startswith(f"--output_dir {tmp_path} holds no checkpoint that can be resumed from (checkpoint-4: "
                              f"prefix_encoder.safetensors has 10 bytes where 256 were written; checkpoint-2: "
                              f"optimizer.pt does not hold what was written")
    assert message.endswith("restore those files, or start over with --overwrite_output_dir (this removes its "
                            "checkpoints)")
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-2", "checkpoint-4"]  # nothing changed


def test_checkpoints_written_before_manifests_need_their_resume_files(tmp_path):
    make_checkpoint(tmp_path, 2, manifest=False)
    make_checkpoint(tmp_path, 3, manifest=False, deepspeed=True)
    os.remove(make_checkpoint(tmp_path, 4, manifest=False) / "optimizer.pt")
    assert checkpoint_problem(str(tmp_path / "checkpoint-4"), legacy=True) == ("incomplete", "optimizer.pt is missing")
    assert checkpoint_problem(str(tmp_path / "checkpoint-3"), legacy=True) is None
    assert choose_checkpoint(str(tmp_path), legacy_up_to_step=4).path == str(tmp_path / "checkpoint-3")
    assert choose_checkpoint(str(tmp_path), legacy_up_to_step=0).path is None


def test_rotation_removes_incomplete_then_the_oldest_complete(tmp_path):
    for step in (1, 2, 3):
        make_checkpoint(tmp_path, step)
    make_checkpoint(tmp_path, 9, manifest=False)  # left by an interrupted session
    make_checkpoint(tmp_path, 4)
    rotate(str(tmp_path), 2, keep=(str(tmp_path / "checkpoint-4"), str(tmp_path / "checkpoint-1")))
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-1", "checkpoint-4"]
    rotate(str(tmp_path), None)
    assert len(os.listdir(tmp_path)) == 2


def test_the_step_of_a_checkpoint_comes_from_its_name_or_its_state(tmp_path):
    from chatglm3_finetune.train.checkpoints import checkpoint_step

    make_checkpoint(tmp_path, 6)
    renamed = tmp_path / "best"
    os.rename(tmp_path / "checkpoint-6", renamed)
    assert checkpoint_step(str(tmp_path / "checkpoint-12")) == 12
    assert checkpoint_step(str(renamed)) == 6
