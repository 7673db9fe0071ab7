"""benchmarks/gpu_check.sh: its rules (gpu_check_lib/report.py), the original-layout checkpoint it writes
(gpu_check_lib/model.py, converted by scripts/convert_chatglm3.py), every case's launcher command, and
--dry on the cases that take every path of the check (training, checkpoint, resume, inference, server)
at tiny shapes on the CPU."""

import importlib.util
import json
import os
import runpy
import subprocess
import sys

import pytest

from conftest import ROOT, shared_path


def gpu_check_lib():
    """benchmarks/gpu_check_lib, imported by its path (benchmarks/ is not on sys.path)."""
    if "gpu_check_lib" not in sys.modules:
        init = ROOT / "benchmarks" / "gpu_check_lib" / "__init__.py"
        spec = importlib.util.spec_from_file_location("gpu_check_lib", init, submodule_search_locations=[str(init.parent)])
        sys.modules["gpu_check_lib"] = package = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(package)
    return sys.modules["gpu_check_lib"]


gpu_check_lib()
from gpu_check_lib import cases, model, report  # noqa: E402

CASES = ["ptuning", "ptuning_8bit", "ptuning_4bit", "lora", "qlora", "packing", "packing_flash_attn", "zero2",
         "zero2_ptuning", "zero3", "zero3_offload"]


def test_the_command_line_names_every_case():
    cli = runpy.run_path(str(ROOT / "benchmarks" / "gpu_check.py"))
    assert list(cli["CASES"]) == cases.CASE_NAMES == CASES


def test_a_loss_must_be_logged_every_step_finite_and_fall():
    problem = report.loss_problem
    assert problem({1: 11.1, 2: 11.0}, 2) is None
    assert "did not fall" in problem({1: 11.1, 2: 11.1}, 2)
    assert "non-finite loss at step 2" in problem({1: 11.1, 2: float("nan"), 3: 10.0}, 3)
    assert "expected 1..4" in problem({1: 11.1, 2: 11.0, 4: 10.0}, 4)


def test_packed_and_unpacked_losses_must_agree_at_every_step():
    problem = report.packed_problem
    assert problem({1: 11.0501, 2: 9.07}, {1: 11.0500, 2: 9.0705}, 1e-3) is None
    assert "step 2: packed loss 9.07000 differs from unpacked 9.08000" in problem({1: 11.05, 2: 9.07}, {1: 11.05, 2: 9.08}, 1e-3)
    assert "step 1" in problem({1: float("nan"), 2: 9.07}, {1: 11.05, 2: 9.07}, 1e-3)
    assert "unpacked at steps [1]" in problem({1: 11.05, 2: 9.07}, {1: 11.05}, 1e-3)
    assert "packed at steps []" in problem({}, {1: 11.05}, 1e-3)


def test_a_checkpoint_holding_frozen_weights_fails():
    problem, limit = report.checkpoint_problem, report.checkpoint_limit
    prefix = 128 * 28 * 2 * 2 * 128  # ChatGLM3-6B's P-Tuning v2 prefix at pre_seq_len 128
    assert limit(prefix) == prefix * 20 + (2 << 20)
    assert problem(prefix * 12 + 50_000, prefix) is None  # fp32 prefix + AdamW moments + small files
    assert "frozen weights saved?" in problem(prefix * 12 + 12_487_168_000, prefix)  # + the bf16 base
    assert problem(None, prefix) == "no checkpoint was written"


def test_the_cpu_rehearsal_warns_where_bf16_matmuls_are_slow():
    warning = report.slow_cpu_warning("cpu", 0.3e9)  # an AVX2-only CPU
    assert warning.startswith("warning: this CPU multiplies bf16 matrices at 0.3 GFLOP/s")
    assert "about 50 hours" in warning and "AVX-512" in warning
    assert report.slow_cpu_warning("cpu", 10e9) is None  # about 90 minutes
    assert report.slow_cpu_warning("cpu", None) is None  # not measured
    assert report.slow_cpu_warning("dry", 0.3e9) is None  # --dry trains in fp32


def test_step_time_is_the_median_between_steps_or_the_one_step_from_its_forward():
    seconds = report.step_seconds
    assert seconds([10.0, 11.0, 12.5, 13.5], 9.0) == 1.0
    assert seconds([10.0], 7.5) == 2.5
    assert seconds([], 7.5) is None


