"""Token accounting: real (non-padding) and supervised tokens in every batch layout, end to end
through finetune.py, across a resume; and --include_num_input_tokens_seen from the command line."""

import json
import shutil

import pytest

from chatglm3_finetune.data.collation import DataCollatorForChatGLM
from chatglm3_finetune.data.collation import PackedCollator
from chatglm3_finetune.data.packing import pack_features
from chatglm3_finetune.train.token_counts import input_tokens, real_tokens, supervised_tokens
from test_finetune import common_args

RECORDS = [{"input_ids": [1, 2, 3, 4, 5], "labels": [-100, -100, 3, 4, 5]},
           {"input_ids": [6, 7], "labels": [-100, 7]},
           {"input_ids": [8, 9, 10], "labels": [-100, -100, -100]},
           {"input_ids": [11, 12, 13, 14], "labels": [-100, 12, -100, 14]}]
REAL, SUPERVISED = 14, 6


@pytest.mark.parametrize("collator", [
    DataCollatorForChatGLM(), DataCollatorForChatGLM(max_length=16), DataCollatorForChatGLM(pad_to_multiple_of=8),
    PackedCollator(),
], ids=["dynamic", "pad-to-max", "pad-to-8", "packed"])
def test_every_layout_counts_real_and_supervised_tokens(collator):
    features = pack_features(RECORDS, max_length=7) if isinstance(collator, PackedCollator) else RECORDS
    batch = collator(features)
    assert batch["input_ids"].numel() >= REAL
    assert real_tokens(batch).item() == REAL
    assert supervised_tokens(batch).item() == SUPERVISED
    assert input_tokens(batch, "all").item() == batch["input_ids"].numel()


def expected_counts(tiny_model_dir, data, max_samples):
    """Real and supervised tokens of the file as finetune.py encodes it (one epoch sees each record once)."""
    from arguments import parse_args
    from chatglm3_finetune.format.tokenizer import load_tokenizer
    from chatglm3_finetune.data.training_data import load_split

    _, data_args, training_args = parse_args(common_args(tiny_model_dir, data, "/tmp/unused"))
    dataset, _ = load_split(data, max_samples, load_tokenizer(tiny_model_dir), data_args, training_args, "training")
    real = sum(len(row["input_ids"]) for row in dataset)
    supervised = sum(sum(1 for label in row["labels"][1:] if label != -100) for row in dataset)
    return real, supervised


def run(finetune, tiny_model_dir, data, output_dir, *extra):
    """One epoch over 8 records, through finetune.main in-process (the counts do not depend on the process)."""
    result = finetune(*common_args(tiny_model_dir, data, output_dir, "--max_train_samples", "8",
                                   "--num_train_epochs", "1", "--learning_rate", "1e-3", *extra))
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((output_dir / "train_results.json").read_text())
    logged = [e for e in json.loads((output_dir / "trainer_state.json").read_text())["log_history"] if "loss" in e]
    return results, logged, result.stdout + result.stderr


@pytest.mark.slow
def test_finetune_reports_exact_token_counts_in_every_layout_and_across_a_resume(
        tiny_model_dir, formatted_samples, tmp_path, finetune_in_process):
    data = formatted_samples["multi-turn"]
    real, supervised = expected_counts(tiny_model_dir, data, 8)
    assert 0 < supervised < real
    layouts = {"dynamic": [], "pad-to-max": ["--pad_to_max_length"], "packing": ["--packing"],
               "packing-ptuning": ["--packing", "--pre_seq_len", "4"], "dynamic-ptuning": ["--pre_seq_len", "4"]}
    for name, extra in layouts.items():
        results, logged, _ = run(finetune_in_process, tiny_model_dir, data, tmp_path / name, "--save_strategy", "no", *extra)
        assert (results["train_num_input_tokens_seen"], results["train_supervised_tokens"]) == (real, supervised), name
        assert results["train_tokens_per_second"] > results["train_supervised_tokens_per_second"] > 0
        assert (logged[-1]["num_input_tokens_seen"], logged[-1]["supervised_tokens"]) == (real, supervised), name
        assert logged[0]["num_input_tokens_seen"] < real or len(logged) == 1

    # Resume: the same command after losing everything past checkpoint-2 ends with the same totals.
    output_dir = tmp_path / "resumed"
    run(finetune_in_process, tiny_model_dir, data, output_dir, "--save_steps", "2")
    at_two = json.loads((output_dir / "checkpoint-2" / "trainer_state.json").read_text())
    assert 0 < at_two["num_input_tokens_seen"] < real
    for path in output_dir.iterdir():
        if path.name != "checkpoint-2":
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    results, logged, output = run(finetune_in_process, tiny_model_dir, data, output_dir, "--save_steps", "2")
    assert "Resuming from" in output and "checkpoint-2" in output
    assert [e["step"] for e in logged] == list(range(1, len(logged) + 1))
    assert (results["train_num_input_tokens_seen"], results["train_supervised_tokens"]) == (real, supervised)
    assert logged[-1]["supervised_tokens"] == supervised


@pytest.mark.slow
def test_counting_all_positions_from_the_command_line(tiny_model_dir, formatted_samples, tmp_path,
                                                     finetune_in_process):
    data = formatted_samples["multi-turn"]
    real, _ = expected_counts(tiny_model_dir, data, 8)
    results, _, _ = run(finetune_in_process, tiny_model_dir, data, tmp_path / "all", "--save_strategy", "no", "--pad_to_max_length",
                     "--include_num_input_tokens_seen", "all")
    assert results["train_num_input_tokens_seen"] == 8 * 512 > real
