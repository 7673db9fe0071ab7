"""What DeepSpeed checkpoints hold and how runs resume from them, through `scripts/finetune_ds.sh` on
the CPU (USE_CPU=1, one rank, the tiny model):

- P-Tuning v2 and LoRA checkpoints under ZeRO-2 and ZeRO-3 hold the trained parameters and their
  optimizer state, never the frozen base (DeepSpeed's model-state files are read tensor by tensor);
- a run resumed from such a checkpoint (the base from the model folder, the rest from the checkpoint)
  ends bitwise where the uninterrupted run ends: prefix, optimizer state and logged losses;
- under bf16 the saved prefix is DeepSpeed's fp32 master copy, not its bf16 rounding, and a prefix
  continued with --ptuning_checkpoint starts from its exact fp32 values;
- configs/ds_zero3_offload.json trains with torch's AdamW (nothing to compile) and resumes bitwise.
"""

import json
from functools import partial
from pathlib import Path

import pytest

from test_deepspeed import advertise_gen  # noqa: F401 (a module fixture used here)
from test_deepspeed import free_port, logged_losses, run_fixture, run_together
from test_launchers import run_launcher

ROOT = Path(__file__).resolve().parents[2]
STEPS = 4
PRE_SEQ_LEN = 32  # the prefix outweighs DeepSpeed's per-file metadata, so the size bound says something
PTUNING = f"--pre_seq_len {PRE_SEQ_LEN}"
LORA = "--lora_rank 4 --lora_alpha 8"
QLORA = f"{LORA} --lora_dropout 0 --quantization_bit 4"  # no dropout: one rank and two see the same batches
BYTES_PER_TRAINED_PARAMETER = 4 * 4  # fp32 weight, fp32 master copy, Adam's two moments
ZERO3 = "configs/ds_zero3.json"
RUNS = {  # name: (finetune.py flags, launcher variables)
    "pt_zero2": (PTUNING, dict(PRECISION="bf16", LR="0.05")),
    "pt_zero3": (PTUNING, dict(PRECISION="bf16", LR="0.05", DS_CONFIG=ZERO3)),
    "lora_zero2": (LORA, dict(LR="0.01")),
    "lora_zero3": (LORA, dict(LR="0.01", DS_CONFIG=ZERO3)),
    "offload": ("", dict(PRECISION="bf16", LR="0.01", DS_CONFIG="configs/ds_zero3_offload.json")),
}
RESUMED = ("pt_zero2", "pt_zero3", "lora_zero3", "offload")


@pytest.fixture(scope="module")
def train(tiny_model_dir, advertise_gen, tmp_path_factory):
    """train(name, extra, ranks=1, **variables) -> the output folder of a finished finetune_ds.sh run of
    STEPS steps of 2 records with a checkpoint every 2 steps."""
    def run(name: str, extra: str, ranks: int = 1, **variables) -> Path:
        output_dir = tmp_path_factory.mktemp(name) / "run"
        result = run_launcher(
            "finetune_ds.sh", USE_CPU=1, NUM_GPUS=ranks, MASTER_PORT=free_port(),
            BASE_MODEL_PATH=tiny_model_dir,
            DATASET_PATH=advertise_gen, OUTPUT_DIR=output_dir, MAX_STEP=STEPS, SAVE_INTERVAL=2, LOGGING_STEPS=1,
            DEV_BATCH_SIZE=2 // ranks, GRAD_ACCUMULARION_STEPS=1, MAX_SOURCE_LEN=32, MAX_TARGET_LEN=32, SAVE_EVERY_MINUTES=0,
            EXTRA_ARGS=f"--report_to none --max_train_samples 16 --disable_tqdm true "
                       f"--preprocessing_cache_dir {output_dir.parent / 'cache'} {extra}",
            **variables)
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
        return output_dir
    return run


def together(train, jobs: dict) -> dict:
    """{name: (extra, variables)} -> {name: output folder}: train() for each, run_together."""
    return run_together({name: partial(train, name, extra, **variables) for name, (extra, variables) in jobs.items()})


