"""Tokenized training splits: parallel, cached, truncation counted, records without targets left out."""

import pytest

from chatglm3_finetune.data.records import MULTI_TURN, DataError
from chatglm3_finetune.data.encoding import LengthLimits, encode_multi_turn
from chatglm3_finetune.data.training_data import tokenize_records
from test_records import GOOD, U, A

X = -100



def test_tokenize_records_parallel_cached_and_reported(tmp_path, tiny_tokenizer):
    long = {"conversations": [U, {"role": "assistant", "content": "word " * 80}]}
    records = [(f"d:{i}", GOOD if i % 3 else long) for i in range(12)]
    limits = LengthLimits(max_seq_length=40)
    dataset, report = tokenize_records(tiny_tokenizer, records, MULTI_TURN, limits, num_proc=2,
                                       cache_dir=str(tmp_path / "cache"))
    assert len(dataset) == 12 and report.truncated == 4 and report.lost_targets == 4 and report.lost_stop == 4
    assert dataset[1]["input_ids"] == encode_multi_turn(tiny_tokenizer, GOOD).input_ids
    assert all(len(ids) <= 40 for ids in dataset["input_ids"])
    assert report.targets == sum(sum(label != X for label in labels) for labels in dataset["labels"])
    assert "4 truncated records (4 lost supervised targets, 4 lost the final stop target)" in report.summary()
    cached = list((tmp_path / "cache").iterdir())
    assert len(cached) == 1
    again, _ = tokenize_records(tiny_tokenizer, records, MULTI_TURN, limits, cache_dir=str(tmp_path / "cache"))
    assert again["input_ids"] == dataset["input_ids"]

    dropped, report = tokenize_records(tiny_tokenizer, records, MULTI_TURN, limits, truncation_policy="drop")
    assert len(dropped) == 8 and report.dropped == 4
    with pytest.raises(DataError, match="d:0: truncation removed supervised targets"):
        tokenize_records(tiny_tokenizer, records, MULTI_TURN, limits, truncation_policy="error")


def test_overwrite_cache_recomputes(tmp_path, tiny_tokenizer, monkeypatch):
    from chatglm3_finetune.data import training_data

    records = [("d:1", GOOD), ("d:2", GOOD)]
    tokenize_records(tiny_tokenizer, records, MULTI_TURN, LengthLimits(), cache_dir=str(tmp_path))
    calls = []
    original = training_data.encode_record
    monkeypatch.setattr(training_data, "encode_record", lambda *a: calls.append(1) or original(*a))
    tokenize_records(tiny_tokenizer, records, MULTI_TURN, LengthLimits(), cache_dir=str(tmp_path))
    assert calls == []
    tokenize_records(tiny_tokenizer, records, MULTI_TURN, LengthLimits(), cache_dir=str(tmp_path), overwrite_cache=True)
    assert len(calls) == 2


def test_records_left_without_targets_are_left_out_and_counted(tiny_tokenizer):
    long_prompt = {"conversations": [{"role": "user", "content": "word " * 60}, A]}
    records = [("d:1", GOOD), ("d:2", long_prompt)]
    dataset, report = tokenize_records(tiny_tokenizer, records, MULTI_TURN, LengthLimits(max_seq_length=20))
    assert len(dataset) == 1 and report.no_targets_left == 1 and report.kept == 1
    assert "1 left out because no supervised target was left" in report.summary()
