"""The launchers (scripts/finetune_*.sh over scripts/launcher_common.sh): the commands they build
(dry runs), how they start one or several processes, their errors and exit codes, and end-to-end
runs of the P-Tuning launchers on the CPU (USE_CPU=1, a tiny model, a few steps)."""

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
LAUNCHERS = ("finetune_ds.sh", "finetune_ds_multiturn.sh", "finetune_pt.sh", "finetune_pt_multiturn.sh",
             "finetune_lora.sh")
SANITY_START = "Sanity Check >>>>>>>>>>>>>"
PYTHON = sys.executable
LAUNCH_WORKERS = [PYTHON, "-m", "chatglm3_finetune.train.launch_workers"]


def launcher_env(**variables) -> dict:
    """The caller's environment without the launchers' variables, the running Python as PYTHON."""
    env = {key: value for key, value in os.environ.items()
           if key not in ("OUTPUT_DIR", "LR", "EXTRA_ARGS", "HOSTFILE", "DRY_RUN", "DS_CONFIG", "USE_CPU", "NUM_GPUS",
                          "NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "VIRTUAL_ENV")
           and not key.startswith("SLURM_")}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", PYTHON=PYTHON)
    env.update({key: str(value) for key, value in variables.items()})
    return env


def run_launcher(name: str, timeout: int = 300, **variables) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / "scripts" / name)], env=launcher_env(**variables), cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def dry_run(name: str, **variables) -> list[str]:
    """The command a launcher would run (DRY_RUN=1 prints it, shell-quoted, on stdout)."""
    result = run_launcher(name, timeout=60, DRY_RUN=1, PRECISION=variables.pop("PRECISION", "bf16"), **variables)
    assert result.returncode == 0, result.stderr
    return shlex.split(result.stdout)


def flag_value(command: list[str], flag: str) -> str:
    return command[command.index(flag) + 1]


def launcher_part(command: list[str]) -> list[str]:
    return command[:command.index("finetune.py")]


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
def test_every_launcher_passes_its_learning_rate_and_current_flags(name):
    command = dry_run(name, LR="3e-3")
    assert flag_value(command, "--learning_rate") == "3e-3"
    assert "--do_train" in command and "--bf16" in command and "--use_cpu" not in command
    # the non-deprecated checkpointing flag, a loss line every 10 steps, no DDP unused-parameter search
    assert "--activation_checkpointing" in command and "--gradient_checkpointing" not in command
    assert flag_value(command, "--logging_steps") == "10"
    assert flag_value(command, "--ddp_find_unused_parameters") == "false"
    assert flag_value(dry_run(name, LOGGING_STEPS=1), "--logging_steps") == "1"
    assert flag_value(dry_run(name, SAVE_EVERY_MINUTES=15), "--save_every_minutes") == "15"
    assert "--save_every_minutes" not in dry_run(name, SAVE_EVERY_MINUTES=0)


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
    ("finetune_lora.sh", {"--per_device_train_batch_size": "1", "--gradient_accumulation_steps": "16",
                          "--learning_rate": "2e-4", "--max_steps": "1000", "--save_steps": "500", "--lora_rank": "8",
                          "--lora_alpha": "32", "--lora_dropout": "0.1", "--lora_target": "q_proj,k_proj,v_proj,o_proj",
                          "--max_source_length": "1024", "--max_target_length": "128", "--train_format": "input-output",
                          "--train_file": "formatted_data/advertise_gen.jsonl"}),
])
def test_launcher_defaults_are_the_references(name, defaults):
    command = dry_run(name, DATESTR="20240101-000000")
    assert {flag: flag_value(command, flag) for flag in defaults} == defaults
    assert flag_value(command, "--model_name_or_path") == "models/chatglm3-6b"
    run_name, suffix = {"finetune_ds.sh": ("advertise_gen_ft", "1e-4"),
                        "finetune_ds_multiturn.sh": ("tool_alpaca_ft", "1e-4"),
                        "finetune_pt.sh": ("advertise_gen_pt", "128-2e-2"),
                        "finetune_pt_multiturn.sh": ("tool_alpaca_pt", "128-2e-2"),
                        "finetune_lora.sh": ("advertise_gen_lora", "r8-2e-4")}[name]
    assert flag_value(command, "--output_dir") == f"output/{run_name}-20240101-000000-{suffix}"
    if "_ds" in name:  # 4 workers on one node, through torchrun
        assert launcher_part(command) == LAUNCH_WORKERS + ["--standalone", "--nnodes=1", "--nproc_per_node=4"]
        assert flag_value(command, "--deepspeed") == "configs/ds_zero2.json"
    else:  # one GPU: one plain process
        assert launcher_part(command) == [PYTHON]


