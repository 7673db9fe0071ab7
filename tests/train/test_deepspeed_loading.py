"""Full fine-tuning under DeepSpeed bf16 loads the model in bf16 (`--torch_dtype auto`), not fp32: the
DeepSpeed engine casts the weights to bf16 anyway and ZeRO keeps the fp32 master copy in the
optimizer's partitions, so training is the same to the bit, with half the host memory at load
(benchmarks/bench_load_memory.py measures it). Under ZeRO-3 the model is built partitioned
(zero.Init), because finetune.py knows the DeepSpeed config before it loads the model."""

import json
import re
from functools import partial
from pathlib import Path

import pytest

from test_deepspeed import advertise_gen  # noqa: F401 (a module fixture used here)
from test_deepspeed import free_port, logged_losses, run_together
from test_launchers import run_launcher

STEPS = 3


def train_bf16(tiny_model_dir, data, output_dir: Path, config: str, torch_dtype: str):
    result = run_launcher(
        "finetune_ds.sh", USE_CPU=1, NUM_GPUS=1, PRECISION="bf16", MASTER_PORT=free_port(), BASE_MODEL_PATH=tiny_model_dir,
        DATASET_PATH=data, OUTPUT_DIR=output_dir, MAX_STEP=STEPS, SAVE_INTERVAL=STEPS, LOGGING_STEPS=1, LR="0.01",
        DEV_BATCH_SIZE=4, GRAD_ACCUMULARION_STEPS=1, MAX_SOURCE_LEN=64, MAX_TARGET_LEN=64, DS_CONFIG=config,
        EXTRA_ARGS=f"--report_to none --max_train_samples 4 --disable_tqdm true --torch_dtype {torch_dtype} "
                   f"--preprocessing_cache_dir {output_dir.parent / 'cache'}")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result


@pytest.mark.slow
@pytest.mark.parametrize("config", ["configs/ds_zero2.json", "configs/ds_zero3.json"])
def test_bf16_full_fine_tuning_loads_bf16_and_trains_as_from_fp32(config, tiny_model_dir, advertise_gen, tmp_path):
    import torch
    from safetensors import safe_open

    runs = run_together({dtype: partial(train_bf16, tiny_model_dir, advertise_gen, tmp_path / dtype / "run", config,
                                        dtype) for dtype in ("auto", "float32")})
    loaded = {dtype: re.search(r"Loaded .*\(GlmForCausalLM, [\d.]+M parameters, (torch\.\w+)", result.stdout).group(1)
              for dtype, result in runs.items()}
    assert loaded == {"auto": "torch.bfloat16", "float32": "torch.float32"}
    if "zero3" in config:  # built partitioned: the DeepSpeed config was known before the model loaded
        assert all("partitioned across the ranks by ZeRO-3 as it loaded" in result.stdout for result in runs.values())
    losses = {dtype: logged_losses(tmp_path / dtype / "run") for dtype in runs}
    assert len(losses["auto"]) == STEPS and losses["auto"][-1] < losses["auto"][0]
    assert losses["auto"] == losses["float32"]  # exactly: the same bf16 weights and fp32 master copy
    saved = {}
    for dtype in runs:
        with safe_open(str(tmp_path / dtype / "run" / "model.safetensors"), "pt") as f:
            saved[dtype] = {name: f.get_tensor(name) for name in f.keys()}
    assert saved["auto"].keys() == saved["float32"].keys()
    assert all(torch.equal(saved["auto"][name], saved["float32"][name]) for name in saved["auto"])
    assert json.loads((tmp_path / "auto" / "run" / "run_config.json").read_text())["model"]["torch_dtype"] == "auto"
