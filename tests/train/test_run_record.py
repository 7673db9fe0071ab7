"""Rerunning into an output folder: resumes that would mix two runs are refused, a finished run is left
alone, schedule changes are applied and logged, --overwrite_output_dir starts over."""

import json
import os

import pytest

from chatglm3_finetune.train.manifest import describe, write_manifest
from chatglm3_finetune.train.run_record import ResumeRefused, mark_finished, plan_run, read_record
from test_finetune import common_args

SETTINGS = {"data": "/d/train.jsonl (sha256 0123)", "method": "ptuning", "pre_seq_len": 4, "deepspeed stage": 2,
            "learning_rate": 0.02}
SCHEDULE = {"max_steps": 8, "num_train_epochs": 3.0}


def write_final_model(output_dir, step):
    """A final model as the final save leaves it: its files, then their manifest."""
    (output_dir / "model.safetensors").write_bytes(b"weights" * 100)
    write_manifest(str(output_dir), step, describe(str(output_dir), ["model.safetensors"]))


# ---- the decisions, in-process -----------------------------------------------------------------------

def test_a_fresh_start_writes_the_record_and_a_resume_appends(tmp_path):
    assert not plan_run(str(tmp_path), SETTINGS, SCHEDULE, None, write=True).finished
    plan_run(str(tmp_path), SETTINGS, SCHEDULE, 4, write=True)
    record = read_record(str(tmp_path))
    assert record["trained"] == SETTINGS
    assert [start["resumed_from_step"] for start in record["starts"]] == [None, 4]


@pytest.mark.parametrize("change, listed", [
    ({"deepspeed stage": 3}, "deepspeed stage 2 -> 3"),
    ({"method": "full", "pre_seq_len": None}, "method 'ptuning' -> 'full'; pre_seq_len 4 -> None"),
    ({"pre_seq_len": 8}, "pre_seq_len 4 -> 8"),
    ({"learning_rate": 0.05}, "learning_rate 0.02 -> 0.05"),
])
def test_a_resume_with_other_settings_is_refused_with_the_differences(tmp_path, change, listed):
    plan_run(str(tmp_path), SETTINGS, SCHEDULE, None, write=True)
    before = (tmp_path / "run_record.json").read_text()
    with pytest.raises(ResumeRefused) as e:
        plan_run(str(tmp_path), {**SETTINGS, **change}, SCHEDULE, 4, write=True)
    assert f"trained with other settings ({listed})" in str(e.value)
    assert str(e.value).endswith("Use a new --output_dir, or --overwrite_output_dir to start over "
                                 "(this removes its checkpoints)")
    assert (tmp_path / "run_record.json").read_text() == before


def test_a_finished_run_is_left_alone_unless_its_final_files_are_gone(tmp_path):
    plan_run(str(tmp_path), SETTINGS, SCHEDULE, None, write=True)
    write_final_model(tmp_path, 8)
    mark_finished(str(tmp_path), 8, SCHEDULE)
    assert plan_run(str(tmp_path), SETTINGS, SCHEDULE, 8, write=True).finished
    assert len(read_record(str(tmp_path))["starts"]) == 1
    (tmp_path / "model.safetensors").write_bytes(b"")  # the final model is damaged (as if cut short)
    assert not plan_run(str(tmp_path), SETTINGS, SCHEDULE, 6, write=False).finished


def test_schedule_changes_are_applied_and_named_or_refused(tmp_path):
    plan_run(str(tmp_path), SETTINGS, SCHEDULE, None, write=True)
    write_final_model(tmp_path, 8)
    mark_finished(str(tmp_path), 8, SCHEDULE)
    plan = plan_run(str(tmp_path), SETTINGS, {**SCHEDULE, "max_steps": 12}, 8, write=False)
    assert plan.notes == ["max_steps 8 -> 12: applied from step 8 on (the learning-rate schedule now runs to the new end)"]
    with pytest.raises(ResumeRefused, match="already trained 8 steps, so --max_steps 6 leaves nothing to train"):
        plan_run(str(tmp_path), SETTINGS, {**SCHEDULE, "max_steps": 6}, 8, write=False)
    with pytest.raises(ResumeRefused, match="finished at step 8 and kept no checkpoint"):
        plan_run(str(tmp_path), SETTINGS, {**SCHEDULE, "max_steps": 12}, None, write=False)


