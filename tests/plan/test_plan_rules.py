"""The plan's fixed rules: DeepSpeed's partitions, quantized storage, cards, FLOPs, host memory, disk."""

import json

import pytest
import torch

from chatglm3_finetune.plan.cards import GIB, closest_card, parse_memory
from chatglm3_finetune.plan.deepspeed_rules import zero_dtype, zero_memory, zero_settings
from chatglm3_finetune.plan.flops import batch_flops, recompute_flops
from chatglm3_finetune.plan.host_disk import checkpoint_bytes, host_memory_at_load, run_disk
from chatglm3_finetune.plan.quantized import quantized_layout
from conftest import ROOT

P = 6_243_584_000  # ChatGLM3-6B's parameters
LARGEST = 65024 * 4096  # its embedding


def config(name):
    return json.loads((ROOT / "configs" / name).read_text())


@pytest.mark.parametrize("gpus", [1, 4, 8])
def test_zero2_at_the_step_is_deepspeeds_own_estimate(gpus):
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    settings = zero_settings(config("ds_zero2.json"), 4096, "bf16")
    memory = zero_memory(settings, trainable=P, frozen_bytes=0, total_params=P, world_size=gpus, gpus_per_node=gpus)
    states = sum(v for k, v in memory.step.items() if not k.startswith("DeepSpeed"))
    _, deepspeed_gpu = estimate_zero2_model_states_mem_needs(P, gpus, 1, cpu_offload=False)
    assert states == pytest.approx(deepspeed_gpu, rel=1e-6)
    # during the backward there is no fp32 gradient partition yet
    backward_states = sum(v for k, v in memory.backward.items() if not k.startswith("DeepSpeed"))
    assert states - backward_states == pytest.approx(4 * P / gpus, rel=1e-6)


def test_zero2_offload_leaves_the_16_bit_weights_on_the_gpu_as_deepspeed_estimates():
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    offload = {**config("ds_zero2.json")}
    offload["zero_optimization"] = {**offload["zero_optimization"], "offload_optimizer": {"device": "cpu"}}
    memory = zero_memory(zero_settings(offload, 4096, "bf16"), P, 0, P, 4, 4)
    states = sum(v for k, v in memory.step.items() if not k.startswith("DeepSpeed"))
    _, deepspeed_gpu = estimate_zero2_model_states_mem_needs(P, 4, 1, cpu_offload=True)
    assert states == pytest.approx(deepspeed_gpu, rel=1e-6)
    assert memory.host_per_node == pytest.approx(16 * P * 1.5, rel=1e-6)


def test_zero3_partitions_everything_and_bounds_the_gathered_parameters():
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    settings = zero_settings(config("ds_zero3.json"), 4096, "bf16")
    assert settings.reduce_bucket_size == 4096 * 4096  # "auto", filled as the HF Trainer fills it
    assert settings.prefetch_bucket_size == int(0.9 * 4096 * 4096) and settings.overlap_comm
    memory = zero_memory(settings, P, 0, P, 4, 4)
    assert memory.backward["trainable"] == pytest.approx(2 * P / 4, rel=1e-6)
    assert memory.backward["DeepSpeed gathered parameters (stage3_max_live_parameters)"] == 2 * int(1e9)
    states = sum(v for k, v in memory.step.items() if not k.startswith("DeepSpeed"))
    _, deepspeed_gpu, largest_memory = estimate_zero3_model_states_mem_needs(P, LARGEST, 4, 1, cpu_offload=False)
    # DeepSpeed's estimate counts 18 bytes per parameter and process; the step holds 20: the 16-bit
    # partition of parameters and gradients (2 + 2), the fp32 gradient copy (4) and the optimizer (12)
    assert states == pytest.approx(deepspeed_gpu - largest_memory + 2 * P / 4, rel=1e-6)


def test_frozen_weights_stay_whole_under_zero2_and_are_partitioned_under_zero3():
    frozen = 12 * GIB
    zero2 = zero_memory(zero_settings(config("ds_zero2.json"), 4096, "bf16"), 1_000_000, frozen, P, 4, 4)
    zero3 = zero_memory(zero_settings(config("ds_zero3.json"), 4096, "bf16"), 1_000_000, frozen, P, 4, 4)
    assert zero2.backward["weights"] == frozen and zero3.backward["weights"] == frozen // 4


def test_deepspeed_auto_precision_follows_the_command():
    ds = config("ds_zero2.json")
    assert zero_dtype(ds, "bf16") == torch.bfloat16 and zero_dtype(ds, "fp16") == torch.float16
    assert zero_dtype(ds, None) == torch.float32 and zero_settings(ds, 64, None).dtype_bytes == 4


