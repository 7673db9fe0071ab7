"""benchmarks/bench_train.py end to end on the tiny config: one process per mode, the JSON it writes."""

import json

import pytest

from conftest import ROOT, shared_path

import runpy  # noqa: E402

BENCH_TRAIN = runpy.run_path(str(ROOT / "benchmarks" / "bench_train.py"))
batch_flops = BENCH_TRAIN["batch_flops"]

REQUIRED_KEYS = {"mode", "real_tokens_per_s", "supervised_tokens_per_s", "padding_fraction", "step_time_s",
                 "peak_mem_mb", "mfu"}
ADVERTISEGEN_CAP = 1024 + 128 + 1  # prompt cap + response cap + eos: what the reference pads to


def test_batch_flops_counts_the_documented_formula():
    shape = {"body_params": 100, "layers": 2, "attn_dim": 8, "hidden": 4, "vocab": 10}
    # two rows padded to 5: records of 3 and 4 tokens, 3 of them targets
    batch = {"rows": 2, "padded_length": 5, "real_tokens": 7, "supervised_tokens": 3, "record_lengths": [3, 4]}
    body, attention = 6 * 100 * 7, 6 * 2 * 8 * (3 * 3 + 4 * 4)
    assert batch_flops(shape, batch, trains_weights=True, full_logits=False) == body + attention + 6 * 4 * 10 * 3
    assert batch_flops(shape, batch, trains_weights=True, full_logits=True) == body + attention + 6 * 4 * 10 * 7
    # executed: every padded position, each row one causal sequence of 5
    assert batch_flops(shape, batch, trains_weights=True, full_logits=False, executed=True) == (
        6 * 100 * 10 + 6 * 2 * 8 * (5 * 5 + 5 * 5) + 6 * 4 * 10 * 3)
    # P-Tuning: frozen weights (no weight gradients: 4 instead of 6), every token also attends to the prefix
    assert batch_flops(shape, batch, trains_weights=False, full_logits=False, prefix_len=3) == (
        4 * 100 * 7 + attention + 12 * 2 * 8 * 3 * 7 + 4 * 4 * 10 * 3)


@pytest.mark.slow
def test_bench_train_runs_modes_and_writes_sane_json(tmp_path, capsys):
    """The benchmark's main runs in-process; each mode still trains in a child process of its own (the
    memory figures are per process)."""
    shared_path("chatglm3-tokenizer", "tokenizer.model")
    shared_path("advertisegen", "dev.json")
    out = tmp_path / "bench.json"
    capsys.readouterr()
    BENCH_TRAIN["main"](["--model", "tiny", "--data", "advertisegen", "--max-train-samples", "48", "--steps", "1",
                         "--warmup-steps", "0", "--batch-size", "2", "--modes", "reference", "dynamic", "packing",
                         "--json", str(out), "--work-dir", str(tmp_path / "work")])
    printed = capsys.readouterr().out
    assert "reference" in printed and "MFU" in printed  # the table

    rows = {row["mode"]: row for row in json.loads(out.read_text())}
    assert list(rows) == ["reference", "dynamic", "packing"]
    for row in rows.values():
        assert REQUIRED_KEYS <= row.keys(), row.keys()
        assert 0 < row["supervised_tokens_per_s"] < row["real_tokens_per_s"]
        assert 0 <= row["padding_fraction"] < 1
        assert row["step_time_s"] > 0 and len(row["step_times_s"]) == 1
        assert sum(row["phase_seconds"].values()) == pytest.approx(row["step_time_s"], rel=1e-6)
        assert row["peak_mem_mb"] >= row["rss_before_training_mb"] > 50
        assert 0 < row["mfu"] <= row["hfu"] < 1
        assert row["model_shape"]["vocab"] == 65024 and row["model_shape"]["hidden"] == 64

    reference, dynamic, packing = rows["reference"], rows["dynamic"], rows["packing"]
    assert reference["padded_lengths"] == [ADVERTISEGEN_CAP]
    assert reference["padding_fraction"] > dynamic["padding_fraction"] > packing["padding_fraction"]
    assert packing["padded_lengths"][0] > max(dynamic["padded_lengths"])  # several records per packed row
    # Same model, seed and data order: padding to the cap and full logits leave the loss unchanged.
    assert reference["losses"][0] == pytest.approx(dynamic["losses"][0], rel=1e-5)
    assert "--pad_to_max_length" in reference["finetune_args"] and "--packing" in packing["finetune_args"]
    # Packing: one padding-free row per batch, attention per record (HFU = MFU: nothing wasted).
    assert packing["padding_fraction"] == 0 and packing["rows_per_step"][0] >= 1
    assert packing["hfu"] == pytest.approx(packing["mfu"])
