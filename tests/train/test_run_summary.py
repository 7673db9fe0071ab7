"""What the length caps cost shows as WARNING lines, and a run ends with a summary that says how to
use its result."""

import json
import logging

from arguments import parse_args
from chatglm3_finetune.train.run_summary import format_duration, inference_command, python_command, summary_lines
from chatglm3_finetune.data.training_data import TruncationReport, load_split

LONG = {"conversations": [{"role": "user", "content": "word " * 60}, {"role": "assistant", "content": "Hello"}]}
GOOD = {"conversations": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there " * 8}]}


def test_truncation_and_left_out_records_are_warnings(tmp_path, tiny_model_dir, tiny_tokenizer, caplog):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in (GOOD, GOOD, LONG)))
    _, data_args, training_args = parse_args([
        "--model_name_or_path", tiny_model_dir, "--train_format", "multi-turn", "--train_file", str(data),
        "--output_dir", str(tmp_path / "o"), "--use_cpu", "--max_seq_length", "20",
        "--preprocessing_cache_dir", str(tmp_path / "cache")])
    with caplog.at_level(logging.INFO):
        dataset, report = load_split(str(data), None, tiny_tokenizer, data_args, training_args, "training")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        f"training data {data}: 3 of 3 records were cut by --max_seq_length 20 (3 lost supervised targets, "
        f"3 lost the final stop target, which teaches the model to end its answer)",
        f"training data {data}: 1 of 3 records left out because the cut removed every supervised target; "
        f"raise --max_seq_length to use them"]
    assert len(dataset) == 2 and report.kept == 2

    caplog.clear()
    with caplog.at_level(logging.INFO):
        load_split(str(data), 2, tiny_tokenizer, data_args, training_args, "training")
    assert [r.levelno for r in caplog.records if "training data" in r.getMessage()] == [logging.INFO, logging.WARNING]


def test_summary_lines_say_what_was_used_and_how_to_use_the_result():
    report = TruncationReport(records=70, tokens=9000, targets=3000, truncated=40, lost_targets=40, lost_stop=38,
                              no_targets_left=34)
    lines = summary_lines(
        125.4, {"train": "data/t.jsonl", "eval": "data/t.jsonl (held out by --val_size)"},
        {"train": report, "eval": None}, "--max_seq_length 512", {"steps": 30, "supervised_tokens": 123456},
        {"eval": {"eval_loss": 1.23456, "eval_runtime": 3.0, "epoch": 1.0}}, "output/my run", "ptuning",
        "models/base")
    assert lines == [
        "==== Run summary",
        "train data data/t.jsonl: 70 records, 36 used, 34 left out, 40 truncated by --max_seq_length 512",
        "  WARNING: 40 of 70 records were cut by --max_seq_length 512 (40 lost supervised targets, 38 lost the "
        "final stop target, which teaches the model to end its answer)",
        "  WARNING: 34 of 70 records left out because the cut removed every supervised target; raise "
        "--max_seq_length to use them",
        "trained: 30 steps, 123,456 supervised tokens",
        "eval: eval_loss 1.235",
        "time: 2m 05s",
        "result: output/my run (a P-Tuning v2 prefix)",
        f"chat with it: {python_command()} inference.py --model models/base --pt-checkpoint 'output/my run'",
    ]


def test_summary_names_the_records_beside_the_result(tmp_path):
    for name in ("run_config.json", "eval_results.json"):
        (tmp_path / name).write_text("{}")
    lines = summary_lines(1, {}, {}, "", {"steps": 1, "supervised_tokens": 1}, {}, str(tmp_path), "lora", "b")
    assert lines[-2] == f"result: {tmp_path} (LoRA adapters; beside it run_config.json, eval_results.json)"


def test_inference_command_per_kind_of_output():
    assert inference_command("lora", "out", "base") == f"{python_command()} inference.py --model base --lora out"
    assert inference_command("full", "out", "base") == f"{python_command()} inference.py --model out"
    assert format_duration(3725) == "1h 02m 05s"
