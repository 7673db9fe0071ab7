"""NaN, Infinity and repeated keys, which Python's json accepts silently, are refused wherever this
project reads JSON (data files of every kind, converters, options files), naming where they are."""

import json
import re

import pytest

from chatglm3_finetune.data.formats import load_data
from chatglm3_finetune.data.records import MULTI_TURN, DataError, read_records
from chatglm3_finetune.data.strict_json import StrictJsonError, loads

U = {"role": "user", "content": "Hi"}
A = {"role": "assistant", "content": "Hello"}
GOOD = json.dumps({"conversations": [U, A]})
NOT_A_NUMBER = "is not a JSON number"
TWICE = "appears twice in one object"


@pytest.mark.parametrize("text, location, fragment", [
    ('{"a": NaN}', ("a",), "NaN is not a JSON number"),
    ('{"a": [1, {"b": -Infinity}]}', ("a", 1, "b"), "-Infinity is not a JSON number"),
    ('[{"x": 1}, {"y": Infinity}]', (1, "y"), "Infinity is not a JSON number"),
    ('{"big": 1e999}', ("big",), "1e999 is beyond the range of a float"),
    ('{"neg": -2.5e400}', ("neg",), "-2.5e400 is beyond the range of a float"),
    ('{"a": 1, "b": {"c": 1, "c": 2}}', ("b", "c"), "the key 'c' appears twice in one object"),
    ('{"a": 1, "a": 1}', ("a",), "the key 'a' appears twice"),
    ('NaN', (), "NaN is not a JSON number"),
])
def test_refused_values_are_named_by_their_path(text, location, fragment):
    assert json.loads(text) is not None  # Python's json takes every one of them
    with pytest.raises(StrictJsonError) as e:
        loads(text)
    assert e.value.location == location and fragment in e.value.problem


def test_everything_json_allows_reads_as_json_loads_reads_it():
    text = ('{"int": 12345678901234567890, "float": 1.5e308, "tiny": 5e-324, "neg": -0.0, "s": "NaN", '
            '"nested": [{"a": 1}, {"a": 2}], "same key in two objects": [{"k": 1}, {"k": 2}], "u": "\\u2028"}')
    assert loads(text) == json.loads(text)
    assert loads(text.encode("utf-16")) == json.loads(text)  # bytes: the encoding is detected as json.loads does


def test_path_message_reads_like_the_other_data_errors():
    with pytest.raises(StrictJsonError, match=r"^messages\[2\]\.content: NaN is not a JSON number"):
        loads('{"messages": [{}, {}, {"content": NaN}]}')


# ---- data files ----------------------------------------------------------------------------------------

def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


TOOL_TURN = '{"role": "tool", "name": "w", "parameters": {"t": %s}, "observation": "o"}'


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_json_lines_with_a_non_finite_number_name_file_line_and_field(tmp_path, value):
    bad = '{"conversations": [%s, %s, %s]}' % (json.dumps(U), TOOL_TURN % value, json.dumps(A))
    path = write(tmp_path, "data.jsonl", "\n".join([GOOD, GOOD, bad, GOOD]) + "\n")
    with pytest.raises(DataError) as e:
        read_records(path)
    assert str(e.value).startswith(f"{path}:3: conversations[1].parameters.t: {value} is ")


def test_a_json_list_with_nan_names_the_record_index_and_field(tmp_path):
    bad = '{"conversations": [%s, %s, %s]}' % (json.dumps(U), TOOL_TURN % "NaN", json.dumps(A))
    path = write(tmp_path, "data.json", f"[{GOOD},\n{bad}]")
    with pytest.raises(DataError) as e:
        read_records(path)
    assert str(e.value).startswith(f"{path}[1]: conversations[1].parameters.t: NaN {NOT_A_NUMBER}")


