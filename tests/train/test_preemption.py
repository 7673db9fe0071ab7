"""Stop requests: SIGTERM/SIGINT save a checkpoint and exit 75, the rerun finishes as if never stopped;
a second Ctrl-C exits at once; --save_every_minutes saves on time."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from conftest import ROOT
from test_finetune import common_args, prefix_weights

pytestmark = pytest.mark.slow


class Running:
    """A training process whose merged output is read as it comes."""

    def __init__(self, command: list[str], **popen_options):
        env = {**os.environ, "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        env=env, cwd=str(ROOT), **popen_options)
        self.lines = []
        threading.Thread(target=lambda: self.lines.extend(self.process.stdout), daemon=True).start()

    def wait_for_logged_steps(self, count: int, timeout: float = 240) -> None:
        deadline = time.time() + timeout
        while sum("'loss':" in line for line in self.lines) < count:
            assert self.process.poll() is None, "".join(self.lines)[-3000:]
            assert time.time() < deadline, "".join(self.lines)[-3000:]
            time.sleep(0.02)

    def finish(self, timeout: float = 240) -> tuple[int, str]:
        code = self.process.wait(timeout=timeout)
        time.sleep(0.1)
        return code, "".join(self.lines)


def checkpoints(output_dir) -> list[int]:
    return sorted(int(name.split("-")[1]) for name in os.listdir(output_dir) if name.startswith("checkpoint-"))


def final_state(output_dir) -> dict:
    return json.loads((output_dir / "trainer_state.json").read_text())


def test_sigterm_saves_then_the_rerun_equals_an_uninterrupted_run(tiny_model_dir, formatted_samples, tmp_path,
                                                                   finetune_in_process):
    """The stopped run is a real process (the signal and its exit code are the point); the uninterrupted
    run and the rerun only produce weights and records to compare, so they run in-process."""
    def args(output_dir):
        return common_args(tiny_model_dir, formatted_samples["multi-turn"], output_dir, "--pre_seq_len", "4",
                           "--max_steps", "8", "--save_steps", "1000", "--learning_rate", "2e-2", "--seed", "7")

    uninterrupted = tmp_path / "whole"
    whole_run = finetune_in_process(*args(uninterrupted))
    assert whole_run.returncode == 0, whole_run.stderr[-3000:]

    output_dir = tmp_path / "stopped"
    run = Running([sys.executable, str(ROOT / "finetune.py"), *args(output_dir)])
    run.wait_for_logged_steps(2)
    run.process.send_signal(signal.SIGTERM)
    code, output = run.finish()
    assert code == 75, output[-3000:]
    assert "SIGTERM received: finishing this optimizer step, then saving a checkpoint" in output
    (step,) = checkpoints(output_dir)
    assert 2 <= step < 8
    assert f"Stopped at step {step} with a complete checkpoint: rerun the same command to resume" in output
    assert not (output_dir / "prefix_encoder.safetensors").exists()
    assert json.loads((output_dir / "run_record.json").read_text())["finished"] is None

    result = finetune_in_process(*args(output_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Resuming from {output_dir / f'checkpoint-{step}'}" in result.stdout + result.stderr
    for name, tensor in prefix_weights(uninterrupted).items():
        torch.testing.assert_close(prefix_weights(output_dir)[name], tensor, rtol=0, atol=1e-6)
    # the run's totals survive the stop: supervised tokens and the train loss cover all 8 steps
    whole, resumed = final_state(uninterrupted), final_state(output_dir)
    assert resumed["global_step"] == 8
    tokens = [[entry["supervised_tokens"] for entry in state["log_history"] if "loss" in entry] for state in (whole, resumed)]
    assert tokens[0] == tokens[1]
    losses = [json.loads((folder / "train_results.json").read_text())["train_loss"] for folder in (uninterrupted, output_dir)]
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    record = json.loads((output_dir / "run_record.json").read_text())
    assert [start["resumed_from_step"] for start in record["starts"]] == [None, step]
    assert record["finished"]["global_step"] == 8


def test_a_second_ctrl_c_exits_at_once(tiny_model_dir, formatted_samples, tmp_path):
    output_dir = tmp_path / "o"
    run = Running([sys.executable, str(ROOT / "finetune.py"), *common_args(
        tiny_model_dir, formatted_samples["multi-turn"], output_dir, "--pre_seq_len", "4", "--max_steps", "50",
        "--save_steps", "1000", "--gradient_accumulation_steps", "10")])
    run.wait_for_logged_steps(1)
    # 10 micro-batches per optimizer step: the first SIGINT lands mid-step, so the second one comes
    # while the step is still being finished, before any save
    run.process.send_signal(signal.SIGINT)
    time.sleep(0.05)
    run.process.send_signal(signal.SIGINT)
    code, output = run.finish(timeout=30)
    assert code == 130, output[-2000:]
    assert "second interrupt: exiting now without saving" in output


def test_save_every_minutes_saves_on_time(tiny_model_dir, formatted_samples, tmp_path, finetune_in_process):
    output_dir = tmp_path / "o"
    result = finetune_in_process(*common_args(tiny_model_dir, formatted_samples["multi-turn"], output_dir,
                                              "--pre_seq_len", "4", "--max_steps", "4", "--save_steps", "1000",
                                              "--save_every_minutes", "0.00001"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "(--save_every_minutes 1e-05)" in result.stdout + result.stderr
    assert len(checkpoints(output_dir)) >= 3


def test_sigterm_to_torchrun_with_two_ranks_saves_one_step_then_resumes(tiny_model_dir, formatted_samples, tmp_path):
    output_dir = tmp_path / "ddp"
    args = common_args(tiny_model_dir, formatted_samples["multi-turn"], output_dir, "--pre_seq_len", "4",
                       "--max_steps", "10", "--save_steps", "1000", "--seed", "7")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
                str(ROOT / "finetune.py"), *args]
    run = Running(launcher)
    run.wait_for_logged_steps(2)
    run.process.send_signal(signal.SIGTERM)
    code, output = run.finish()
    assert code != 0
    assert output.count("SIGTERM received") == 2, output[-3000:]  # each rank
    (step,) = checkpoints(output_dir)
    assert 2 <= step < 10
    assert "rerun the same command to resume" in output
    assert json.loads((output_dir / f"checkpoint-{step}" / "trainer_state.json").read_text())["global_step"] == step

    rerun = Running(launcher)
    code, output = rerun.finish()
    assert code == 0, output[-3000:]
    assert final_state(output_dir)["global_step"] == 10