def test_table_shows_measured_planned_and_why():
    row = report.new_row("ptuning", "ptuning", "6b", "sdpa", 2048)
    row.update(peak_bytes=14_200_000_000, planned_bytes=14_000_000_000, saved=True, resumed=True, inference=True,
               server=True, step_s=0.5, tokens_per_s=4096, mfu=0.4, seconds=60)
    skipped = {**report.new_row("packing_flash_attn", "lora", "6b", "fa2", 2048), "status": "skipped",
               "reason": "not run: flash_attn absent"}
    failed = report.finish({**report.new_row("zero3", "full", "1b", "sdpa", 2048), "problems": ["resume failed: x"]}, 3)
    text = report.table([row, skipped, failed], "gpu")
    assert "14.20" in text and "14.00" in text and "40.0%" in text and "4096" in text
    assert "packing_flash_attn: skipped: not run: flash_attn absent" in text
    assert "zero3: failed: resume failed: x" in text and failed["status"] == "failed"
    assert [report.rate(v) for v in (0.3125, 45.25, 4096.4, None)] == ["0.31", "45.2", "4096", "n/a"]


def test_original_layout_checkpoint_matches_the_shared_one_and_converts(tmp_path):
    """The tiny shape is ../shared/data/chatglm3-tiny-original's: same config keys, same tensor names
    and shapes; scripts/convert_chatglm3.py converts what gpu_check_lib/model.py writes."""
    import torch

    tokenizer = shared_path("chatglm3-tokenizer")
    reference = shared_path("chatglm3-tiny-original", "model")
    folder = model.write_original_checkpoint(str(tmp_path / "original"), "tiny", str(tokenizer), progress=lambda _: None)
    ours = json.loads((tmp_path / "original" / "config.json").read_text())
    theirs = json.loads((reference / "config.json").read_text())
    assert {k: v for k, v in ours.items() if k != "_name_or_path"} == {k: v for k, v in theirs.items() if k != "_name_or_path"}
    index = json.loads((tmp_path / "original" / "pytorch_model.bin.index.json").read_text())["weight_map"]
    assert sorted(set(index.values())) == ["pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"]
    shapes = {}
    for shard in set(index.values()):
        shapes.update({name: tuple(t.shape) for name, t in torch.load(os.path.join(folder, shard)).items()})
    reference_shapes = {}
    for shard in set(json.loads((reference / "pytorch_model.bin.index.json").read_text())["weight_map"].values()):
        reference_shapes.update({name: tuple(t.shape) for name, t in torch.load(reference / shard).items()})
    assert shapes == reference_shapes
    assert model.parameter_count("6b") == 6_243_584_000  # ChatGLM3-6B
    converted = subprocess.run([sys.executable, "scripts/convert_chatglm3.py", "--input", folder, "--output",
                                str(tmp_path / "converted"), "--dtype", "bfloat16"], capture_output=True, text=True,
                               cwd=str(ROOT))
    assert converted.returncode == 0, converted.stderr[-2000:]
    config = json.loads((tmp_path / "converted" / "config.json").read_text())
    assert config["model_type"] == "glm" and config["num_hidden_layers"] == 2


def test_synthetic_conversations_have_the_exact_token_counts(real_tokenizer):
    from chatglm3_finetune.data.encoding import encode_multi_turn, encode_prompt_response

    words = model.one_token_words(real_tokenizer)
    for length in (16, 64, 2048):
        record = model.conversation_of_length(real_tokenizer, length, 3, words)
        assert len(encode_multi_turn(real_tokenizer, record).input_ids) == length
    record = model.prompt_response_of_length(real_tokenizer, 48, 16, 3, words)
    assert len(encode_prompt_response(real_tokenizer, record).input_ids) == 64


# --dry's cases in two files (two pytest-xdist workers can take one each): here the ones that between
# them take every path of the check (the server, a quantized base with LoRA, the packed row against its
# unpacked twin, P-Tuning under DeepSpeed on two ranks); test_gpu_check_dry_others.py the rest.
DRY_CASES = ["ptuning", "qlora", "packing", "zero2_ptuning"]