def test_a_run_whose_final_save_was_cut_short_is_finished_from_its_last_checkpoint(tmp_path):
    plan_run(str(tmp_path), SETTINGS, SCHEDULE, None, write=True)
    plan = plan_run(str(tmp_path), SETTINGS, SCHEDULE, 8, write=False, checkpoint_at_end=True)
    assert plan.finish_from_checkpoint and not plan.finished
    # the same with a final model that was complete once and is damaged now
    write_final_model(tmp_path, 8)
    mark_finished(str(tmp_path), 8, SCHEDULE)
    (tmp_path / "model.safetensors").write_bytes(b"x" * 700)  # same size, other bytes
    assert plan_run(str(tmp_path), SETTINGS, SCHEDULE, 8, write=False, checkpoint_at_end=True).finish_from_checkpoint
    # another schedule continues the training instead
    plan = plan_run(str(tmp_path), SETTINGS, {**SCHEDULE, "max_steps": 12}, 8, write=False, checkpoint_at_end=True)
    assert not plan.finish_from_checkpoint and plan.notes


def test_the_record_is_written_only_when_the_start_is_saved(tmp_path):
    plan = plan_run(str(tmp_path), SETTINGS, SCHEDULE, None, write=False)
    assert not (tmp_path / "run_record.json").exists()
    plan.save_start(str(tmp_path))
    assert read_record(str(tmp_path))["manifests_from_step"] == 0


@pytest.mark.parametrize("name, old, new", [("max_grad_norm", 1.0, 0.5), ("adam_beta1", 0.9, 0.8),
                                            ("adam_beta2", 0.999, 0.95), ("adam_epsilon", 1e-8, 1e-6),
                                            ("weight_decay", 0.0, 0.1)])
def test_clipping_and_adam_settings_are_compared_on_resume(tmp_path, name, old, new):
    plan_run(str(tmp_path), {**SETTINGS, name: old}, SCHEDULE, None, write=True)
    with pytest.raises(ResumeRefused, match=f"trained with other settings \\({name} {old!r} -> {new!r}\\)"):
        plan_run(str(tmp_path), {**SETTINGS, name: new}, SCHEDULE, 4, write=False)


def test_a_record_written_before_the_adam_settings_were_compared_still_resumes(tmp_path):
    plan_run(str(tmp_path), SETTINGS, SCHEDULE, None, write=True)  # no max_grad_norm or adam_* in it
    later = {"max_grad_norm": 1.0, "adam_beta1": 0.9, "adam_beta2": 0.999, "adam_epsilon": 1e-8}
    assert not plan_run(str(tmp_path), {**SETTINGS, **later}, SCHEDULE, 4, write=False).finished


def test_trained_settings_hold_clipping_and_adam(tmp_path):
    from arguments import parse_args
    from chatglm3_finetune.train.run_record import trained_settings

    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "response": "b"}\n')
    model_args, data_args, training_args = parse_args([
        "--model_name_or_path", str(tmp_path), "--train_format", "input-output", "--train_file", str(data),
        "--output_dir", str(tmp_path / "o"), "--max_grad_norm", "0.3", "--adam_beta2", "0.95", "--use_cpu"])
    settings = trained_settings(model_args, data_args, training_args)
    assert (settings["max_grad_norm"], settings["adam_beta1"], settings["adam_beta2"], settings["adam_epsilon"]) == (
        0.3, 0.9, 0.95, 1e-8)


# ---- end to end ---------------------------------------------------------------------------------------

def snapshot(folder) -> dict:
    return {os.path.join(root, name): (os.stat(os.path.join(root, name)).st_mtime_ns, os.path.getsize(os.path.join(root, name)))
            for root, _, names in os.walk(folder) for name in names}


