"""benchmarks/bench_load_memory.py at a small shape (a 64 MiB model in bf16): what each case holds
after loading, and the peaks that tell one copy from two."""

import runpy

import pytest

from conftest import ROOT

bench = runpy.run_path(str(ROOT / "benchmarks" / "bench_load_memory.py"))


@pytest.mark.slow
def test_loading_holds_one_copy_in_the_training_dtype(tmp_path, capsys, monkeypatch):
    extensions = tmp_path / "torch_extensions"
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(extensions))  # where DeepSpeed would build an op
    rows = bench["main"](["--hidden", "512", "--layers", "4", "--ffn", "2048", "--vocab", "16384", "--ranks", "2",
                          "--ds-dtypes", "auto",  # fp32 under ZeRO-2/3: test_deepspeed_loading
                          "--work", str(tmp_path), "--json", str(tmp_path / "rows.json")])
    assert "peak RSS" in capsys.readouterr().out and (tmp_path / "rows.json").is_file()
    assert not extensions.exists()  # the ranks compiled nothing (DeepSpeed's CPU shared-memory op)
    whole = next(row["held_mib"] for row in rows if row.get("loader") == "transformers")
    assert 60 <= whole <= 70  # 33.6M parameters in bf16

    def case(name, **fields):
        return [row for row in rows if row["case"].startswith(name) and all(row[k] == v for k, v in fields.items())]

    for row in case("frozen base"):
        assert (row["held_mib"], row["held_dtypes"]) == (whole, ["bfloat16"]), row
    # fp16 on disk, bf16 wanted: the model plus one tensor (the 16 MiB embedding), not two models
    [cast] = case("frozen base", stored="float16", loader="load_base_model")
    assert cast["peak_rss_mib"] < 1.5 * whole, rows
    # ZeRO-2: every rank holds the whole model, in bf16 now, mapped from the file (no private copy)
    for row in case("full, ds_zero2", torch_dtype="auto"):
        assert (row["held_mib"], row["held_dtypes"]) == (whole, ["bfloat16"]) and row["peak_anon_mib"] < whole / 4, row
    # ZeRO-3: each rank holds its half, in bf16, from the start (zero.Init)
    for row in case("full, ds_zero3"):
        assert abs(row["held_mib"] - whole / 2) <= 1 and row["held_dtypes"] == ["bfloat16"], row
    assert sorted(row["rank"] for row in case("full, ds_zero3", torch_dtype="auto")) == [0, 1]