def resume_flags(run: Path, extra: str) -> str:
    """The flags of a second run that continues `run` from its step-2 checkpoint to step STEPS."""
    return f"{extra} --resume_from_checkpoint {run / 'checkpoint-2'}"


@pytest.fixture(scope="module")
def runs(train) -> dict:
    """The output folders of the RUNS."""
    return together(train, RUNS)


@pytest.fixture(scope="module")
def second_runs(train, runs) -> dict:
    """What continues the RUNS: "<name>_resumed", each of RESUMED resumed with its own settings, and
    "pt_continued", a run continuing pt_zero2's final prefix (--ptuning_checkpoint) with a learning rate of 0."""
    jobs = {f"{name}_resumed": (resume_flags(runs[name], RUNS[name][0]), RUNS[name][1]) for name in RESUMED}
    jobs["pt_continued"] = (f"--ptuning_checkpoint {runs['pt_zero2']}", dict(PRECISION="bf16", LR="0"))
    return together(train, jobs)


pt_zero2 = run_fixture("pt_zero2", "pt_zero2")
pt_zero3 = run_fixture("pt_zero3", "pt_zero3")
lora_zero2 = run_fixture("lora_zero2", "lora_zero2")
lora_zero3 = run_fixture("lora_zero3", "lora_zero3")
offload = run_fixture("offload", "offload")


# ---- reading DeepSpeed checkpoints ---------------------------------------------------------------

def load(path: Path):
    import torch

    return torch.load(path, map_location="cpu", weights_only=False)


def tensors(tree, name: str = ""):
    """(name, tensor) for every tensor in a nested checkpoint structure."""
    import torch

    if torch.is_tensor(tree):
        yield name, tree
    elif isinstance(tree, dict):
        for key, value in tree.items():
            yield from tensors(value, f"{name}.{key}" if name else str(key))
    elif isinstance(tree, (list, tuple)):
        for index, value in enumerate(tree):
            yield from tensors(value, f"{name}[{index}]")


def deepspeed_files(checkpoint: Path) -> list[Path]:
    files = sorted(checkpoint.glob("global_step*/*.pt"))
    assert files, f"no DeepSpeed checkpoint in {checkpoint}"
    return files


def trained_parameter_count(checkpoint: Path) -> int:
    """Parameters the run trained, from the checkpoint's own weights (the prefix or the LoRA adapter)."""
    from safetensors.torch import load_file

    for name in ("prefix_encoder.safetensors", "adapter_model.safetensors"):
        if (checkpoint / name).exists():
            return sum(tensor.numel() for tensor in load_file(str(checkpoint / name)).values())
    raise AssertionError(f"{checkpoint} holds neither a prefix nor a LoRA adapter")


def assert_holds_only_trained_state(checkpoint: Path, is_trained) -> None:
    """No frozen tensor in DeepSpeed's files: the module state names only trained parameters, no
    frozen-parameter fragments are kept, and all their tensors add up to the trained parameters
    (weights, fp32 master copy, Adam's two moments, a few step counters)."""
    trained = trained_parameter_count(checkpoint)
    elements = 0
    for path in deepspeed_files(checkpoint):
        state = load(path)
        if "module" in state:  # a model-state file
            assert state["module"] and all(is_trained(key) for key in state["module"]), (path, list(state["module"]))
            assert not state.get("frozen_param_fragments"), f"{path} keeps frozen parameters"
            assert all(is_trained(key) for group in state["param_shapes"] for key in group), path
        elements += sum(tensor.numel() for _, tensor in tensors(state))
    assert elements <= 4 * trained + 16, (elements, trained)