def test_lora_multi_turn_defaults():
    command = dry_run("finetune_lora.sh", FORMAT="multi-turn", QUANTIZATION_BIT=4)
    assert flag_value(command, "--train_file") == "formatted_data/tool_alpaca.jsonl"
    assert flag_value(command, "--max_seq_length") == "2048" and "--max_source_length" not in command
    assert flag_value(command, "--quantization_bit") == "4"
    result = run_launcher("finetune_lora.sh", timeout=60, DRY_RUN=1, PRECISION="bf16", FORMAT="chat")
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1] == \
        "error: FORMAT must be input-output or multi-turn, got 'chat'"


AUTO_PRECISION_LINE = ("PRECISION=auto: no GPU visible here, assuming bf16 (Ampere or newer); "
                       "set PRECISION=fp16 for V100/T4")


@pytest.mark.parametrize("name", LAUNCHERS)
def test_auto_precision_without_a_visible_gpu_assumes_bf16_and_says_so(name):
    """A dry run on a login node (no GPU visible: CUDA_VISIBLE_DEVICES empty) prints a command for the
    GPUs that will run it, in bf16, never fp16, and one line on stderr that says so and how to change it."""
    result = run_launcher(name, timeout=60, DRY_RUN=1, PRECISION="auto", CUDA_VISIBLE_DEVICES="")
    assert result.returncode == 0, result.stderr
    command = shlex.split(result.stdout)
    assert "--bf16" in command and "--fp16" not in command and "--use_cpu" not in command
    assert result.stderr.strip().splitlines() == [AUTO_PRECISION_LINE]
    on_the_cpu = run_launcher(name, timeout=60, DRY_RUN=1, PRECISION="auto", USE_CPU=1, CUDA_VISIBLE_DEVICES="")
    assert "--bf16" not in shlex.split(on_the_cpu.stdout) and AUTO_PRECISION_LINE not in on_the_cpu.stderr
    chosen = run_launcher(name, timeout=60, DRY_RUN=1, PRECISION="fp16", CUDA_VISIBLE_DEVICES="")
    assert "--fp16" in shlex.split(chosen.stdout) and AUTO_PRECISION_LINE not in chosen.stderr


@pytest.mark.slow
def test_auto_precision_without_a_visible_gpu_in_a_real_launch(tiny_model_dir, formatted_data, tmp_path):
    """Launched for real with no GPU visible: the same line, then finetune.py refuses bf16 without a
    GPU (or --use_cpu) with one error line and exit code 2."""
    result = run_launcher("finetune_pt.sh", PRECISION="auto", CUDA_VISIBLE_DEVICES="", BASE_MODEL_PATH=tiny_model_dir,
                          DATASET_PATH=formatted_data["input-output"], OUTPUT_DIR=tmp_path / "run")
    assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-3000:]
    assert AUTO_PRECISION_LINE in result.stderr.splitlines()
    last_line = result.stdout.strip().splitlines()[-1]
    assert last_line.startswith("error: ") and "bf16" in last_line, last_line
    assert "Traceback" not in result.stdout + result.stderr


@pytest.mark.parametrize("name", ("finetune_pt.sh", "finetune_pt_multiturn.sh", "finetune_lora.sh"))
def test_quantization_bit_reaches_finetune_from_the_ptuning_and_lora_launchers(name):
    assert flag_value(dry_run(name, QUANTIZATION_BIT=8), "--quantization_bit") == "8"
    assert flag_value(dry_run(name, QUANTIZATION_BIT=4), "--quantization_bit") == "4"
    assert "--quantization_bit" not in dry_run(name)


