"""Not part of the suite (no `test_` prefix, so pytest does not collect it): tests/test_suite_stop.py
runs it in a pytest of its own and stops that pytest while its trainings run.

It starts what the suite's tests start: a launcher (bash, then finetune.py, and tee) in a session
of its own, as the launcher tests do, and then a training through run_finetune, which blocks until
the training ends; both would run for far longer than anyone waits."""

import os
import subprocess
import sys

from conftest import ROOT, run_finetune
from test_finetune import common_args


def test_long_trainings(tiny_model_dir, formatted_samples, tmp_path):
    data = formatted_samples["multi-turn"]
    env = {**os.environ, "USE_CPU": "1", "BASE_MODEL_PATH": tiny_model_dir, "DATASET_PATH": data,
           "OUTPUT_DIR": str(tmp_path / "launched"), "MAX_STEP": "100000", "SAVE_INTERVAL": "100000",
           "LOGGING_STEPS": "1", "PRE_SEQ_LEN": "4", "DEV_BATCH_SIZE": "1", "GRAD_ACCUMULARION_STEPS": "1",
           "MAX_SEQ_LEN": "256", "PYTHON": sys.executable, "SAVE_EVERY_MINUTES": "0",
           "EXTRA_ARGS": f"--report_to none --disable_tqdm true --preprocessing_cache_dir {tmp_path / 'cache'}"}
    subprocess.Popen(["bash", str(ROOT / "scripts" / "finetune_pt_multiturn.sh")], env=env, cwd=ROOT,
                     start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run_finetune(*common_args(tiny_model_dir, data, tmp_path / "blocking", "--pre_seq_len", "4",
                              "--max_steps", "100000", "--save_steps", "100000"), timeout=3600)