def test_bitsandbytes_storage():
    assert quantized_layout(4096, 4096, 8) == {"weight": ((4096, 4096), torch.int8), "SCB": ((4096,), torch.float32)}
    four = quantized_layout(4096, 4096, 4)
    assert four["weight"] == ((4096 * 4096 // 2, 1), torch.uint8)
    assert four["absmax"] == ((4096 * 4096 // 64,), torch.uint8)  # double quantization: 8-bit absmax
    bytes_4bit = sum(torch.Size(shape).numel() * torch.tensor([], dtype=dtype).element_size()
                     for shape, dtype in four.values())
    assert 0.51 < bytes_4bit / (4096 * 4096) < 0.52  # 4.13 bits per weight


@pytest.mark.parametrize("text,expected", [("24GB", 24 * GIB), ("24 GiB", 24 * GIB), ("80", 80 * GIB),
                                           ("40960MB", 40 * GIB), ("0.5gb", GIB // 2)])
def test_memory_sizes(text, expected):
    assert parse_memory(text) == expected


@pytest.mark.parametrize("text", ["24TB", "lots", "-3GB", "0GB"])
def test_bad_memory_sizes_say_how_to_write_one(text):
    with pytest.raises(ValueError, match="24GB|more than zero"):
        parse_memory(text)


def test_a_given_size_takes_the_rate_of_the_closest_card():
    assert closest_card(24 * GIB).name == "RTX 4090 24GB"
    assert closest_card(80 * GIB).name in ("A100 80GB", "H100 80GB")


def test_recomputation_adds_the_layers_forward_and_the_loss_chunks():
    shape = {"body_params": 1000, "layers": 2, "attn_dim": 8, "hidden": 4, "vocab": 10}
    batch = {"real_tokens": 7, "record_lengths": [3, 4], "supervised_tokens": 5}
    assert recompute_flops(shape, batch, checkpointing=False, loss_chunk_size=None) == 0
    assert recompute_flops(shape, batch, checkpointing=True, loss_chunk_size=None) == 2 * 1000 * 7 + 2 * 2 * 8 * 25
    assert recompute_flops(shape, batch, checkpointing=False, loss_chunk_size=4) == 2 * 4 * 10 * 5
    assert recompute_flops(shape, batch, checkpointing=False, loss_chunk_size=5) == 0  # one chunk is kept
    # checkpointing repeats the forward: a third of what a trained model does per token
    no_prefix = batch_flops(shape, {**batch, "supervised_tokens": 0}, trains_weights=True, full_logits=False)
    assert recompute_flops(shape, batch, True, None) == pytest.approx(no_prefix / 3)


def test_checkpoint_and_run_disk():
    ptuning = checkpoint_bytes("ptuning", 1_835_008, P, 2, None)
    assert ptuning["weights"] == 4 * 1_835_008 and ptuning["optimizer.pt"] == 8 * 1_835_008
    full = checkpoint_bytes("full", P, P, 4, None)
    assert full["weights"] == 4 * P and full["optimizer.pt"] == 8 * P
    zero3 = checkpoint_bytes("full", P, P, 4, 3)
    assert zero3["weights"] == 2 * P and zero3["deepspeed optimizer partitions"] == 12 * P
    assert run_disk(100, 10, steps=1000, save_steps=300, save_total_limit=None) == {
        "checkpoints_written": 3, "checkpoints_kept": 3, "run_bytes": 310}
    assert run_disk(100, 10, steps=1000, save_steps=100, save_total_limit=2)["run_bytes"] == 210


def model_folder(folder, dtype, shard_sizes=()):
    """A model folder with a config naming `dtype` and weight files of the sizes given."""
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"dtype": dtype}))
    for index, size in enumerate(shard_sizes):
        (folder / f"model-{index}.safetensors").write_bytes(b"\0" * size)
    return folder


def host(folder, load_dtype=torch.bfloat16, quantized=False, zero_stage=None, processes=4, params=1000):
    from transformers import PretrainedConfig

    config = PretrainedConfig(dtype=json.loads((folder / "config.json").read_text())["dtype"])
    return host_memory_at_load(str(folder), config, params, load_dtype, quantized, zero_stage,
                               gpus_per_node=processes, world_size=processes)


def test_host_memory_at_load(tmp_path):
    stored_bf16 = model_folder(tmp_path / "bf16", "bfloat16", (1200, 800))
    mapped = host(stored_bf16)  # stored as loaded: mapped, the processes of a node share the pages
    assert (mapped["per_process_bytes"], mapped["per_node_bytes"], mapped["checkpoint_files_bytes"]) == (2000, 2000, 2000)
    assert "share one copy" in mapped["how"]

    cast = host(model_folder(tmp_path / "fp16", "float16", (2000,)))  # every process casts its own copy
    assert (cast["per_process_bytes"], cast["per_node_bytes"]) == (2000, 8000)
    widened = host(stored_bf16, load_dtype=torch.float32)
    assert (widened["per_process_bytes"], widened["per_node_bytes"]) == (4000, 16000) and "widened" in widened["how"]

    config_only = host(model_folder(tmp_path / "config", "bfloat16"))  # planned before the weights are there
    assert config_only["per_node_bytes"] == 2000 and "as its config says" in config_only["how"]

    zero3 = host(stored_bf16, zero_stage=3)  # a partition each, plus the file being read
    assert zero3["per_process_bytes"] == 1200 + 2000 // 4 and zero3["per_node_bytes"] == 4 * (1200 + 500)
    quantized = host(stored_bf16, quantized=True)  # to the GPU as it loads, a file at a time
    assert quantized["per_process_bytes"] == 1200


def test_the_6b_config_is_what_the_conversion_writes():
    from chatglm3_finetune.model.conversion import DEFAULT_DTYPE

    assert config("chatglm3-6b/config.json")["dtype"] == str(DEFAULT_DTYPE).replace("torch.", "")