@pytest.mark.parametrize("name, default", [("finetune_ds.sh", "2"), ("finetune_ds_multiturn.sh", "2"),
                                           ("finetune_pt.sh", "3"), ("finetune_pt_multiturn.sh", "3"),
                                           ("finetune_lora.sh", "3")])
def test_save_total_limit_has_a_default_and_can_be_changed_or_turned_off(name, default):
    assert flag_value(dry_run(name), "--save_total_limit") == default
    assert flag_value(dry_run(name, SAVE_TOTAL_LIMIT=5), "--save_total_limit") == "5"
    assert "--save_total_limit" not in dry_run(name, SAVE_TOTAL_LIMIT=0)
    result = run_launcher(name, timeout=60, DRY_RUN=1, PRECISION="bf16", SAVE_TOTAL_LIMIT="two")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == \
        "error: SAVE_TOTAL_LIMIT must be a whole number (0 keeps every checkpoint), got 'two'"


@pytest.mark.parametrize("name", ("finetune_ds.sh", "finetune_ds_multiturn.sh"))
def test_one_deepspeed_process_gets_torchruns_variables_without_torchrun(name):
    command = dry_run(name, USE_CPU=1, MASTER_PORT=29533)
    assert launcher_part(command) == ["env", "RANK=0", "LOCAL_RANK=0", "WORLD_SIZE=1", "MASTER_ADDR=127.0.0.1",
                                      "MASTER_PORT=29533", PYTHON]
    assert "--use_cpu" in command and "--bf16" in command
    # any launcher with --deepspeed among its flags gets them too
    assert launcher_part(dry_run("finetune_pt.sh", EXTRA_ARGS="--deepspeed configs/ds_zero2.json"))[0] == "env"