def assert_within_twice_the_trained_state(checkpoint: Path) -> None:
    """The checkpoint's files that hold weights or optimizer state (DeepSpeed's and the prefix or
    adapter) take at most twice the bytes of the trained parameters plus their optimizer state."""
    trained = trained_parameter_count(checkpoint)
    weights = [path for path in checkpoint.rglob("*") if path.suffix in (".pt", ".safetensors")]
    size = sum(path.stat().st_size for path in weights)
    assert size <= 2 * BYTES_PER_TRAINED_PARAMETER * trained, (size, trained, [path.name for path in weights])


def assert_same_files(first: Path, second: Path, names: list[str]) -> None:
    import torch

    for name in names:
        a, b = dict(tensors(load(first / name))), dict(tensors(load(second / name)))
        assert a.keys() == b.keys(), name
        different = [key for key in a if not torch.equal(a[key], b[key])]
        assert not different, f"{name}: {different}"


def assert_resumed_bitwise(uninterrupted: Path, resumed_run: Path) -> None:
    """Both runs' step-STEPS checkpoints and final weights agree bitwise."""
    import torch
    from safetensors.torch import load_file

    assert logged_losses(resumed_run) == logged_losses(uninterrupted)
    first, second = uninterrupted / f"checkpoint-{STEPS}", resumed_run / f"checkpoint-{STEPS}"
    names = [path.relative_to(first).as_posix() for path in deepspeed_files(first)]
    assert names == [path.relative_to(second).as_posix() for path in deepspeed_files(second)]
    assert_same_files(first, second, names)
    for weights in sorted(path.name for path in uninterrupted.glob("*.safetensors")):
        a, b = load_file(str(uninterrupted / weights)), load_file(str(resumed_run / weights))
        assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a), weights


def is_prefix(key: str) -> bool:
    return key.startswith("prefix_encoder.")


def is_lora(key: str) -> bool:
    return ".lora_A." in key or ".lora_B." in key


# ---- P-Tuning v2 -----------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("run", ["pt_zero2", "pt_zero3"])
def test_ptuning_checkpoints_hold_the_prefix_and_its_optimizer_state_only(run, request):
    output_dir = request.getfixturevalue(run)
    for step in (2, STEPS):
        assert_holds_only_trained_state(output_dir / f"checkpoint-{step}", is_prefix)
        assert_within_twice_the_trained_state(output_dir / f"checkpoint-{step}")


@pytest.mark.slow
@pytest.mark.parametrize("run, config", [("pt_zero2", "configs/ds_zero2.json"), ("pt_zero3", "configs/ds_zero3.json")])
def test_ptuning_resumes_bitwise_from_a_checkpoint_without_the_base(run, config, request, second_runs):
    uninterrupted = request.getfixturevalue(run)
    again = second_runs[f"{run}_resumed"]
    assert json.loads((again / "run_config.json").read_text())["training"]["deepspeed"] == config
    assert_resumed_bitwise(uninterrupted, again)


@pytest.mark.slow
@pytest.mark.parametrize("run", ["pt_zero2", "pt_zero3"])
def test_the_saved_prefix_is_the_fp32_master_copy_under_bf16(run, request):
    import torch
    from safetensors.torch import load_file

    output_dir = request.getfixturevalue(run)
    for folder in (output_dir, output_dir / f"checkpoint-{STEPS}"):
        prefix = load_file(str(folder / "prefix_encoder.safetensors"))["embedding.weight"]
        assert prefix.dtype == torch.float32
        assert not torch.equal(prefix, prefix.bfloat16().float()), f"{folder}: the saved prefix is bf16-rounded"
    for path in deepspeed_files(output_dir / f"checkpoint-{STEPS}"):
        state = load(path)
        assert state["ds_config"]["bf16"]["enabled"] is True
        if "module" not in state:  # the optimizer's state: its fp32 master copy is what was saved
            masters = [tensor for name, tensor in tensors(state) if "fp32" in name and tensor.dtype == torch.float32]
            assert len(masters) == 1, path  # one flat group: the prefix (and padding, if any)
            assert torch.equal(masters[0].flatten()[:prefix.numel()].view_as(prefix), prefix), path


