"""P-Tuning v2 and full fine-tuning under DeepSpeed ZeRO-2/3 on the CPU, through the launchers
(USE_CPU=1: DS_ACCELERATOR=cpu, gloo, --use_cpu).

Every run trains on the same 4 records with a global batch of 4 and no dropout, so every step sees
the same batch: one process, two DeepSpeed ranks and two DDP ranks must log the same losses."""

import json
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from test_launchers import SAMPLES, run_launcher

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ("ds_zero2.json", "ds_zero3.json", "ds_zero3_offload.json")
STEPS = 4
CONCURRENT_RUNS = 2  # launches at a time: the runs are independent processes, most of their time start-up


def all_values(tree):
    if isinstance(tree, dict):
        for value in tree.values():
            yield from all_values(value)
    else:
        yield tree


@pytest.mark.parametrize("name", CONFIGS)
def test_the_trainer_fills_every_auto_value(name):
    import torch
    from transformers import Seq2SeqTrainingArguments
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    config_file = ROOT / "configs" / name
    raw = json.loads(config_file.read_text())
    assert "auto" in list(all_values(raw))
    args = Seq2SeqTrainingArguments(output_dir="unused", use_cpu=True, per_device_train_batch_size=3,
                                    gradient_accumulation_steps=2, learning_rate=1e-3, bf16=True, report_to="none")
    config = HfTrainerDeepSpeedConfig(str(config_file))
    config.trainer_config_process(args)
    model = torch.nn.Linear(1, 1)
    model.config = type("Config", (), {"hidden_size": 64})()
    config.trainer_config_finalize(args, model, num_training_steps=10)
    filled = config.config
    assert "auto" not in list(all_values(filled)), filled
    assert (filled["train_micro_batch_size_per_gpu"], filled["gradient_accumulation_steps"]) == (3, 2)
    assert filled["optimizer"]["params"]["lr"] == 1e-3 and filled["gradient_clipping"] == 1.0
    assert filled["bf16"]["enabled"] is True and filled["fp16"]["enabled"] is False
    zero = filled["zero_optimization"]
    if name == "ds_zero2.json":
        assert zero["stage"] == 2 and zero["contiguous_gradients"] and zero["overlap_comm"]
        assert zero["allgather_bucket_size"] == zero["reduce_bucket_size"] == 5e8
        assert zero["offload_optimizer"]["device"] == "none"
    else:
        assert zero["stage"] == 3 and zero["stage3_gather_16bit_weights_on_model_save"] is True
        offload = name == "ds_zero3_offload.json"
        assert {zero.get("offload_param", {}).get("device"), zero.get("offload_optimizer", {}).get("device")} == (
            {"cpu"} if offload else {None})


def run_together(jobs: dict) -> dict:
    """{name: a function that runs a launcher} -> {name: what it returned}: the jobs CONCURRENT_RUNS at a
    time (each runs its own processes; the threads only wait for them)."""
    with ThreadPoolExecutor(CONCURRENT_RUNS) as pool:
        futures = {name: pool.submit(job) for name, job in jobs.items()}
        return {name: future.result() for name, future in futures.items()}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def advertise_gen(tmp_path_factory) -> Path:
    from chatglm3_finetune.data.converters import advertise_gen

    output = tmp_path_factory.mktemp("formatted_data") / "advertise_gen.jsonl"
    assert advertise_gen.main(["--path", str(SAMPLES / "advertise_gen_train.json"), "--output", str(output)]) == 0
    return output


@pytest.fixture(scope="module")
def train(tiny_model_dir, advertise_gen, tmp_path_factory):
    """train(name, launcher, ranks, extra, **variables) -> the output folder of a finished run."""
    def run(name: str, launcher: str = "finetune_ds.sh", ranks: int = 1, extra: str = "", **variables) -> Path:
        output_dir = tmp_path_factory.mktemp(name) / "run"
        result = run_launcher(
            launcher, USE_CPU=1, NUM_GPUS=ranks, MASTER_PORT=free_port(),
            BASE_MODEL_PATH=tiny_model_dir,
            DATASET_PATH=advertise_gen, OUTPUT_DIR=output_dir, MAX_STEP=STEPS, SAVE_INTERVAL=STEPS, LOGGING_STEPS=1,
            DEV_BATCH_SIZE=4 // ranks, GRAD_ACCUMULARION_STEPS=1, MAX_SOURCE_LEN=64, MAX_TARGET_LEN=64,
            EXTRA_ARGS=f"--report_to none --max_train_samples 4 --disable_tqdm true "
                       f"--preprocessing_cache_dir {output_dir.parent / 'cache'} {extra}",
            **variables)
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
        return output_dir
    return run


