"""Lines end at "\\n" only. json.dumps(ensure_ascii=False), which the converters use, writes U+2028,
U+2029 and U+0085 raw inside strings; str.splitlines() would cut a record there (and at \\x0b,
\\x0c, \\x1c-\\x1e, a lone \\r), reject it as broken JSON and shift every later line number."""

import json

import pytest

from chatglm3_finetune.data.formats import load_data
from chatglm3_finetune.data.records import DataError, read_records, split_lines

SEPARATORS = "\u2028\u2029\x85\x0b\x0c\x1c\x1d\x1e\r"
RAW_IN_JSON = "\u2028\u2029\x85"  # what json.dumps(ensure_ascii=False) leaves unescaped
TEXT = "".join(f"{i}{char}" for i, char in enumerate(SEPARATORS)) + "end"


def test_split_lines_cuts_at_newlines_only():
    text = f"a{SEPARATORS}b\nc\r\nd"
    assert len(text.splitlines()) > 3
    assert split_lines(text) == [f"a{SEPARATORS}b", "c\r", "d"]


def written(record) -> str:
    line = json.dumps(record, ensure_ascii=False)
    assert all(char in line for char in RAW_IN_JSON)  # the test data really holds them raw
    return line


# One record per format with TEXT in its prompt and its answer, and what it becomes.
RECORDS = {
    "multi-turn": {"conversations": [{"role": "user", "content": TEXT}, {"role": "assistant", "content": TEXT}]},
    "input-output": {"prompt": TEXT, "response": TEXT},
    "openai": {"messages": [{"role": "user", "content": TEXT}, {"role": "assistant", "content": TEXT}]},
    "sharegpt": {"conversations": [{"from": "human", "value": TEXT}, {"from": "gpt", "value": TEXT}]},
    "alpaca": {"instruction": TEXT, "output": TEXT},
}
CONVERSATION = {"conversations": [{"role": "user", "content": TEXT}, {"role": "assistant", "content": TEXT}]}
EXPECTED = {"multi-turn": CONVERSATION, "openai": CONVERSATION, "sharegpt": CONVERSATION,
            "input-output": RECORDS["input-output"], "alpaca": {"prompt": TEXT, "response": TEXT}}
BROKEN = '{"oops": '


@pytest.mark.parametrize("train_format", sorted(RECORDS))
def test_jsonl_records_come_through_intact_and_later_lines_keep_their_numbers(tmp_path, train_format):
    path = tmp_path / "data.jsonl"
    line = written(RECORDS[train_format])
    path.write_text(f"{line}\n{line}\n\n{line}\n", encoding="utf-8")
    for fmt in (train_format, "auto"):
        data = load_data(str(path), fmt)
        assert [where for where, _ in data.records] == [f"{path}:1", f"{path}:2", f"{path}:4"]
        assert all(record == EXPECTED[train_format] for _, record in data.records)
    path.write_text(f"{line}\n{line}\n\n{line}\n{BROKEN}\n", encoding="utf-8")
    with pytest.raises(DataError, match=f"^{path}:5: invalid JSON"):
        load_data(str(path), train_format)


@pytest.mark.parametrize("train_format", sorted(RECORDS))
def test_json_list_records_come_through_intact(tmp_path, train_format):
    path = tmp_path / "data.json"
    line = written(RECORDS[train_format])
    path.write_text(f"[{line},\n{line}]", encoding="utf-8")
    data = load_data(str(path), train_format)
    assert [record for _, record in data.records] == [EXPECTED[train_format]] * 2
    path.write_text(f"[{line},\n{line},\n{BROKEN}]", encoding="utf-8")
    with pytest.raises(DataError, match=f"^{path}:3: invalid JSON"):
        load_data(str(path), train_format)


def test_a_json_file_of_lines_is_recognised_past_a_separator(tmp_path):
    """A .json file holding JSON lines is told apart by its first line, which must not end early."""
    path = tmp_path / "data.json"
    line = written(RECORDS["input-output"])
    path.write_text(f"{line}\n{line}\n", encoding="utf-8")
    assert [where for where, _ in read_records(str(path))] == [f"{path}:1", f"{path}:2"]


def test_a_raw_control_character_is_reported_on_its_own_line(tmp_path):
    """JSON forbids raw control characters inside strings: the error names their line, and says
    so, instead of an unterminated string on a line that is not in the file."""
    good = written(RECORDS["input-output"])
    for char in "\x0b\x0c\x1c\x1d\x1e":
        path = tmp_path / "data.jsonl"
        path.write_text(f"{good}\n{good}\n" + '{"prompt": "a%sb", "response": "r"}\n' % char, encoding="utf-8")
        with pytest.raises(DataError, match=f"^{path}:3: invalid JSON: Invalid control character"):
            read_records(str(path))


