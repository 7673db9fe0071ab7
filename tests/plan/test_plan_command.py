"""--plan, --plan_json, --gpu_memory and the check before loading, as users run them: finetune.py,
the chatglm3-plan command and the launchers' PLAN=1. Nothing here needs (or finds) a GPU."""

import json
import os
import subprocess

import pytest

from chatglm3_finetune.plan.cards import DEFAULT_CARD, card_named
from conftest import ROOT
from test_launchers import launcher_env

PARTS = ("weights", "trainable", "gradients", "optimizer_states", "activations_saved", "activations_transient",
         "logits_and_loss", "CUDA context")


def options(model, data, out, *more):
    return ["--do_train", "--train_format", "multi-turn", "--train_file", str(data), "--model_name_or_path",
            str(model), "--output_dir", str(out), "--max_seq_length", "256", "--max_steps", "10", "--save_steps", "5",
            "--learning_rate", "1e-2", "--activation_checkpointing", "--per_device_train_batch_size", "2", *more]


@pytest.fixture(scope="module")
def model_and_data(tiny_model_dir, formatted_samples):
    return tiny_model_dir, formatted_samples["multi-turn"]


def test_plan_prints_the_parts_and_writes_json_without_a_gpu_or_an_output_folder(finetune_in_process, model_and_data,
                                                                               tmp_path):
    model, data = model_and_data
    out, path = tmp_path / "run", tmp_path / "plan.json"
    # --bf16 on a machine without a GPU: a real run's options would be refused, a plan's are not
    result = finetune_in_process(*options(model, data, out, "--pre_seq_len", "4", "--bf16", "--plan_json", str(path)))
    assert result.returncode == 0, result.stderr
    for text in ("Peak on one GPU", "weights (frozen)", "activations saved for the backward", "logits and loss",
                 "CUDA context", "Verdict for", "A10 24GB", "A100 40GB", "H100 80GB", "time/step", "Host memory at load",
                 "Disk:", "backward"):
        assert text in result.stdout, text
    assert not out.exists()  # nothing was loaded or written but the plan
    plan = json.loads(path.read_text())
    assert plan["peak_bytes"] == sum(plan["parts"].values()) > plan["tensor_peak_bytes"] > 0
    assert all(part in plan["parts"] for part in PARTS)
    assert plan["gpu_memory_bytes"] == card_named(DEFAULT_CARD).memory_bytes and plan["fits"] is True
    assert plan["method"] == "ptuning" and plan["params"]["trainable"] == 4 * 2 * 2 * 2 * 16  # pre_seq_len x layers x (k, v) x kv heads x head_dim
    assert "records" in plan["rows_source"] and plan["batch"]["rows"] == 2
    assert plan["time"]["flops_per_step"] > 0 and len(plan["cards"]) == 5
    assert plan["disk"]["checkpoints_written"] == 2


def test_without_data_the_plan_uses_the_caps(finetune_in_process, model_and_data, tmp_path):
    model, _ = model_and_data
    path = tmp_path / "plan.json"
    result = finetune_in_process(*options(model, tmp_path / "not-yet.jsonl", tmp_path / "run", "--lora_rank", "4",
                                          "--plan_json", str(path)))
    assert result.returncode == 0, result.stderr
    plan = json.loads(path.read_text())
    assert "as long as the caps" in plan["rows_source"] and plan["batch"]["padded_length"] == 256


def test_a_plan_without_the_model_folder_names_the_config_to_plan_with(finetune_in_process, model_and_data, tmp_path):
    _, data = model_and_data
    result = finetune_in_process(*options(tmp_path / "chatglm3-6b", data, tmp_path / "run", "--plan"))
    assert result.returncode == 2
    assert "no such folder" in result.stderr and "--model_name_or_path configs/chatglm3-6b" in result.stderr
    assert (ROOT / "configs" / "chatglm3-6b" / "config.json").is_file()
    run = finetune_in_process(*options(tmp_path / "chatglm3-6b", data, tmp_path / "run"))
    assert run.returncode == 2 and "configs/chatglm3-6b" not in run.stderr  # a run needs the weights


def test_a_deepspeed_run_on_four_gpus_is_planned_per_process(finetune_in_process, model_and_data, tmp_path):
    model, data = model_and_data
    path = tmp_path / "plan.json"
    result = finetune_in_process(*options(model, data, tmp_path / "run", "--bf16", "--deepspeed",
                                          str(ROOT / "configs" / "ds_zero3.json"), "--plan_num_gpus", "4",
                                          "--plan_json", str(path)))
    assert result.returncode == 0, result.stderr
    plan = json.loads(path.read_text())
    assert plan["processes"] == 4 and plan["zero_stage"] == 3 and "NCCL buffers" in plan["parts"]
    assert "DeepSpeed reduce buckets" in plan["parts"] or "gradients" in plan["parts"]
    assert "ZeRO-3 over 4 processes" in result.stdout