PTUNING = "--pre_seq_len 4 --prefix_dropout 0"


@pytest.fixture(scope="module")
def runs(train) -> dict:
    """The output folders of the module's five runs, which only read what they left."""
    return run_together({
        "pt_zero2": lambda: train("pt_zero2", extra=PTUNING, LR="0.05"),
        "pt_zero3_2": lambda: train("pt_zero3_2", ranks=2, extra=PTUNING, LR="0.05", DS_CONFIG="configs/ds_zero3.json"),
        "pt_ddp_2": lambda: train("pt_ddp_2", launcher="finetune_pt.sh", ranks=2, extra="--prefix_dropout 0",
                                  LR="0.05", PRE_SEQ_LEN=4),
        "full_zero2": lambda: train("full_zero2", LR="0.01"),
        "full_zero3": lambda: train("full_zero3", LR="0.01", DS_CONFIG="configs/ds_zero3.json"),
    })


def run_fixture(name: str, key: str):
    """A module fixture `name`: the output folder of the module's run `key` (from its `runs` fixture)."""
    return pytest.fixture(scope="module", name=name)(lambda runs: runs[key])


pt_zero2 = run_fixture("pt_zero2", "pt_zero2")
pt_zero3_two_ranks = run_fixture("pt_zero3_two_ranks", "pt_zero3_2")
pt_ddp_two_ranks = run_fixture("pt_ddp_two_ranks", "pt_ddp_2")
full_zero2 = run_fixture("full_zero2", "full_zero2")
full_zero3 = run_fixture("full_zero3", "full_zero3")


def logged_losses(output_dir: Path) -> list[float]:
    state = json.loads((output_dir / "trainer_state.json").read_text())
    return [entry["loss"] for entry in state["log_history"] if "loss" in entry]


def weight_files(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir()
                  if path.suffix in (".safetensors", ".bin") and path.name != "training_args.bin")


@pytest.mark.slow
def test_ptuning_under_zero2_trains_the_prefix_alone(pt_zero2, tiny_model_dir):
    losses = logged_losses(pt_zero2)
    assert len(losses) == STEPS and losses[-1] < losses[0] - 1e-3, losses
    assert weight_files(pt_zero2) == ["prefix_encoder.safetensors"]
    assert json.loads((pt_zero2 / "run_config.json").read_text())["training"]["deepspeed"] == "configs/ds_zero2.json"


@pytest.mark.slow
def test_two_zero3_ranks_log_the_losses_of_one_process(pt_zero2, pt_zero3_two_ranks):
    assert logged_losses(pt_zero3_two_ranks) == pytest.approx(logged_losses(pt_zero2), abs=1e-4)


@pytest.mark.slow
def test_two_ddp_ranks_log_the_losses_of_one_process(pt_zero2, pt_ddp_two_ranks):
    assert logged_losses(pt_ddp_two_ranks) == pytest.approx(logged_losses(pt_zero2), abs=1e-4)