@pytest.mark.parametrize("name, text, message", [
    ("top.jsonl", '{"conversations": [], "conversations": [%s, %s]}' % (json.dumps(U), json.dumps(A)),
     ":2: conversations: the key 'conversations' appears twice in one object"),
    ("turn.jsonl", '{"conversations": [{"role": "user", "content": "a", "content": "b"}, %s]}' % json.dumps(A),
     ":2: conversations[0].content: the key 'content' appears twice in one object"),
    ("list.json", '{"conversations": [%s, {"role": "assistant", "role": "user", "content": "x"}]}' % json.dumps(U),
     "[1]: conversations[1].role: the key 'role' appears twice in one object"),
])
def test_a_key_given_twice_in_a_record_is_refused_with_file_line_and_key(tmp_path, name, text, message):
    """The decision: a repeated key is refused, not read as its last value (what json.loads does):
    the two values usually differ and only the user knows which one is meant."""
    content = f"[{GOOD},\n{text}]" if name.endswith(".json") else f"{GOOD}\n{text}\n"
    path = write(tmp_path, name, content)
    with pytest.raises(DataError) as e:
        read_records(path)
    assert str(e.value).startswith(f"{path}{message}"), str(e.value)


@pytest.mark.parametrize("train_format, record", [
    ("openai", '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", '
               '"score": NaN}]}'),
    ("sharegpt", '{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}], "w": Infinity}'),
    ("alpaca", '{"instruction": "q", "output": "a", "output": "b"}'),
    ("input-output", '{"prompt": "q", "response": "a", "score": -Infinity}'),
])
def test_every_format_refuses_them_on_the_right_line(tmp_path, train_format, record):
    good = {"openai": '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}',
            "sharegpt": '{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}',
            "alpaca": '{"instruction": "q", "output": "a"}', "input-output": '{"prompt": "q", "response": "a"}'}
    path = write(tmp_path, "data.jsonl", f"{good[train_format]}\n\n{record}\n")
    for fmt in (train_format, "auto"):
        with pytest.raises(DataError, match=rf"^{re.escape(path)}:3: \w"):
            load_data(path, fmt)


def test_parquet_rows_with_nan_are_refused_with_row_and_field(tmp_path):
    import pyarrow
    import pyarrow.parquet

    rows = [{"prompt": "q", "response": "a", "score": 1.0}, {"prompt": "q", "response": "a", "score": float("nan")}]
    path = str(tmp_path / "data.parquet")
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), path)
    with pytest.raises(DataError) as e:
        load_data(path, "input-output")
    assert str(e.value).startswith(f"{path}[1]: score: the value is not a finite number")


def test_finetune_refuses_nan_in_the_data_with_exit_2(tiny_model_dir, tmp_path, finetune_in_process):
    bad = '{"conversations": [%s, %s, %s]}' % (json.dumps(U), TOOL_TURN % "NaN", json.dumps(A))
    path = write(tmp_path, "data.jsonl", f"{GOOD}\n{bad}\n")
    result = finetune_in_process("--model_name_or_path", tiny_model_dir, "--train_format", MULTI_TURN,
                                 "--train_file", path, "--output_dir", str(tmp_path / "out"), "--do_train",
                                 "--use_cpu", "--report_to", "none",
                                 "--preprocessing_cache_dir", str(tmp_path / "cache"))
    assert result.returncode == 2
    assert result.stderr.strip() == (f"error: {path}:2: conversations[1].parameters.t: NaN is not a JSON number "
                                     f"(Python's json writes it for a float that is not finite); write a number "
                                     f"or null")


# ---- converters ------------------------------------------------------------------------------------------

def test_advertise_gen_converter_refuses_nan_and_repeated_keys(tmp_path, capsys):
    from chatglm3_finetune.data.converters import advertise_gen

    good = '{"content": "c", "summary": "s"}'
    for bad, message in (('{"content": "c", "summary": "s", "n": NaN}', ":2: n: NaN is not a JSON number"),
                         ('{"content": "c", "content": "d", "summary": "s"}', ":2: content: the key 'content'")):
        source = write(tmp_path, "adgen.json", f"{good}\n{bad}\n")
        assert advertise_gen.main(["--path", source, "--output", str(tmp_path / "out.jsonl")]) == 2
        assert capsys.readouterr().err.startswith(f"error: {source}{message}")
        assert not (tmp_path / "out.jsonl").exists()