@pytest.mark.parametrize("name", CASES)
def test_every_case_gives_its_launcher_a_command_finetune_accepts(name, tmp_path):
    """The launcher's DRY_RUN=1 command for the case, as --dry would run it, parses as finetune.py's
    options and carries the case's quantization, DeepSpeed config and ranks."""
    import shlex

    from arguments import parse_args

    case, mode = cases.case_named(name), cases.MODES["dry"]
    env = cases.launcher_env(case, mode, str(tmp_path / "model"), str(tmp_path / "data.jsonl"), str(tmp_path / "run"), 2)
    command = subprocess.run(["bash", str(ROOT / "scripts" / case.launcher), *cases.launcher_args(case, mode)],
                             env={**os.environ, **env, "DRY_RUN": "1", "PYTHON": sys.executable}, cwd=str(ROOT),
                             capture_output=True, text=True, timeout=60)
    assert command.returncode == 0, command.stderr
    words = shlex.split(command.stdout)
    flags = words[words.index("finetune.py") + 1:]
    model_args, _, training_args = parse_args(flags, plan=True)
    assert training_args.max_steps == 2 and training_args.save_steps == mode.steps
    assert model_args.quantization_bit == case.quantization_bit
    if case.deepspeed:
        assert flags[flags.index("--deepspeed") + 1] == case.env["DS_CONFIG"]
        assert f"--nproc_per_node={mode.deepspeed_ranks}" in words


def run_dry(tmp_path, names: list[str]) -> tuple[dict, dict]:
    """`gpu_check.sh --dry --cases NAMES`: (the JSON summary, its rows by case), once it exited 0."""
    shared_path("chatglm3-tokenizer")
    out = tmp_path / "gpu_check.json"
    run = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry", "--json", str(out),
                          "--work", str(tmp_path / "work"), "--cases", *names], capture_output=True, text=True,
                         timeout=1200, cwd=str(tmp_path), env={**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    assert "peak RSS GB" in run.stdout and "planned GB" in run.stdout
    summary = json.loads(out.read_text())
    assert summary["versions"]["torch"]
    assert summary["matmul_peak_dtype"] == "float32" and summary["matmul_peak_flops"] > 0  # as the cases train
    rows = {r["case"]: r for r in summary["cases"]}
    assert list(rows) == names
    return summary, rows


def check_trained(rows: dict) -> None:
    """Every case ok: saved, resumed, answered, its losses near ln(65024) and falling, its checkpoint
    under its limit."""
    for case, r in rows.items():
        assert r["status"] == "ok", (case, r["reason"])
        assert r["saved"] and r["resumed"] and r["inference"], case
        losses = [r["losses"][step] for step in ("1", "2")]
        assert 5 < losses[1] < losses[0] < 15, case
        assert r["peak_rss_bytes"] > 100e6 and r["step_s"] > 0 and r["trainable_parameters"] > 0, case
        assert r["checkpoint_bytes"] <= r["checkpoint_limit_bytes"], case


def probed_ranks(tmp_path, case: str) -> list[str]:
    probes = (tmp_path / "work" / "probes" / case / "train").glob("*.json")
    return sorted(json.loads(p.read_text())["rank"] for p in probes)


PREFIX = 128 * 2 * 2 * 2 * 8  # pre_seq_len x 2 layers x (key, value) x 2 kv heads x 8 channels


@pytest.mark.slow
def test_gpu_check_dry_runs_its_cases_with_save_resume_and_inference(tmp_path):
    _, rows = run_dry(tmp_path, DRY_CASES)
    check_trained(rows)
    assert rows["ptuning"]["server"] is True and rows["ptuning"]["trainable_parameters"] == PREFIX
    # P-Tuning under ZeRO-2: the checkpoint holds the prefix and its optimizer state, not the base.
    assert rows["zero2_ptuning"]["trainable_parameters"] == PREFIX
    assert rows["zero2_ptuning"]["checkpoint_bytes"] < 20 * PREFIX + (2 << 20) < 4 * model.parameter_count("tiny")
    packed, unpacked = rows["packing"]["losses"], rows["packing"]["unpacked_losses"]
    assert packed.keys() == unpacked.keys() == {"1", "2"}  # the first step and the resumed one
    assert all(abs(packed[step] - unpacked[step]) < 1e-4 for step in packed)
    assert probed_ranks(tmp_path, "zero2_ptuning") == ["0", "1"]  # two CPU ranks, each probed
