"""DeepSpeed on the CPU starts without compiling anything: its shared-memory all-reduce op is not
built (compat.skip_deepspeed_cpu_shared_memory_op), so neither a missing compiler nor the lock file
of a build that was killed can stop or stall a run."""

import json
import subprocess

import pytest

from test_deepspeed import free_port
from test_launchers import run_launcher


@pytest.mark.slow
def test_two_ranks_train_past_the_lock_of_a_killed_op_build(tiny_model_dir, tmp_path):
    extensions = tmp_path / "torch_extensions"
    stale = extensions / "deepspeed_shm_comm"  # where torch builds it when TORCH_EXTENSIONS_DIR is set
    stale.mkdir(parents=True)
    (stale / "lock").touch()  # what a build killed midway leaves: torch waits for it to go away
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Say {n}.", "response": f"{n}."}) + "\n" for n in range(2)))
    output_dir = tmp_path / "run"
    try:
        result = run_launcher(
            "finetune_ds.sh", timeout=120, USE_CPU=1, NUM_GPUS=2, MASTER_PORT=free_port(), TORCH_EXTENSIONS_DIR=extensions,
            BASE_MODEL_PATH=tiny_model_dir, DATASET_PATH=data, OUTPUT_DIR=output_dir,
            MAX_STEP=1, SAVE_INTERVAL=1, DEV_BATCH_SIZE=1, GRAD_ACCUMULARION_STEPS=1, MAX_SOURCE_LEN=32,
            MAX_TARGET_LEN=16, EXTRA_ARGS="--report_to none --pre_seq_len 4")
    except subprocess.TimeoutExpired:
        pytest.fail("DeepSpeed waited for the lock of its shared-memory op build")
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-4000:]
    assert "deepspeed_shm_comm" not in out
    assert sorted(p.name for p in stale.iterdir()) == ["lock"]  # nothing was built
    assert (output_dir / "checkpoint-1").is_dir()