def test_tool_alpaca_counts_a_nan_action_input_as_damaged(tmp_path):
    from chatglm3_finetune.data.converters.tool_alpaca import BAD_ACTION_INPUT, convert_tool_alpaca

    def instance(action_input):
        return {"input": "q", "output": "a", "Final Thought": "t",
                "intermediate_steps": [[["getWeather", action_input, "Thought: x\nAction: getWeather"], "sunny"]]}

    api = {"Name": "Weather", "NLDocumentation": "doc", "Instances": [
        instance('{"city": "Paris"}'), instance('{"limit": NaN}'), instance('{"city": "a", "city": "b"}')]}
    rows, skipped = convert_tool_alpaca([api])
    assert len(rows) == 1 and {reason: len(places) for reason, places in skipped.items()} == {BAD_ACTION_INPUT: 2}


def test_tool_alpaca_converter_refuses_a_file_with_nan(tmp_path, capsys):
    from chatglm3_finetune.data.converters import tool_alpaca

    source = write(tmp_path, "train.json", '[{"Name": "W", "NLDocumentation": "d", "Instances": [], "x": NaN}]')
    assert tool_alpaca.main(["--path", source, "--output", str(tmp_path / "out.jsonl")]) == 2
    assert capsys.readouterr().err.startswith(f"error: {source}: [0].x: NaN is not a JSON number")


# ---- options files ---------------------------------------------------------------------------------------

def run_options_file(finetune_in_process, path):
    result = finetune_in_process(str(path))
    assert result.returncode == 2
    return result.stderr.strip()


def options(tiny_model_dir, data, tmp_path) -> dict:
    return {"model_name_or_path": tiny_model_dir, "train_format": "multi-turn", "train_file": data,
            "output_dir": str(tmp_path / "out"), "do_train": True, "use_cpu": True, "report_to": "none"}


def test_options_file_with_a_key_twice_is_refused_with_the_key_and_file(tiny_model_dir, tmp_path,
                                                                         finetune_in_process):
    data = write(tmp_path, "data.jsonl", GOOD + "\n")
    body = ",\n".join(f"{json.dumps(key)}: {json.dumps(value)}" for key, value in
                      options(tiny_model_dir, data, tmp_path).items())
    as_json = tmp_path / "args.json"
    as_json.write_text("{" + body + ',\n"learning_rate": 1e-3,\n"learning_rate": 1e-2}')
    assert run_options_file(finetune_in_process, as_json) == (
        f"error: {as_json}: learning_rate: the key 'learning_rate' appears twice in one object (a JSON reader keeps "
        f"only the last value); keep one")
    as_yaml = tmp_path / "args.yaml"
    lines = [f"{key}: {json.dumps(value)}" for key, value in options(tiny_model_dir, data, tmp_path).items()]
    as_yaml.write_text("\n".join(lines + ["max_steps: 3", "max_steps: 30"]) + "\n")
    assert run_options_file(finetune_in_process, as_yaml) == (
        f"error: {as_yaml}:{len(lines) + 2}:1: invalid YAML in the options file: the key 'max_steps' appears twice in "
        f"one mapping (a YAML reader keeps only the last value); keep one")


def test_options_file_with_nan_is_refused(tiny_model_dir, tmp_path, finetune_in_process):
    data = write(tmp_path, "data.jsonl", GOOD + "\n")
    path = tmp_path / "args.json"
    path.write_text(json.dumps(dict(options(tiny_model_dir, data, tmp_path), warmup_ratio=float("nan"))))
    assert run_options_file(finetune_in_process, path).startswith(
        f"error: {path}: warmup_ratio: NaN is not a JSON number")


def test_yaml_options_file_with_a_raw_line_separator_is_refused_at_its_line(tiny_model_dir, tmp_path,
                                                                            finetune_in_process):
    """YAML reads U+2028 as a line break, so its line numbers would disagree with every editor."""
    data = write(tmp_path, "data.jsonl", GOOD + "\n")
    path = tmp_path / "args.yaml"
    lines = [f"{key}: {json.dumps(value)}" for key, value in options(tiny_model_dir, data, tmp_path).items()]
    path.write_text("\n".join(lines + ["run_name: 'a\u2028b'"]) + "\n", encoding="utf-8")
    assert run_options_file(finetune_in_process, path) == (
        f"error: {path}:{len(lines) + 1}: a raw U+2028 LINE SEPARATOR character, which YAML reads as a line break; "
        f"write it as \\u2028 inside a double-quoted string")
