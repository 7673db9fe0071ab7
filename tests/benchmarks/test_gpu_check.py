"""benchmarks/gpu_check.sh --dry: every case of the GPU check runs its code path on tiny shapes on the CPU."""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.mark.slow
def test_gpu_check_dry_runs_every_case_and_prints_table_and_json(tmp_path):
    out = tmp_path / "gpu_check.json"
    run = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry", "--json", str(out)],
                         capture_output=True, text=True, timeout=900, cwd=str(ROOT),
                         env={**os.environ, "PYTHON": sys.executable})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = {r["case"]: r for r in json.loads(out.read_text())}
    assert list(results) == ["ptuning", "lora", "packing", "zero3"]  # packing_fa2 only where flash_attn imports
    assert "case" in run.stdout and "MFU" in run.stdout and json.loads(run.stdout[run.stdout.index("["):]) == list(results.values())
    for case, r in results.items():
        assert r["dry"] and r["tokens"] == 64 and r["step_s"] > 0 and 0 < r["mfu"] < 1, case
        assert all(loss == loss and 5 < loss < 15 for loss in r["losses"]), case  # finite, near ln(65024)
    assert results["packing"]["records"] > 1 and results["packing"]["attention"] == "packed_sdpa"
    assert results["ptuning"]["method"] == "ptuning" and results["lora"]["method"] == "lora"
    assert results["zero3"]["method"] == "full" and results["zero3"]["params"] > 8e6  # whole parameters, not shards