@pytest.mark.parametrize("name", ("finetune_ds.sh", "finetune_ds_multiturn.sh"))
def test_hostfile_uses_deepspeeds_launcher(name, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node1 slots=8\nnode2 slots=8\n")
    command = dry_run(name, HOSTFILE=hostfile, NUM_GPUS=8, MASTER_ADDR="node1", MASTER_PORT=29511,
                      DS_CONFIG="configs/ds_zero3.json")
    assert launcher_part(command) == [PYTHON, "-m", "deepspeed.launcher.runner", "--num_gpus=8", "--hostfile",
                                      str(hostfile), "--master_addr", "node1", "--master_port", "29511"]
    assert flag_value(command, "--deepspeed") == "configs/ds_zero3.json"


@pytest.mark.parametrize("name", LAUNCHERS)
def test_several_nodes_through_torchrun_or_slurm(name):
    node = launcher_part(dry_run(name, NNODES=2, NODE_RANK=1, MASTER_ADDR="node1", NUM_GPUS=8))
    assert node == LAUNCH_WORKERS + ["--nnodes=2", "--node_rank=1", "--master_addr=node1", "--master_port=29500",
                                     "--nproc_per_node=8"]
    slurm = launcher_part(dry_run(name, SLURM_NNODES=4, SLURM_NODEID=3, MASTER_ADDR="node1", MASTER_PORT=6000,
                                  NUM_GPUS=2))
    assert slurm == LAUNCH_WORKERS + ["--nnodes=4", "--node_rank=3", "--master_addr=node1", "--master_port=6000",
                                      "--nproc_per_node=2"]
    result = run_launcher(name, timeout=60, DRY_RUN=1, PRECISION="bf16", NNODES=2, NODE_RANK=0)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: NNODES=2 needs MASTER_ADDR")


def test_overrides_extra_args_and_cpu_mode():
    command = dry_run("finetune_pt_multiturn.sh", PRECISION="auto", USE_CPU=1, NUM_GPUS=2, GRAD_ACCUMULATION_STEPS=3,
                      OUTPUT_DIR="output/resume-me", EXTRA_ARGS="--run_name 'two words' --prefix_projection")
    assert launcher_part(command) == LAUNCH_WORKERS + ["--standalone", "--nnodes=1", "--nproc_per_node=2"]
    assert flag_value(command, "--gradient_accumulation_steps") == "3"
    assert flag_value(command, "--output_dir") == "output/resume-me"
    assert "--use_cpu" in command and "--bf16" not in command and "--fp16" not in command
    assert command[-3:] == ["--run_name", "two words", "--prefix_projection"]
    assert "--fp16" in dry_run("finetune_ds.sh", PRECISION="fp16")
    spelled_as_reference = dry_run("finetune_pt.sh", GRAD_ACCUMULARION_STEPS=5, GRAD_ACCUMULATION_STEPS=3)
    assert flag_value(spelled_as_reference, "--gradient_accumulation_steps") == "5"
    assert launcher_part(dry_run("finetune_ds.sh", USE_CPU=1)) [-1] == PYTHON  # one CPU process by default


def test_extra_args_are_split_never_run(tmp_path):
    marker = tmp_path / "ran"
    command = dry_run("finetune_pt.sh", EXTRA_ARGS=f"--run_name \"$HOME $(touch {marker})\" --seed 3")
    assert command[-4:] == ["--run_name", f"$HOME $(touch {marker})", "--seed", "3"]
    assert not marker.exists()
    result = run_launcher("finetune_pt.sh", timeout=60, DRY_RUN=1, PRECISION="bf16", EXTRA_ARGS="--run_name 'open")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == \
        "error: EXTRA_ARGS: No closing quotation (quote a word that holds spaces with matching quotes)"


@pytest.mark.parametrize("variable, value", [("NUM_GPUS", "two"), ("NUM_GPUS", "0"), ("NNODES", "2x")])
def test_counts_must_be_whole_numbers(variable, value):
    result = run_launcher("finetune_pt.sh", timeout=60, DRY_RUN=1, PRECISION="bf16", **{variable: value})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == \
        f"error: {variable} must be a whole number of at least 1, got '{value}'"


def test_wrong_precision_is_refused():
    result = run_launcher("finetune_pt.sh", timeout=60, DRY_RUN=1, PRECISION="fp8")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == "error: PRECISION must be bf16, fp16, fp32 or auto, got 'fp8'"


def test_the_python_is_found_without_path(tmp_path):
    """No PYTHON and no python on PATH: the active virtual environment's interpreter runs everything."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(PYTHON)
    env = {key: value for key, value in launcher_env(DRY_RUN=1, PRECISION="bf16").items() if key != "PYTHON"}
    env.update(PATH="/usr/bin:/bin", VIRTUAL_ENV=str(venv))
    result = subprocess.run(["bash", str(ROOT / "scripts" / "finetune_pt.sh")], env=env, cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert shlex.split(result.stdout)[0] == str(venv / "bin" / "python")


# ---- training through the P-Tuning launchers ------------------------------------------------------
# Two records in a batch of two, no prefix dropout: every step sees the same batch, so the loss
# must fall. The input-output run stops after 3 steps and is rerun to 6 in the same OUTPUT_DIR.

def tiny_run(base_dir, data_path, output_dir, cache_dir, **overrides) -> dict:
    """The launcher variables of a few P-Tuning steps of the tiny model on the CPU."""
    return {**dict(USE_CPU=1, BASE_MODEL_PATH=base_dir, DATASET_PATH=data_path, OUTPUT_DIR=output_dir,
                   SAVE_INTERVAL=3, LOGGING_STEPS=1, LR="0.05", PRE_SEQ_LEN=4, DEV_BATCH_SIZE=2,
                   GRAD_ACCUMULARION_STEPS=1, MAX_SEQ_LEN=1024, MAX_SOURCE_LEN=64, MAX_TARGET_LEN=64,
                   EXTRA_ARGS=f"--report_to none --prefix_dropout 0 --max_train_samples 2 --disable_tqdm true "
                              f"--preprocessing_cache_dir {cache_dir}"), **overrides}


def train_tiny(name, base_dir, data_path, output_dir, cache_dir, max_step):
    result = run_launcher(name, **tiny_run(base_dir, data_path, output_dir, cache_dir, MAX_STEP=max_step))
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

    from chatglm3_finetune.model.ptuning.prefix_model import PrefixTuningModel

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


@pytest.mark.slow
def test_ptuning_launcher_trains_on_an_8bit_base(tiny_model_dir, formatted_data, tmp_path):
    """QUANTIZATION_BIT=8 through finetune_pt.sh on the CPU (bitsandbytes): the base is loaded in 8 bits,
    the prefix trains (the loss falls) and is saved alone."""
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed: quantized bases cannot be tested")
    output_dir = tmp_path / "run"
    result = run_launcher("finetune_pt.sh", **tiny_run(tiny_model_dir, formatted_data["input-output"], output_dir,
                                                       tmp_path / "cache", MAX_STEP=4, SAVE_INTERVAL=4,
                                                       QUANTIZATION_BIT=8))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "linear layers in 8 bits" in result.stdout
    assert flag_value(shlex.split(result.stderr.splitlines()[0][2:]), "--quantization_bit") == "8"
    losses = losses_of(output_dir)
    assert len(losses) == 4 and losses[-1] < losses[0] - 1e-3, losses
    assert json.loads((output_dir / "run_config.json").read_text())["model"]["quantization_bit"] == 8
    assert sorted(path.name for path in output_dir.iterdir() if path.suffix == ".safetensors") == \
        ["prefix_encoder.safetensors"]


# ---- how the processes start, end and fail ---------------------------------------------------------

def losses_of(output_dir: Path) -> list[float]:
    state = json.loads((output_dir / "trainer_state.json").read_text())
    return [entry["loss"] for entry in state["log_history"] if "loss" in entry]


@pytest.mark.slow
@pytest.mark.parametrize("num_gpus", (1, 2))
def test_an_error_is_the_last_line_and_its_exit_code_the_launchers(num_gpus, tmp_path, formatted_data):
    missing = tmp_path / "no-model"
    result = run_launcher("finetune_pt.sh", USE_CPU=1, NUM_GPUS=num_gpus, BASE_MODEL_PATH=missing,
                          DATASET_PATH=formatted_data["input-output"], OUTPUT_DIR=tmp_path / "run")
    assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-3000:]
    last_line = result.stdout.strip().splitlines()[-1]
    assert last_line.startswith(f"error: --model_name_or_path {missing}: no such folder"), result.stdout[-2000:]
    assert "Traceback" not in result.stdout + result.stderr and "ChildFailedError" not in result.stdout + result.stderr
    assert not (tmp_path / "run").exists()  # the folder this try made held nothing but its log: removed again
    launcher = result.stderr.splitlines()[0]
    assert launcher.startswith(f"+ {PYTHON} finetune.py" if num_gpus == 1 else f"+ {PYTHON} -m chatglm3_finetune")

    (tmp_path / "mine").mkdir()  # a folder that was there before is kept, with the log of the try
    result = run_launcher("finetune_pt.sh", USE_CPU=1, NUM_GPUS=num_gpus, BASE_MODEL_PATH=missing,
                          DATASET_PATH=formatted_data["input-output"], OUTPUT_DIR=tmp_path / "mine")
    assert result.returncode == 2
    assert (tmp_path / "mine" / "train.log").read_text().strip().endswith(last_line)


def processes_with(marker: str) -> list[int]:
    """The ids of the processes whose environment holds marker."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and marker.encode() in (entry / "environ").read_bytes():
                found.append(int(entry.name))
        except OSError:
            pass
    return found


WORKER = """
import os, signal, sys, time

def stop(signum, frame):
    open(os.path.join(sys.argv[1], f"stopped-{os.environ['RANK']}"), "w").close()
    sys.exit(0)

signal.signal(signal.SIGTERM, stop)
signal.signal(signal.SIGINT, stop)
open(os.path.join(sys.argv[1], f"worker-{os.environ['RANK']}"), "w").close()
while True:
    time.sleep(0.1)
"""


def start_workers(folder: Path, marker: str = "LAUNCHER_TEST_MARKER=1") -> subprocess.Popen:
    """launch_workers with two WORKER processes, in a process group of its own, once both run."""
    import time

    script = folder / "worker.py"
    script.write_text(WORKER)
    launcher = subprocess.Popen([*LAUNCH_WORKERS, "--standalone", "--nproc_per_node=2", str(script), str(folder)],
                                env=launcher_env(**dict([marker.split("=")])), cwd=ROOT, start_new_session=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while len(list(folder.glob("worker-*"))) < 2 and time.monotonic() < deadline:
        assert launcher.poll() is None, launcher.stdout.read()
        time.sleep(0.2)
    return launcher


@pytest.mark.slow
def test_ctrl_c_stops_the_workers_cleanly(tmp_path):
    """Ctrl-C (SIGINT to the foreground process group, which does not hold the workers): the launcher
    passes the signal on to the workers, waits for them to stop and exits 130 without a traceback."""
    import signal

    launcher = start_workers(tmp_path)
    os.killpg(launcher.pid, signal.SIGINT)
    output = launcher.communicate(timeout=120)[0]
    assert launcher.returncode == 130, output
    assert "Traceback" not in output, output
    assert sorted(path.name for path in tmp_path.glob("stopped-*")) == ["stopped-0", "stopped-1"]


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_no_worker_outlives_a_killed_launcher(tmp_path):
    """kill -9 of the launcher's process group while two workers run: no worker is left. torchrun
    starts each worker in a session of its own, out of the group's reach; these workers print
    nothing and talk to nobody, so only dying with their launcher can end them."""
    import signal
    import time
    import uuid

    marker = f"LAUNCHER_TEST_MARKER={uuid.uuid4().hex}"
    launcher = start_workers(tmp_path, marker)
    try:
        workers = [pid for pid in processes_with(marker) if pid != launcher.pid]
        assert len(workers) == 2 and all(os.getsid(pid) == pid for pid in workers)  # sessions of their own
        os.killpg(launcher.pid, signal.SIGKILL)
        launcher.wait()
        deadline = time.monotonic() + 10
        while processes_with(marker) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert processes_with(marker) == []
    finally:
        for pid in processes_with(marker):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
def test_two_nodes_train_as_one_process_with_the_same_global_batch(tiny_model_dir, formatted_data, tmp_path):
    """Two "nodes" of one CPU process each (torchrun, static rendezvous on localhost, gloo) and one
    process with their two records in one batch log the same losses."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    data = formatted_data["multi-turn"]
    nodes = [subprocess.Popen(["bash", str(ROOT / "scripts" / "finetune_pt_multiturn.sh")], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=launcher_env(**tiny_run(tiny_model_dir, data, tmp_path / "nodes", tmp_path / f"c{rank}",
                                                          MAX_STEP=3, DEV_BATCH_SIZE=1, NNODES=2, NODE_RANK=rank,
                                                          MASTER_ADDR="127.0.0.1", MASTER_PORT=port)))
             for rank in (0, 1)]
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    single = run_launcher("finetune_pt_multiturn.sh",
                          **tiny_run(tiny_model_dir, data, tmp_path / "single", tmp_path / "c", MAX_STEP=3))
    assert single.returncode == 0, single.stdout[-3000:]
    two_nodes, one_process = losses_of(tmp_path / "nodes"), losses_of(tmp_path / "single")
    assert len(two_nodes) == len(one_process) == 3
    assert two_nodes == pytest.approx(one_process, rel=1e-4), (two_nodes, one_process)
    assert one_process[-1] < one_process[0]


@pytest.mark.parametrize("name", LAUNCHERS)
def test_val_size_holds_out_part_of_the_data_and_evaluates_on_it(name):
    command = dry_run(name, VAL_SIZE="0.05", SAVE_INTERVAL="50")
    assert flag_value(command, "--val_size") == "0.05" and "--do_eval" in command
    assert flag_value(command, "--eval_strategy") == "steps" and flag_value(command, "--eval_steps") == "50"
    assert "--val_size" not in dry_run(name)