@pytest.mark.slow
def test_a_continued_prefix_starts_from_its_exact_fp32_values(pt_zero2, second_runs):
    import torch
    from safetensors.torch import load_file

    start = load_file(str(pt_zero2 / "prefix_encoder.safetensors"))["embedding.weight"]
    assert not torch.equal(start, start.bfloat16().float())
    # ZeRO-2 trains a bf16 copy of the prefix, and DeepSpeed makes the fp32 master copy from it. With
    # a learning rate of 0, any rounding of the start is what gets saved.
    output_dir = second_runs["pt_continued"]
    assert torch.equal(load_file(str(output_dir / "prefix_encoder.safetensors"))["embedding.weight"], start)


# ---- LoRA --------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("run", ["lora_zero2", "lora_zero3"])
def test_lora_checkpoints_hold_the_adapter_and_its_optimizer_state_only(run, request):
    output_dir = request.getfixturevalue(run)
    assert_holds_only_trained_state(output_dir / f"checkpoint-{STEPS}", is_lora)
    assert_within_twice_the_trained_state(output_dir / f"checkpoint-{STEPS}")


@pytest.mark.slow
def test_lora_resumes_bitwise_under_zero3(lora_zero3, second_runs):
    assert_resumed_bitwise(lora_zero3, second_runs["lora_zero3_resumed"])


@pytest.mark.slow
def test_qlora_under_zero3_on_two_ranks_trains_checkpoints_the_adapter_and_resumes(train):
    """4-bit weights, packed in the compute dtype, are what ZeRO-3 partitions across the ranks: two ranks
    log the losses of one ZeRO-2 process, checkpoint the adapter alone (no quantization constants of
    the base) and resume bitwise."""
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed: quantized bases cannot be tested")
    two_ranks_settings = dict(ranks=2, LR="0.01", DS_CONFIG=ZERO3)
    first = together(train, {"qlora_zero3_2": (QLORA, two_ranks_settings), "qlora_zero2": (QLORA, dict(LR="0.01"))})
    two_ranks, one_process = first["qlora_zero3_2"], first["qlora_zero2"]
    assert logged_losses(two_ranks) == pytest.approx(logged_losses(one_process), abs=1e-4)
    assert logged_losses(two_ranks)[-1] < logged_losses(two_ranks)[0]
    checkpoint = two_ranks / f"checkpoint-{STEPS}"
    assert len(deepspeed_files(checkpoint)) == 4  # model and optimizer states of each rank
    assert_holds_only_trained_state(checkpoint, is_lora)
    assert_within_twice_the_trained_state(checkpoint)
    again = train("qlora_zero3_2_resumed", resume_flags(two_ranks, QLORA), **two_ranks_settings)
    assert_resumed_bitwise(two_ranks, again)


# ---- ZeRO-3 with CPU offload -------------------------------------------------------------------------

def test_the_offload_config_uses_torch_adam():
    config = json.loads((ROOT / "configs" / "ds_zero3_offload.json").read_text())
    # DeepSpeed's own CPU Adam would be compiled with g++ and ninja on the first run.
    assert config["optimizer"]["params"]["torch_adam"] is True
    assert config["optimizer"]["params"]["fused"] is True  # torch's vectorised CPU kernel


@pytest.mark.slow
def test_zero3_offload_trains_with_torch_adamw_and_resumes_bitwise(offload, second_runs):
    losses = logged_losses(offload)
    assert len(losses) == STEPS and losses[-1] < losses[0], losses
    optimizer_files = [path for path in deepspeed_files(offload / f"checkpoint-{STEPS}") if "optim_states" in path.name]
    assert optimizer_files
    for path in optimizer_files:
        groups = load(path)["optimizer_state_dict"]["optimizer_state_dict"]["param_groups"]
        # torch.optim.AdamW's own settings; DeepSpeedCPUAdam's groups have none of them
        assert all(group["fused"] is True and "foreach" in group for group in groups), groups
    assert_resumed_bitwise(offload, second_runs["offload_resumed"])