def test_crlf_line_ends_are_fine(tmp_path):
    path = tmp_path / "data.jsonl"
    line = written(RECORDS["input-output"])
    path.write_bytes(f"{line}\r\n{line}\r\n".encode())
    assert [record for _, record in read_records(str(path))] == [EXPECTED["input-output"]] * 2


# ---- the converters' own output --------------------------------------------------------------------------

def test_advertise_gen_converter_output_reads_back_intact(tmp_path):
    from chatglm3_finetune.data.converters import advertise_gen

    source = tmp_path / "adgen.json"
    rows = [{"content": f"{TEXT}{i}", "summary": f"{i}{TEXT}"} for i in range(3)]
    source.write_text("".join(written(row) + "\n" for row in rows), encoding="utf-8")
    output = tmp_path / "out.jsonl"
    assert advertise_gen.main(["--path", str(source), "--output", str(output)]) == 0
    assert all(char in output.read_text(encoding="utf-8") for char in RAW_IN_JSON)
    data = load_data(str(output), "input-output")
    assert [record for _, record in data.records] == [{"prompt": row["content"], "response": row["summary"]}
                                                      for row in rows]
    with open(output, "a", encoding="utf-8") as f:
        f.write(BROKEN + "\n")
    with pytest.raises(DataError, match=f"^{output}:4: invalid JSON"):
        load_data(str(output), "input-output")


def test_advertise_gen_converter_names_the_right_line(tmp_path, capsys):
    from chatglm3_finetune.data.converters import advertise_gen

    source = tmp_path / "adgen.json"
    good = written({"content": TEXT, "summary": TEXT})
    source.write_text(f"{good}\n{good}\n" + '{"content": "c"}\n', encoding="utf-8")
    assert advertise_gen.main(["--path", str(source), "--output", str(tmp_path / "x.jsonl")]) == 2
    assert capsys.readouterr().err.startswith(f'error: {source}:3: field "summary" is missing')


def test_tool_alpaca_converter_output_reads_back_intact(tmp_path):
    from chatglm3_finetune.data.converters import tool_alpaca

    instance = {"input": TEXT, "output": TEXT, "Final Thought": TEXT, "intermediate_steps": [
        [["getWeather", json.dumps({"city": TEXT}), f"{TEXT}\nAction: getWeather"], TEXT]]}
    source = tmp_path / "train.json"
    source.write_text(json.dumps([{"Name": "W", "NLDocumentation": TEXT, "Instances": [instance] * 3}]))
    output = tmp_path / "out.jsonl"
    assert tool_alpaca.main(["--path", str(source), "--output", str(output)]) == 0
    assert all(char in output.read_text(encoding="utf-8") for char in RAW_IN_JSON)
    records = [record for _, record in load_data(str(output), "multi-turn").records]
    assert len(records) == 3 and records[0]["tools"] == [TEXT]
    turns = records[0]["conversations"]
    assert turns[0]["content"] == TEXT and turns[2]["parameters"] == {"city": TEXT} and turns[2]["observation"] == TEXT
    assert turns[-1]["content"] == f"{TEXT}\n{TEXT}"
    with open(output, "a", encoding="utf-8") as f:
        f.write(BROKEN + "\n")
    with pytest.raises(DataError, match=f"^{output}:4: invalid JSON"):
        load_data(str(output), "multi-turn")


# ---- the readers built on them: the preview, evaluation / inference --input ------------------------------

def test_preview_reads_them_and_names_the_right_line(tmp_path, tiny_model_dir, capsys):
    import preprocess_utils

    path = tmp_path / "data.jsonl"
    line = written(RECORDS["openai"])
    path.write_text(f"{line}\n{line}\n", encoding="utf-8")
    assert preprocess_utils.main(["--tokenizer", tiny_model_dir, "--train_format", "auto", "--data", str(path),
                                  "--index", "1"]) == 0
    assert f"{path}: 2 openai records" in capsys.readouterr().out
    path.write_text(f"{line}\n{line}\n{BROKEN}\n", encoding="utf-8")
    assert preprocess_utils.main(["--tokenizer", tiny_model_dir, "--train_format", "auto", "--data", str(path)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {path}:3: invalid JSON")


def test_evaluation_reads_them_with_the_right_line_numbers(tmp_path):
    from chatglm3_finetune.evaluate.evaluation import read_eval_records

    path = tmp_path / "test.jsonl"
    line = written(RECORDS["sharegpt"])
    path.write_text(f"{line}\n{line}\n", encoding="utf-8")
    assert [record for _, record in read_eval_records(str(path)).records] == [CONVERSATION] * 2
    path.write_text(f"{line}\n{line}\n{BROKEN}\n", encoding="utf-8")
    with pytest.raises(DataError, match=f"^{path}:3: invalid JSON"):
        read_eval_records(str(path))
