"""Damaged checkpoints of every kind the toolkit writes (P-Tuning prefix, LoRA adapter, full model;
DeepSpeed's global_stepN in test_deepspeed.py), damaged for real after a run: the rerun names the
damaged one in one line, sets it aside and resumes from the newest good one, with the optimizer and
the learning-rate schedule of that checkpoint (never fresh ones); with no good one left it exits 2
naming what is wrong, before anything changes. Never a traceback."""

import json
import os
import shutil

import pytest

from chatglm3_finetune.train.checkpoints import NoGoodCheckpoint, choose_checkpoint
from conftest import run_finetune
from test_finetune import common_args
from test_run_record import snapshot

pytestmark = pytest.mark.slow

KINDS = {
    "ptuning": ["--pre_seq_len", "4", "--learning_rate", "2e-2"],
    "lora": ["--lora_rank", "4", "--lora_alpha", "8", "--lora_target", "q_proj,v_proj", "--learning_rate", "1e-2"],
    "full": ["--learning_rate", "1e-3"],
}
LEARNING_RATES = {"ptuning": 2e-2, "lora": 1e-2, "full": 1e-3}


def kind_args(kind, model_dir, data, output_dir, max_steps):
    return common_args(model_dir, data, output_dir, *KINDS[kind], "--max_steps", str(max_steps), "--save_steps", "2",
                       "--save_total_limit", "2", "--max_train_samples", "8", "--seed", "7")


@pytest.fixture(scope="module")
def trained(tiny_model_dir, formatted_samples, tmp_path_factory):
    """{kind: output folder} of a finished 4-step run with checkpoint-2 and checkpoint-4 (runs once per kind)."""
    folders = {}

    def get(kind):
        if kind not in folders:
            output_dir = tmp_path_factory.mktemp(kind) / "run"
            run_finetune(*kind_args(kind, tiny_model_dir, formatted_samples["multi-turn"], output_dir, 4))
            folders[kind] = output_dir
        return folders[kind]
    return get


def copy_of(folder, tmp_path):
    target = tmp_path / "run"
    shutil.copytree(folder, target)
    return target


def zero(path):
    path.write_bytes(b"\0" * path.stat().st_size)


DAMAGES = {
    "truncated": lambda path: os.truncate(path, path.stat().st_size // 2),
    "zeroed": zero,
    "removed": os.remove,
}
FILES = {"ptuning": ["prefix_encoder.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"],
         "lora": ["adapter_model.safetensors", "adapter_config.json", "optimizer.pt", "scheduler.pt"],
         "full": ["model.safetensors", "config.json", "optimizer.pt", "scheduler.pt"]}


@pytest.mark.parametrize("kind", KINDS)
def test_every_file_of_every_kind_damaged_in_every_way_is_caught(trained, kind, tmp_path):
    for name in FILES[kind]:
        for how, damage in DAMAGES.items():
            output_dir = tmp_path / f"{name}-{how}"
            shutil.copytree(trained(kind) / "checkpoint-4", output_dir / "checkpoint-4")
            shutil.copytree(trained(kind) / "checkpoint-2", output_dir / "checkpoint-2")
            damage(output_dir / "checkpoint-4" / name)
            choice = choose_checkpoint(str(output_dir))
            assert choice.path == str(output_dir / "checkpoint-2"), (name, how)
            (path, problem), = choice.damaged
            assert path == str(output_dir / "checkpoint-4") and problem.startswith(name), (name, how, problem)
            damage(output_dir / "checkpoint-2" / name)
            with pytest.raises(NoGoodCheckpoint):
                choose_checkpoint(str(output_dir))


@pytest.mark.parametrize("kind, name, how", [("ptuning", "scheduler.pt", "removed"),
                                             ("lora", "adapter_model.safetensors", "zeroed"),
                                             ("full", "model.safetensors", "truncated")])
def test_the_rerun_resumes_from_the_newest_good_checkpoint_with_its_schedule(trained, kind, name, how,
                                                                             tiny_model_dir, formatted_samples, tmp_path):
    output_dir = copy_of(trained(kind), tmp_path)
    DAMAGES[how](output_dir / "checkpoint-4" / name)
    result = run_finetune(*kind_args(kind, tiny_model_dir, formatted_samples["multi-turn"], output_dir, 6), check=False)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    assert "Traceback" not in out
    (line,) = [line for line in out.splitlines() if "Not resuming from" in line]
    assert f"Not resuming from {output_dir / 'checkpoint-4'}: it is damaged ({name} " in line, line
    assert line.endswith(f"moved it to {output_dir / 'damaged-checkpoint-4'}"), line
    assert f"Resuming from {output_dir / 'checkpoint-2'}" in out
    state = json.loads((output_dir / "trainer_state.json").read_text())
    assert state["global_step"] == 6
    rates = {entry["step"]: entry["learning_rate"] for entry in state["log_history"] if "learning_rate" in entry}
    # the schedule of checkpoint-2 (linear decay over 4 steps), stretched to 6 from step 2 on: not a fresh one
    assert rates[3] == pytest.approx(LEARNING_RATES[kind] * (6 - 2) / 6)
    # --save_total_limit 2: the two newest complete ones are kept, the one set aside is left alone
    assert sorted(name for name in os.listdir(output_dir) if "checkpoint" in name) == [
        "checkpoint-4", "checkpoint-6", "damaged-checkpoint-4"]


def test_with_no_good_checkpoint_left_the_rerun_is_refused_naming_what_is_wrong(trained, tiny_model_dir,
                                                                                formatted_samples, tmp_path):
    output_dir = copy_of(trained("full"), tmp_path)
    zero(output_dir / "checkpoint-4" / "optimizer.pt")
    os.truncate(output_dir / "checkpoint-2" / "model.safetensors", 0)
    before = snapshot(output_dir)
    result = run_finetune(*kind_args("full", tiny_model_dir, formatted_samples["multi-turn"], output_dir, 6),
                          check=False)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line == (f"error: --output_dir {output_dir} holds no checkpoint that can be resumed from (checkpoint-4: "
                    f"optimizer.pt does not hold what was written (its checksum differs); checkpoint-2: "
                    f"model.safetensors has 0 bytes where "
                    f"{os.path.getsize(trained('full') / 'checkpoint-2' / 'model.safetensors'):,} were written). "
                    f"Nothing was changed: restore those files, or start over with --overwrite_output_dir (this "
                    f"removes its checkpoints)")
    assert "Resuming from" not in result.stdout and "Traceback" not in result.stderr
    assert snapshot(output_dir) == before

    # the same command as the finished run: its final model is intact, so there is nothing to do
    same = run_finetune(*kind_args("full", tiny_model_dir, formatted_samples["multi-turn"], output_dir, 4))
    assert "already finished with these settings: nothing to do" in same.stdout


def test_a_named_checkpoint_that_is_damaged_is_refused(trained, tiny_model_dir, formatted_samples, tmp_path):
    output_dir = copy_of(trained("ptuning"), tmp_path)
    zero(output_dir / "checkpoint-2" / "optimizer.pt")
    args = kind_args("ptuning", tiny_model_dir, formatted_samples["multi-turn"], output_dir, 6)
    result = run_finetune(*args, "--resume_from_checkpoint", str(output_dir / "checkpoint-2"), check=False)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"error: --resume_from_checkpoint {output_dir / 'checkpoint-2'}: not a complete checkpoint (optimizer.pt does "
        f"not hold what was written (its checksum differs)): name another, or leave the option out to resume from the "
        f"newest complete one")
