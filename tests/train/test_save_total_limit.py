"""SAVE_TOTAL_LIMIT (--save_total_limit) through the launchers on the CPU: the Trainer's rotation keeps
exactly the newest checkpoints, with the project's own prefix saving (P-Tuning) and with time-based
saves (--save_every_minutes) of full fine-tuning under DeepSpeed, and the rerun resumes from the
newest. A save interrupted by a crash (a checkpoint folder without its trainer state) never displaces
the newest complete checkpoint."""

import json
from pathlib import Path

import pytest

from test_launchers import formatted_data, losses_of, run_launcher, tiny_run  # noqa: F401 (a fixture)


def checkpoints(output_dir: Path) -> list[str]:
    return sorted((path.name for path in output_dir.glob("checkpoint-*")), key=lambda name: int(name.split("-")[1]))


def logged_steps(output_dir: Path) -> list[int]:
    state = json.loads((output_dir / "trainer_state.json").read_text())
    return [entry["step"] for entry in state["log_history"] if "loss" in entry]


def launch(launcher: str, **variables):
    result = run_launcher(launcher, **variables)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_ptuning_keeps_the_two_newest_checkpoints_and_resumes_from_the_newest(tiny_model_dir, formatted_data,
                                                                            tmp_path):
    from chatglm3_finetune.train.checkpoints import checkpoint_problem

    output_dir = tmp_path / "run"

    def variables(max_step):
        return tiny_run(tiny_model_dir, formatted_data["input-output"], output_dir, tmp_path / "cache",
                        MAX_STEP=max_step, SAVE_INTERVAL=1, SAVE_TOTAL_LIMIT=2)

    launch("finetune_pt.sh", **variables(3))
    assert checkpoints(output_dir) == ["checkpoint-2", "checkpoint-3"]
    interrupted = output_dir / "checkpoint-9"  # a save that a crash cut short: weights, no trainer state
    interrupted.mkdir()
    (interrupted / "prefix_encoder.safetensors").write_bytes(b"partial")
    resumed = launch("finetune_pt.sh", **variables(5))
    assert f"Resuming from {output_dir / 'checkpoint-3'}" in resumed.stdout
    assert checkpoints(output_dir) == ["checkpoint-4", "checkpoint-5"]
    assert all(checkpoint_problem(str(output_dir / name)) is None for name in checkpoints(output_dir))
    assert logged_steps(output_dir) == [1, 2, 3, 4, 5]


@pytest.mark.slow
def test_time_based_saves_of_full_fine_tuning_keep_the_launchers_default_of_two(tiny_model_dir, formatted_data,
                                                                               tmp_path):
    """finetune_ds.sh (ZeRO-2, one CPU process): no step saves, a time-based save due after every step,
    SAVE_TOTAL_LIMIT left at the full fine-tuning default (2)."""
    from chatglm3_finetune.train.checkpoints import checkpoint_problem

    output_dir = tmp_path / "run"

    def variables(max_step):
        return tiny_run(tiny_model_dir, formatted_data["input-output"], output_dir, tmp_path / "cache",
                        MAX_STEP=max_step, SAVE_INTERVAL=1000, SAVE_EVERY_MINUTES="0.00001", LR="1e-3",
                        EXTRA_ARGS=f"--report_to none --max_train_samples 2 --disable_tqdm true "
                                   f"--preprocessing_cache_dir {tmp_path / 'cache'}")

    first = launch("finetune_ds.sh", **variables(3))
    assert "--save_total_limit 2" in first.stderr.splitlines()[0]
    assert checkpoints(output_dir) == ["checkpoint-2", "checkpoint-3"]
    assert (output_dir / "checkpoint-3" / "global_step3").is_dir()  # DeepSpeed's own states, removed with it
    resumed = launch("finetune_ds.sh", **variables(4))
    assert f"Resuming from {output_dir / 'checkpoint-3'}" in resumed.stdout
    assert checkpoints(output_dir) == ["checkpoint-3", "checkpoint-4"]
    assert all(checkpoint_problem(str(output_dir / name)) is None for name in checkpoints(output_dir))
    assert logged_steps(output_dir) == [1, 2, 3, 4]
    assert len(losses_of(output_dir)) == 4
