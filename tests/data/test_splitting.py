"""Seeded splits: --val_size's held-out records and the converters' train/dev/test files."""

import json

import pytest

from arguments import parse_args
from chatglm3_finetune.data.records import DataError
from chatglm3_finetune.data.splitting import SplitError, hold_out, parse_split, split_path, split_rows
from chatglm3_finetune.data.training_data import read_split_records


def test_hold_out_is_seeded_disjoint_and_keeps_file_order():
    records = list(range(100))
    kept, held = hold_out(records, 0.1, seed=3)
    assert len(held) == 10 and len(kept) == 90
    assert sorted(kept + held) == records and kept == sorted(kept) and held == sorted(held)
    assert hold_out(records, 0.1, seed=3) == (kept, held)
    assert hold_out(records, 0.1, seed=4)[1] != held
    assert len(hold_out(records, 7, seed=3)[1]) == 7  # a count


@pytest.mark.parametrize("val_size,total,message", [
    (0, 10, "give a count"), (1.5, 10, "give a count"), (10, 10, "one left for training"),
    (0.01, 10, "holds out 0"),
])
def test_hold_out_refuses_what_leaves_a_side_empty(val_size, total, message):
    with pytest.raises(SplitError, match=message):
        hold_out(list(range(total)), val_size, seed=0)


def test_split_rows_cuts_by_fractions_and_is_seeded():
    rows = list(range(50))
    parts = split_rows(rows, parse_split("0.8,0.1,0.1"), seed=1)
    assert {name: len(part) for name, part in parts.items()} == {"train": 40, "dev": 5, "test": 5}
    assert sorted(sum(parts.values(), [])) == rows
    assert split_rows(rows, (0.8, 0.1, 0.1), seed=1) == parts != split_rows(rows, (0.8, 0.1, 0.1), seed=2)
    assert set(split_rows(rows, parse_split("0.9,0,0.1"), seed=1)) == {"train", "test"}


@pytest.mark.parametrize("text", ["0.8,0.1", "0.8,0.1,0.2", "a,b,c", "0,0.5,0.5", "1.1,-0.1,0"])
def test_parse_split_refuses_bad_fractions(text):
    with pytest.raises(SplitError, match="three fractions"):
        parse_split(text)


def test_split_rows_refuses_an_empty_part():
    with pytest.raises(SplitError, match="leaves the dev part empty"):
        split_rows(list(range(5)), (0.8, 0.05, 0.15), seed=0)


def test_split_path():
    assert split_path("formatted_data/advertise_gen.jsonl", "test") == "formatted_data/advertise_gen_test.jsonl"


def write_records(path, count):
    path.write_text("".join(json.dumps({"prompt": f"p{i}", "response": f"r{i}"}) + "\n" for i in range(count)))
    return str(path)


def split_options(tmp_path, model_dir, data, *extra):
    return parse_args(["--model_name_or_path", model_dir, "--train_format", "input-output", "--train_file", data,
                       "--output_dir", str(tmp_path / "o"), "--use_cpu", "--do_train", "--do_eval", *extra])


def test_read_split_records_holds_out_val_size_then_caps(tmp_path, tiny_model_dir):
    data = write_records(tmp_path / "train.jsonl", 20)
    _, data_args, training_args = split_options(tmp_path, tiny_model_dir, data, "--val_size", "0.25",
                                                "--seed", "5", "--max_eval_samples", "3")
    splits = read_split_records(data_args, training_args)
    assert list(splits) == ["train", "eval"]
    train = [record["prompt"] for _, record in splits["train"][1]]
    held = [record["prompt"] for _, record in splits["eval"][1]]
    assert len(train) == 15 and len(held) == 3 and not set(train) & set(held)
    assert splits["eval"][0] == f"{data} (held out by --val_size)"
    # the same seed draws the same records; the locations still name the file's lines
    again = read_split_records(data_args, training_args)
    assert again["eval"][1] == splits["eval"][1] and splits["eval"][1][0][0].startswith(f"{data}:")


def test_read_split_records_val_size_too_large_for_the_file(tmp_path, tiny_model_dir):
    data = write_records(tmp_path / "train.jsonl", 4)
    _, data_args, training_args = split_options(tmp_path, tiny_model_dir, data, "--val_size", "4")
    with pytest.raises(DataError, match=f"^{data}: --val_size 4 of 4 records"):
        read_split_records(data_args, training_args)