def test_a_card_too_small_gets_the_changes_that_fit_each_planned(finetune_in_process, model_and_data, tmp_path):
    model, data = model_and_data
    first = tmp_path / "first.json"
    common = options(model, data, tmp_path / "run", "--per_device_train_batch_size", "8", "--no_loss_on_targets_only")
    assert finetune_in_process(*common, "--plan_json", str(first)).returncode == 0
    peak = json.loads(first.read_text())["peak_bytes"]
    memory = f"{(peak - 2 ** 20) / 2 ** 20:.0f}MB"  # a MB short
    path = tmp_path / "plan.json"
    result = finetune_in_process(*common, "--gpu_memory", memory, "--plan_json", str(path))
    assert result.returncode == 0
    plan = json.loads(path.read_text())
    assert plan["fits"] is False and plan["advice"], result.stdout
    for item in plan["advice"]:
        assert item["peak_bytes"] <= plan["gpu_memory_bytes"] and item["how"].startswith(("--", "drop", "DS_", "NUM"))
    assert plan["advice"][0]["change"] == "the output layer and loss at targets only"  # the cheapest first
    assert "does not fit" in result.stdout and "To fit" in result.stdout


def wider_model(tiny_model_dir, folder):
    """The tiny model's tokenizer with a config 16 times as wide and no weights (a plan needs none)."""
    import json
    import shutil

    shutil.copytree(tiny_model_dir, folder, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    config = json.loads((folder / "config.json").read_text())
    config.update(hidden_size=1024, intermediate_size=2048, head_dim=256)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_a_gpu_run_clearly_too_big_stops_before_loading_and_says_what_fits(finetune_in_process, model_and_data,
                                                                          tmp_path):
    model, data = model_and_data
    model = wider_model(model, tmp_path / "wide")  # no weights: loading would fail, the plan stops first
    out, probe = tmp_path / "run", tmp_path / "probe.json"
    common = options(model, data, out, "--per_device_train_batch_size", "8", "--activation_checkpointing", "false")
    assert finetune_in_process(*common, "--plan_json", str(probe)).returncode == 0
    peak = json.loads(probe.read_text())["peak_bytes"]
    result = finetune_in_process(*common, "--gpu_memory", f"{peak / 1.3 / 2 ** 20:.0f}MB")
    assert result.returncode == 2
    assert "Memory plan:" in result.stdout and "does not fit" in result.stdout  # the line every GPU run prints
    assert "stopped before loading the model" in result.stderr and "--ignore_memory_plan" in result.stderr
    assert "Changes that fit: " in result.stderr and "--activation_checkpointing" in result.stderr, result.stderr
    assert not out.exists()


def test_nothing_is_advised_when_the_cuda_allowances_alone_exceed_the_card(finetune_in_process, model_and_data,
                                                                          tmp_path):
    model, data = model_and_data
    result = finetune_in_process(*options(model, data, tmp_path / "run", "--pre_seq_len", "4", "--gpu_memory", "0.25GB"))
    assert result.returncode == 2 and "a larger GPU" in result.stderr


@pytest.mark.slow
def test_ignore_memory_plan_runs_anyway_and_a_cpu_run_is_never_checked(finetune_in_process, model_and_data, tmp_path):
    model, data = model_and_data
    ignored = finetune_in_process(*options(model, data, tmp_path / "a", "--pre_seq_len", "4", "--gpu_memory", "0.25GB",
                                           "--ignore_memory_plan", "--max_steps", "1", "--save_steps", "1"))
    assert ignored.returncode == 0, ignored.stderr
    assert "going on because of --ignore_memory_plan" in ignored.stdout
    on_cpu = finetune_in_process(*options(model, data, tmp_path / "b", "--pre_seq_len", "4", "--gpu_memory", "0.25GB",
                                          "--use_cpu", "--max_steps", "1", "--save_steps", "1"))
    assert on_cpu.returncode == 0, on_cpu.stderr
    assert "Memory plan:" not in on_cpu.stdout


def test_a_bad_gpu_memory_is_a_user_mistake(finetune_in_process, model_and_data, tmp_path):
    model, data = model_and_data
    result = finetune_in_process(*options(model, data, tmp_path / "run", "--gpu_memory", "big", "--plan"))
    assert result.returncode == 2 and "error: --gpu_memory" in result.stderr and "24GB" in result.stderr


def test_chatglm3_plan_is_finetune_with_plan(model_and_data, tmp_path, capsys):
    import finetune

    model, data = model_and_data
    assert 'chatglm3-plan = "finetune:plan_main"' in (ROOT / "pyproject.toml").read_text()
    with pytest.raises(SystemExit) as stopped:
        finetune.plan_main(options(model, data, tmp_path / "run", "--pre_seq_len", "4"))
    assert stopped.value.code == 0 and "Peak on one GPU" in capsys.readouterr().out


@pytest.mark.slow
def test_launcher_plan_runs_one_process_per_rank_plan_without_torchrun(model_and_data, tmp_path):
    model, data = model_and_data
    out, path = tmp_path / "run", tmp_path / "plan.json"
    env = launcher_env(PLAN=1, NUM_GPUS=4, PRECISION="bf16", BASE_MODEL_PATH=model, DATASET_PATH=data,
                       OUTPUT_DIR=out, MAX_SEQ_LEN=256, EXTRA_ARGS=f"--plan_json {path}")
    result = subprocess.run(["bash", str(ROOT / "scripts" / "finetune_ds_multiturn.sh")], env=env, cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Peak on one GPU" in result.stdout and "4 processes" in result.stdout
    assert "launch_workers" not in result.stderr and not out.exists()
    plan = json.loads(path.read_text())
    assert plan["processes"] == 4 and plan["zero_stage"] == 2 and plan["method"] == "full"
    assert os.environ.get("WORLD_SIZE") is None
