"""End-to-end runs of the P-Tuning launchers on the CPU (USE_CPU=1, a tiny model, a few steps),
and dry runs of all four launchers that check the command they build."""

import hashlib
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "data" / "sample"
LAUNCHERS = ("finetune_ds.sh", "finetune_ds_multiturn.sh", "finetune_pt.sh", "finetune_pt_multiturn.sh")
SANITY_START = "Sanity Check >>>>>>>>>>>>>"


def launcher_env(**variables) -> dict:
    env = {key: value for key, value in os.environ.items()
           if key not in ("OUTPUT_DIR", "LR", "EXTRA_ARGS", "HOSTFILE", "DRY_RUN", "DS_CONFIG", "USE_CPU")}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    env.update({key: str(value) for key, value in variables.items()})
    return env


def run_launcher(name: str, timeout: int = 300, **variables) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / "scripts" / name)], env=launcher_env(**variables), cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def dry_run(name: str, **variables) -> list[str]:
    """The command a launcher would run (DRY_RUN=1 prints it, shell-quoted, after a '+ ')."""
    result = run_launcher(name, timeout=60, DRY_RUN=1, PRECISION=variables.pop("PRECISION", "bf16"), **variables)
    assert result.returncode == 0, result.stderr
    line = next(line for line in result.stdout.splitlines() if line.startswith("+ "))
    return shlex.split(line[2:])


def flag_value(command: list[str], flag: str) -> str:
    return command[command.index(flag) + 1]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def formatted_data(tmp_path_factory) -> dict[str, Path]:
    """The bundled samples through both converters, as the README and demo run them."""
    out = tmp_path_factory.mktemp("formatted_data")
    paths = {"multi-turn": out / "tool_alpaca.jsonl", "input-output": out / "advertise_gen.jsonl"}
    for script, sample, output in (("format_tool_alpaca.py", "tool_alpaca_train.json", paths["multi-turn"]),
                                   ("format_advertise_gen.py", "advertise_gen_train.json", paths["input-output"])):
        subprocess.run([sys.executable, str(ROOT / "scripts" / script), "--path", str(SAMPLES / sample),
                        "--output", str(output)], check=True, capture_output=True, cwd=ROOT)
    return paths


# ---- the commands the launchers build (no training) ---------------------------------------------

@pytest.mark.parametrize("name", LAUNCHERS)
def test_every_launcher_passes_its_learning_rate(name):
    command = dry_run(name, LR="3e-3")
    assert flag_value(command, "--learning_rate") == "3e-3"
    assert "--gradient_checkpointing" in command and "--do_train" in command
    assert "--bf16" in command and "--use_cpu" not in command


@pytest.mark.parametrize("name, defaults", [
    ("finetune_ds.sh", {"--per_device_train_batch_size": "4", "--gradient_accumulation_steps": "1",
                        "--learning_rate": "1e-4", "--max_steps": "500", "--save_steps": "500",
                        "--max_source_length": "1024", "--max_target_length": "128", "--train_format": "input-output",
                        "--train_file": "formatted_data/advertise_gen.jsonl"}),
    ("finetune_ds_multiturn.sh", {"--per_device_train_batch_size": "16", "--gradient_accumulation_steps": "1",
                                  "--learning_rate": "1e-4", "--max_steps": "200", "--save_steps": "50",
                                  "--max_seq_length": "2048", "--train_format": "multi-turn",
                                  "--train_file": "formatted_data/tool_alpaca.jsonl"}),
    ("finetune_pt.sh", {"--per_device_train_batch_size": "1", "--gradient_accumulation_steps": "32",
                        "--learning_rate": "2e-2", "--max_steps": "1000", "--save_steps": "500", "--pre_seq_len": "128",
                        "--max_source_length": "1024", "--max_target_length": "128", "--train_format": "input-output",
                        "--train_file": "formatted_data/advertise_gen.jsonl"}),
    ("finetune_pt_multiturn.sh", {"--per_device_train_batch_size": "1", "--gradient_accumulation_steps": "16",
                                  "--learning_rate": "2e-2", "--max_steps": "1000", "--save_steps": "500",
                                  "--pre_seq_len": "128", "--max_seq_length": "2048", "--train_format": "multi-turn",
                                  "--train_file": "formatted_data/tool_alpaca.jsonl"}),
])
def test_launcher_defaults_are_the_references(name, defaults):
    command = dry_run(name, DATESTR="20240101-000000")
    assert {flag: flag_value(command, flag) for flag in defaults} == defaults
    assert flag_value(command, "--model_name_or_path") == "models/chatglm3-6b"
    run_name = {"finetune_ds.sh": "advertise_gen_ft", "finetune_ds_multiturn.sh": "tool_alpaca_ft",
                "finetune_pt.sh": "advertise_gen_pt", "finetune_pt_multiturn.sh": "tool_alpaca_pt"}[name]
    suffix = "1e-4" if "_ds" in name else "128-2e-2"
    assert flag_value(command, "--output_dir") == f"output/{run_name}-20240101-000000-{suffix}"
    if "_ds" in name:
        assert command[:2] == ["deepspeed", "--num_gpus=4"]
        assert flag_value(command, "--deepspeed") == "configs/ds_zero2.json"
    else:
        assert command[:4] == ["torchrun", "--standalone", "--nnodes=1", "--nproc_per_node=1"]