@pytest.mark.slow
def test_reruns_into_a_finished_run(tiny_model_dir, formatted_samples, tmp_path, finetune_in_process):
    output_dir = tmp_path / "o"

    def args(*extra, data=formatted_samples["multi-turn"]):
        return common_args(tiny_model_dir, data, output_dir, "--pre_seq_len", "4", "--save_steps", "2",
                           "--learning_rate", "2e-2", *extra)

    assert finetune_in_process(*args("--max_steps", "4")).returncode == 0
    before = snapshot(output_dir)

    result = finetune_in_process(*args("--max_steps", "4"))  # the same command again
    assert result.returncode == 0
    assert "already finished with these settings: nothing to do" in result.stdout
    assert "Loading weights" not in result.stdout + result.stderr and snapshot(output_dir) == before
    assert "Resuming from" not in result.stdout + result.stderr  # it did not resume: nothing to say so

    other = tmp_path / "other.jsonl"
    other.write_text("".join(open(formatted_samples["multi-turn"]).readlines()[:5]))
    result = finetune_in_process(*args("--max_steps", "4", data=str(other)))
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error: --output_dir {output_dir} holds a run that trained with other settings (data ")
    assert snapshot(output_dir) == before

    result = finetune_in_process(*args("--max_steps", "4", "--learning_rate", "5e-2"))
    assert result.returncode == 2 and "learning_rate 0.02 -> 0.05" in result.stderr
    assert "Resuming from" not in result.stdout + result.stderr

    result = finetune_in_process(*args("--max_steps", "6", "--max_grad_norm", "0.5", "--adam_beta2", "0.95"))
    assert result.returncode == 2
    assert "adam_beta2 0.999 -> 0.95; max_grad_norm 1.0 -> 0.5" in result.stderr
    assert snapshot(output_dir) == before

    result = finetune_in_process(*args("--max_steps", "2"))
    assert result.returncode == 2 and "already trained 4 steps, so --max_steps 2 leaves nothing to train" in result.stderr
    assert snapshot(output_dir) == before

    result = finetune_in_process(*args("--max_steps", "6"))  # continue: the schedule runs to the new end, logged
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Schedule change on resume: max_steps 4 -> 6: applied from step 4 on" in result.stdout + result.stderr
    state = json.loads((output_dir / "trainer_state.json").read_text())
    rates = {entry["step"]: entry["learning_rate"] for entry in state["log_history"] if "learning_rate" in entry}
    assert state["global_step"] == 6
    assert rates[5] == pytest.approx(2e-2 * (6 - 4) / 6) and rates[6] == pytest.approx(2e-2 * (6 - 5) / 6)

    result = finetune_in_process(*args("--max_steps", "2", "--overwrite_output_dir"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "--overwrite_output_dir: removed the previous run's" in result.stdout + result.stderr
    assert sorted(name for name in os.listdir(output_dir) if name.startswith("checkpoint-")) == ["checkpoint-2"]
    record = json.loads((output_dir / "run_record.json").read_text())
    assert len(record["starts"]) == 1 and record["finished"]["global_step"] == 2


def test_an_unusable_output_folder_fails_before_loading(tiny_model_dir, formatted_samples, tmp_path,
                                                        finetune_in_process):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = finetune_in_process(*common_args(tiny_model_dir, formatted_samples["multi-turn"], blocker / "out"))
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: --output_dir {blocker / 'out'}: cannot write there (")
    assert "GiB free" in result.stderr and "Loading weights" not in result.stdout + result.stderr


@pytest.mark.slow
def test_a_checkpoint_that_cannot_be_written_exits_4_and_keeps_the_earlier_ones(tiny_model_dir, formatted_samples,
                                                                                  tmp_path, finetune_in_process):
    output_dir = tmp_path / "o"
    output_dir.mkdir()
    (output_dir / "checkpoint-2").write_text("in the way")  # the save of step 2 fails for real
    result = finetune_in_process(*common_args(tiny_model_dir, formatted_samples["multi-turn"], output_dir,
                                              "--pre_seq_len", "4", "--max_steps", "4", "--save_steps", "1"))
    assert result.returncode == 4, result.stderr[-3000:]
    errors = [line[line.index("error: "):] for line in result.stderr.splitlines() if "error: " in line]
    assert len(errors) == 1 and errors[0].startswith(f"error: could not write {output_dir / 'checkpoint-2'}: ")
    assert "GiB free" in errors[0] and "rerun the same command to resume" in errors[0]
    assert "Traceback" not in result.stderr
    assert os.path.isfile(output_dir / "checkpoint-1" / "trainer_state.json")
