"""benchmarks/bench_offload_adam.py on a small tensor: the optimizers it compares agree, its rows and JSON."""

import json
import subprocess
import sys

from conftest import ROOT


def test_the_offload_optimizers_are_timed_and_agree(tmp_path):
    output = tmp_path / "adam.json"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_offload_adam.py"), "--params", "5000",
                          "--steps", "2", "--threads", "1", "--no-cpu-adam", "--json", str(output)],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(output.read_text())
    assert (result["params"], result["steps"], result["threads"]) == (5000, 2, 1)
    rows = {row["optimizer"]: row for row in result["rows"]}
    fused, foreach = rows["torch AdamW, fused (the offload config)"], rows["torch AdamW, foreach (torch_adam alone)"]
    assert fused["status"] == foreach["status"] == "ok"
    assert fused["max_abs_difference_from_fused"] == 0 and foreach["max_abs_difference_from_fused"] < 1e-5
    assert fused["ms_per_step"] > 0 and foreach["million_params_per_s"] > 0
    assert rows["DeepSpeedCPUAdam (compiled op)"]["status"] == "not run: --no-cpu-adam"
    for name in rows:
        assert name in run.stdout