@pytest.mark.parametrize("name", ("finetune_ds.sh", "finetune_ds_multiturn.sh"))
def test_deepspeed_launchers_take_hostfile_config_and_master(name, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node1 slots=8\nnode2 slots=8\n")
    command = dry_run(name, HOSTFILE=hostfile, NUM_GPUS=8, MASTER_ADDR="node1", MASTER_PORT=29511,
                      DS_CONFIG="configs/ds_zero3.json")
    launcher = command[:command.index("finetune.py")]
    assert launcher == ["deepspeed", "--num_gpus=8", "--hostfile", str(hostfile), "--master_addr", "node1",
                        "--master_port", "29511"]
    assert flag_value(command, "--deepspeed") == "configs/ds_zero3.json"
    assert "--hostfile" not in dry_run(name)


def test_overrides_extra_args_and_cpu_mode():
    command = dry_run("finetune_pt_multiturn.sh", PRECISION="auto", USE_CPU=1, NUM_GPUS=2, GRAD_ACCUMULATION_STEPS=3,
                      OUTPUT_DIR="output/resume-me", EXTRA_ARGS="--run_name 'two words' --prefix_projection")
    assert command[3] == "--nproc_per_node=2"
    assert flag_value(command, "--gradient_accumulation_steps") == "3"
    assert flag_value(command, "--output_dir") == "output/resume-me"
    assert "--use_cpu" in command and "--bf16" not in command and "--fp16" not in command
    assert command[-3:] == ["--run_name", "two words", "--prefix_projection"]
    assert "--fp16" in dry_run("finetune_ds.sh", PRECISION="fp16")
    spelled_as_reference = dry_run("finetune_pt.sh", GRAD_ACCUMULARION_STEPS=5, GRAD_ACCUMULATION_STEPS=3)
    assert flag_value(spelled_as_reference, "--gradient_accumulation_steps") == "5"


def test_wrong_precision_is_refused():
    result = run_launcher("finetune_pt.sh", timeout=60, DRY_RUN=1, PRECISION="fp8")
    assert result.returncode != 0 and "PRECISION must be" in result.stderr


# ---- training through the P-Tuning launchers ------------------------------------------------------
# Two records in a batch of two, no prefix dropout: every step sees the same batch, so the loss
# must fall. The input-output run stops after 3 steps and is rerun to 6 in the same OUTPUT_DIR.

def train_tiny(name, base_dir, data_path, output_dir, cache_dir, max_step):
    result = run_launcher(
        name, USE_CPU=1, BASE_MODEL_PATH=base_dir, DATASET_PATH=data_path, OUTPUT_DIR=output_dir,
        MAX_STEP=max_step, SAVE_INTERVAL=3, LR="0.05", PRE_SEQ_LEN=4, DEV_BATCH_SIZE=2, GRAD_ACCUMULARION_STEPS=1,
        MAX_SEQ_LEN=1024, MAX_SOURCE_LEN=64, MAX_TARGET_LEN=64,
        EXTRA_ARGS=f"--report_to none --prefix_dropout 0 --max_train_samples 2 --disable_tqdm true "
                   f"--preprocessing_cache_dir {cache_dir}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def base_hash(tiny_model_dir):
    return sha256(Path(tiny_model_dir) / "model.safetensors")


@pytest.fixture(scope="module")
def multi_turn_run(tiny_model_dir, base_hash, formatted_data, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("pt_multiturn") / "run"
    result = train_tiny("finetune_pt_multiturn.sh", tiny_model_dir, formatted_data["multi-turn"], output_dir,
                        output_dir.parent / "cache", max_step=6)
    return output_dir, [result]


@pytest.fixture(scope="module")
def resumed_input_output_run(tiny_model_dir, base_hash, formatted_data, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("pt_input_output") / "run"
    results = [train_tiny("finetune_pt.sh", tiny_model_dir, formatted_data["input-output"], output_dir,
                          output_dir.parent / "cache", max_step=max_step) for max_step in (3, 6)]
    return output_dir, results


RUNS = ("multi_turn_run", "resumed_input_output_run")


@pytest.mark.slow
@pytest.mark.parametrize("run", RUNS)
def test_ptuning_launcher_trains_logs_and_passes_lr(run, request):
    output_dir, results = request.getfixturevalue(run)
    assert all(SANITY_START in result.stdout for result in results)
    log = (output_dir / "train.log").read_text()
    assert log.count(SANITY_START) == len(results) and "train_runtime" in log
    state = json.loads((output_dir / "trainer_state.json").read_text())
    losses = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
    assert state["global_step"] == 6 and len(losses) == 6
    assert losses[-1] < losses[0] - 1e-3, losses
    assert all(entry["learning_rate"] <= 0.05 for entry in state["log_history"] if "learning_rate" in entry)
    run_config = json.loads((output_dir / "run_config.json").read_text())
    assert run_config["training"]["learning_rate"] == 0.05
    assert run_config["model"]["pre_seq_len"] == 4


@pytest.mark.slow
def test_rerun_with_the_same_output_dir_resumes(resumed_input_output_run):
    output_dir, (first, second) = resumed_input_output_run
    assert "Resuming from" not in first.stdout
    assert "Resuming from" in second.stdout and str(output_dir / "checkpoint-3") in second.stdout
    state = json.loads((output_dir / "trainer_state.json").read_text())
    assert [entry["step"] for entry in state["log_history"] if "loss" in entry] == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
@pytest.mark.parametrize("run", RUNS)
def test_ptuning_checkpoint_is_the_prefix_alone_and_reloads(run, request, tiny_model_dir, base_hash):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from chatglm3_finetune.prefix_tuning import PrefixTuningModel

    output_dir, _ = request.getfixturevalue(run)
    base_dir = Path(tiny_model_dir)
    for folder in (output_dir, output_dir / "checkpoint-3", output_dir / "checkpoint-6"):
        weights = sorted(path.name for path in folder.iterdir()
                         if path.suffix in (".safetensors", ".bin") and path.name != "training_args.bin")
        assert weights == ["prefix_encoder.safetensors"], folder
        assert sum(path.stat().st_size for path in folder.rglob("*") if path.is_file()) < 1_000_000
    assert sha256(base_dir / "model.safetensors") == base_hash

    base = AutoModelForCausalLM.from_pretrained(base_dir)
    model = PrefixTuningModel.from_pretrained(base, str(output_dir))
    assert model.pre_seq_len == 4
    saved_prefix = load_file(str(output_dir / "prefix_encoder.safetensors"))
    assert torch.equal(model.prefix_encoder.embedding.weight, saved_prefix["embedding.weight"])
    halfway = load_file(str(output_dir / "checkpoint-3" / "prefix_encoder.safetensors"))
    assert not torch.equal(halfway["embedding.weight"], saved_prefix["embedding.weight"])
    base_tensors = load_file(str(base_dir / "model.safetensors"))
    loaded = model.base_model.state_dict()
    assert base_tensors.keys() <= loaded.keys()
    assert all(torch.equal(loaded[key], tensor) for key, tensor in base_tensors.items())


@pytest.mark.parametrize("name", LAUNCHERS)
def test_val_size_holds_out_part_of_the_data_and_evaluates_on_it(name):
    command = dry_run(name, VAL_SIZE="0.05", SAVE_INTERVAL="50")
    assert flag_value(command, "--val_size") == "0.05" and "--do_eval" in command
    assert flag_value(command, "--eval_strategy") == "steps" and flag_value(command, "--eval_steps") == "50"
    assert "--val_size" not in dry_run(name)