@pytest.mark.slow
def test_ptuning_under_zero3_saves_a_prefix_that_reloads(pt_zero3_two_ranks, pt_zero2, tiny_model_dir):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from chatglm3_finetune.model.ptuning.prefix_model import PrefixTuningModel

    for folder in (pt_zero3_two_ranks, pt_zero3_two_ranks / f"checkpoint-{STEPS}"):
        assert weight_files(folder) == ["prefix_encoder.safetensors"], folder
    model = PrefixTuningModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                              str(pt_zero3_two_ranks))
    gathered = model.prefix_encoder.embedding.weight
    assert gathered.shape == (4, model.prefix_encoder.kv_size)
    # The partitioned prefix was gathered whole, and equals what one ZeRO-2 process trained.
    one_process = load_file(str(pt_zero2 / "prefix_encoder.safetensors"))["embedding.weight"]
    torch.testing.assert_close(gathered, one_process, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_two_zero3_ranks_checkpoint_the_prefix_without_the_base(pt_zero3_two_ranks):
    from test_deepspeed_checkpoints import assert_holds_only_trained_state, deepspeed_files, is_prefix

    checkpoint = pt_zero3_two_ranks / f"checkpoint-{STEPS}"
    assert {path.name for path in deepspeed_files(checkpoint)} == {
        f"zero_pp_rank_{rank}_mp_rank_00_{kind}_states.pt" for rank in (0, 1) for kind in ("model", "optim")}
    assert_holds_only_trained_state(checkpoint, is_prefix)


@pytest.mark.slow
def test_full_fine_tuning_zero2_and_zero3_agree_and_zero3_reloads(full_zero2, full_zero3, tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    losses = logged_losses(full_zero3)
    assert len(losses) == STEPS and losses[-1] < losses[0] - 0.05, losses
    assert losses == pytest.approx(logged_losses(full_zero2), abs=1e-4)

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    zero3 = AutoModelForCausalLM.from_pretrained(full_zero3).state_dict()
    zero2 = AutoModelForCausalLM.from_pretrained(full_zero2).state_dict()
    assert zero3.keys() == base.keys() == zero2.keys()
    assert all(zero3[key].shape == base[key].shape for key in base)
    trained = [key for key in base if not torch.equal(zero3[key], base[key])]
    assert len(trained) == len(base), "every parameter takes gradient steps in full fine-tuning"
    for key in base:
        torch.testing.assert_close(zero3[key], zero2[key], atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_a_damaged_deepspeed_checkpoint_is_refused_before_anything_changes(full_zero2, tiny_model_dir, advertise_gen,
                                                                           tmp_path):
    """DeepSpeed's own files (global_stepN/) are in the checkpoint's manifest like every other file."""
    import shutil

    from chatglm3_finetune.train.checkpoints import NoGoodCheckpoint, choose_checkpoint
    from test_run_record import snapshot

    output_dir = tmp_path / "run"
    shutil.copytree(full_zero2, output_dir)
    shards = output_dir / f"checkpoint-{STEPS}" / f"global_step{STEPS}"
    optimizer_states = shards / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    model_states = shards / "mp_rank_00_model_states.pt"
    saved = model_states.read_bytes()
    model_states.unlink()
    with pytest.raises(NoGoodCheckpoint, match=f"global_step{STEPS}/mp_rank_00_model_states.pt is missing"):
        choose_checkpoint(str(output_dir))
    model_states.write_bytes(saved)
    optimizer_states.write_bytes(b"\0" * optimizer_states.stat().st_size)
    with pytest.raises(NoGoodCheckpoint, match=f"global_step{STEPS}/zero_pp_rank_0_mp_rank_00_optim_states.pt does "
                                               f"not hold what was written"):
        choose_checkpoint(str(output_dir))
    before = snapshot(output_dir)

    def rerun(steps):
        return run_launcher("finetune_ds.sh", USE_CPU=1, NUM_GPUS=1, MASTER_PORT=free_port(),
                            BASE_MODEL_PATH=tiny_model_dir, DATASET_PATH=advertise_gen, OUTPUT_DIR=output_dir,
                            MAX_STEP=steps, SAVE_INTERVAL=STEPS, LOGGING_STEPS=1, DEV_BATCH_SIZE=4,
                            GRAD_ACCUMULARION_STEPS=1, MAX_SOURCE_LEN=64, MAX_TARGET_LEN=64, LR="0.01",
                            EXTRA_ARGS=f"--report_to none --max_train_samples 4 --disable_tqdm true "
                                       f"--preprocessing_cache_dir {tmp_path / 'cache'}")

    result = rerun(STEPS + 2)
    assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-3000:]
    errors = [line for line in result.stdout.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and f"(checkpoint-{STEPS}: global_step{STEPS}/zero_pp_rank_0_mp_rank_00_optim_states.pt " \
        "does not hold what was written" in errors[0]
    assert "Traceback" not in result.stdout + result.stderr
    after = snapshot(output_dir)
    assert {path for path in set(after) | set(before) if after.get(path) != before.get(path)} == {
        str(output_dir / "train.log")}  # the launcher's log of this try, nothing else

    same = rerun(STEPS)  # the finished run's final model is intact: nothing to do
    assert same.returncode == 0 and "already finished with these settings: nothing to do" in same.stdout
