"""The tokenization cache: written aside and renamed, damaged copies rebuilt, the key computed once."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from chatglm3_finetune.data import training_data
from chatglm3_finetune.data.encoding import LengthLimits
from chatglm3_finetune.data.records import MULTI_TURN
from chatglm3_finetune.data.training_data import tokenize_records

GOOD = {"conversations": [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello, friend"}]}


def cached_folders(cache_dir):
    return sorted(os.listdir(cache_dir)) if os.path.isdir(cache_dir) else []


def test_a_damaged_cache_is_rebuilt_with_a_warning(tmp_path, tiny_tokenizer, caplog):
    records = [(f"d:{i}", GOOD) for i in range(6)]
    fresh, _ = tokenize_records(tiny_tokenizer, records, MULTI_TURN, LengthLimits(), cache_dir=str(tmp_path))
    (folder,) = cached_folders(tmp_path)
    for name in os.listdir(tmp_path / folder):  # as an older version left it when killed mid-write
        if name.endswith(".arrow"):
            os.remove(tmp_path / folder / name)
    again, _ = tokenize_records(tiny_tokenizer, records, MULTI_TURN, LengthLimits(), cache_dir=str(tmp_path))
    assert again["input_ids"] == fresh["input_ids"]
    assert "is incomplete or unreadable" in caplog.text and "rebuilding it" in caplog.text
    assert cached_folders(tmp_path) == [folder]
    third, _ = tokenize_records(tiny_tokenizer, records, MULTI_TURN, LengthLimits(), cache_dir=str(tmp_path))
    assert third["input_ids"] == fresh["input_ids"]


def test_the_cache_key_is_computed_once(tmp_path, tiny_tokenizer, monkeypatch):
    calls = []
    original = training_data._cache_key
    monkeypatch.setattr(training_data, "_cache_key", lambda *a: calls.append(1) or original(*a))
    tokenize_records(tiny_tokenizer, [("d:1", GOOD)], MULTI_TURN, LengthLimits(), cache_dir=str(tmp_path))
    assert len(calls) == 1


def test_the_key_covers_the_tokenizer_config_and_caps(tmp_path, tiny_model_dir, tiny_tokenizer):
    records_json = [json.dumps(GOOD)]
    key = training_data._cache_key(tiny_tokenizer, records_json, MULTI_TURN, LengthLimits())
    assert key != training_data._cache_key(tiny_tokenizer, records_json, MULTI_TURN, LengthLimits(max_seq_length=9))
    copy = tmp_path / "tok"
    shutil.copytree(tiny_model_dir, copy)
    config = json.loads((copy / "tokenizer_config.json").read_text())
    (copy / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 7}))
    from chatglm3_finetune.format.tokenizer import load_tokenizer

    assert key != training_data._cache_key(load_tokenizer(str(copy)), records_json, MULTI_TURN, LengthLimits())


KILLED_WORKER = """
import sys
from chatglm3_finetune.data.encoding import LengthLimits
from chatglm3_finetune.format.tokenizer import load_tokenizer
from chatglm3_finetune.data.training_data import tokenize_records
record = {"conversations": [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello " * 60}]}
records = [(f"d:{i}", dict(record, id=i)) for i in range(int(sys.argv[3]))]
tokenize_records(load_tokenizer(sys.argv[1]), records, "multi-turn", LengthLimits(), cache_dir=sys.argv[2])
"""


@pytest.mark.slow
def test_kill_9_while_the_cache_is_written_then_the_rerun_works(tmp_path, tiny_model_dir, tiny_tokenizer):
    """SIGKILL as soon as the cache starts being written; the rerun must tokenize again and succeed."""
    cache_dir = tmp_path / "cache"
    count = 40_000
    worker = subprocess.Popen([sys.executable, "-c", KILLED_WORKER, tiny_model_dir, str(cache_dir), str(count)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while not cached_folders(cache_dir) and worker.poll() is None and time.time() < deadline:
            time.sleep(0.005)
        assert worker.poll() is None, "the worker ended before the cache was written: make the data larger"
        os.kill(worker.pid, signal.SIGKILL)
    finally:
        worker.kill()
        worker.wait()
    left = cached_folders(cache_dir)
    assert left and all(".partial-" in name for name in left), left  # nothing at the final name

    record = {"conversations": [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello " * 60}]}
    records = [(f"d:{i}", dict(record, id=i)) for i in range(count)]
    dataset, report = tokenize_records(tiny_tokenizer, records, MULTI_TURN, LengthLimits(), cache_dir=str(cache_dir))
    assert report.records == count and len(dataset) == count
    (final,) = cached_folders(cache_dir)  # the killed run's partial copy is cleaned up
    assert ".partial-" not in final
