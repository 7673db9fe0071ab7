"""Damaged data files: each one gets a single `file:line: ...` message and exit 2, never a traceback."""

import json

import pytest

from chatglm3_finetune.data.records import MULTI_TURN, DataError, read_records, validate_records
from conftest import run_finetune

GOOD = json.dumps({"conversations": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]})

DAMAGED = {
    "latin1.jsonl": ((GOOD + "\n" + GOOD.replace("Hello", "caf\u00e9") + "\n").encode("latin-1"),
                     ":2: byte 0xe9 is not UTF-8"),
    "utf16.jsonl": ((GOOD + "\n").encode("utf-16"), ":1: the file is UTF-16 text; save it as UTF-8"),
    "binary.jsonl": ((GOOD + "\n").encode() + bytes(range(256)) * 4, ":2: a NUL byte: this is a binary file"),
    "deep.jsonl": ((GOOD + "\n" + "[" * 100_000 + "]" * 100_000 + "\n").encode(), ":2: JSON nested too deeply"),
    "digits.jsonl": ((GOOD + "\n" + '{"n": ' + "7" * 5000 + "}\n").encode(), ":2: unreadable JSON value"),
    "surrogate.jsonl": ((GOOD + "\n" + GOOD.replace("Hello", "\\ud800") + "\n").encode(), ":2: a lone UTF-16 surrogate"),
    "deep.json": (("[" * 100_000 + "]" * 100_000).encode(), ":1: JSON nested too deeply"),
}


@pytest.mark.parametrize("name", sorted(DAMAGED))
def test_damaged_file_is_one_data_error(tmp_path, name):
    content, message = DAMAGED[name]
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError) as e:
        validate_records(read_records(str(path)), MULTI_TURN)
    assert str(e.value).startswith(f"{path}{message}"), str(e.value)


def test_utf8_byte_order_mark_and_surrogate_pairs_are_fine(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + (GOOD.replace("Hello", "\\ud83d\\ude00") + "\n").encode())
    records = read_records(str(path))
    assert records[0][1]["conversations"][1]["content"] == "\U0001F600"


REAL_PROCESS = "latin1.jsonl"  # this case runs finetune.py as a shell would; the others run finetune.main in-process


@pytest.mark.parametrize("name", ["latin1.jsonl", "utf16.jsonl", "binary.jsonl", "deep.jsonl", "digits.jsonl",
                                  "surrogate.jsonl"])
def test_finetune_reports_a_damaged_file_with_exit_2(tiny_model_dir, tmp_path, name, finetune_in_process):
    content, message = DAMAGED[name]
    path = tmp_path / name
    path.write_bytes(content)
    args = ("--model_name_or_path", tiny_model_dir, "--train_format", "multi-turn", "--train_file", str(path),
            "--output_dir", str(tmp_path / "out"), "--do_train", "--use_cpu", "--report_to", "none",
            "--preprocessing_cache_dir", str(tmp_path / "cache"))
    result = run_finetune(*args, check=False) if name == REAL_PROCESS else finetune_in_process(*args)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}{message}"), lines
    assert "Traceback" not in result.stderr
