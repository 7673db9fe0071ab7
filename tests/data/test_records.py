"""Reading and validating data files: every problem named by file, line (or index) and field."""

import json

import pytest

from chatglm3_finetune.data.records import INPUT_OUTPUT, MULTI_TURN, DataError, read_records, validate_records


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def jsonl(*records):
    return "\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n"


GOOD = {"conversations": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}


def conv(*turns, **extra):
    return {"conversations": list(turns), **extra}


U = {"role": "user", "content": "Hi"}
A = {"role": "assistant", "content": "Hello"}


@pytest.mark.parametrize("record, message", [
    (conv(U, {"role": "sytem", "content": "x"}, A),
     "conversations[1].role: 'sytem' is not one of system, user, assistant, tool, interpreter, observation"),
    ({"conversation": []}, "conversations: missing"),
    (conv(), "conversations: the list is empty"),
    ({"conversations": "hi"}, "conversations: must be a list of turns, found a string"),
    (conv(U, "hello"), "conversations[1]: a turn must be an object, found a string"),
    (conv(U, {"content": "x"}), "conversations[1].role: missing"),
    (conv(U, {"role": "assistant"}), "conversations[1].content: missing"),
    (conv(U, {"role": "assistant", "content": 5}), "conversations[1].content: must be a string, found a number"),
    (conv(U, {"role": "system", "content": "s"}, A), "conversations[1].role: 'system' must come before any 'user' turn"),
    (conv({"role": "system", "content": "s"}, {"role": "system", "content": "t"}, U, A),
     "conversations[1].role: a second 'system' turn (at most one per record)"),
    (conv(U, {"role": "tool", "parameters": {}, "observation": "o"}), "conversations[1].name: missing"),
    (conv(U, {"role": "tool", "name": "w", "observation": "o"}), "conversations[1].parameters: missing"),
    (conv(U, {"role": "tool", "name": "w", "parameters": {}}), "conversations[1].observation: missing"),
    (conv(U, {"role": "tool", "name": "w", "parameters": ["Paris"], "observation": "o"}),
     "conversations[1].parameters: must be an object, found a list"),
    (conv(U, {"role": "interpreter", "content": "print(1)"}), "conversations[1].observation: missing"),
    (conv(U, {"role": "assistant", "content": "x", "loss": "yes"}), 'conversations[1].loss: must be true or false, found "yes"'),
    (conv(U, {"role": "assistant", "content": "x", "loss": False}), "conversations: no turn is trained"),
    (conv({"role": "system", "content": "s"}, U), "conversations: no turn is trained"),
    (conv(U, A, tools={"name": "w"}), "tools: must be a list, found an object"),
])
def test_multi_turn_validation_names_line_and_field(tmp_path, record, message):
    path = write(tmp_path, "data.jsonl", jsonl(GOOD, GOOD, record))
    with pytest.raises(DataError) as e:
        validate_records(read_records(path), MULTI_TURN)
    assert str(e.value).startswith(f"{path}:3: {message}")


@pytest.mark.parametrize("record, message", [
    ({"prompt": "p"}, "response: missing"),
    ({"prompt": ["p"], "response": "r"}, "prompt: must be a string, found a list"),
    ({"prompt": "p", "response": None}, "response: must be a string, found null"),
])
def test_prompt_response_validation(tmp_path, record, message):
    path = write(tmp_path, "data.json", json.dumps([{"prompt": "a", "response": "b"}, record]))
    with pytest.raises(DataError) as e:
        validate_records(read_records(path), INPUT_OUTPUT)
    assert str(e.value).startswith(f"{path}[1]: {message}")


def test_file_level_errors(tmp_path):
    cases = [
        (write(tmp_path, "bad.jsonl", jsonl(GOOD) + '{"conversations": [\n'), "bad.jsonl:2: invalid JSON"),
        (write(tmp_path, "empty.jsonl", "\n\n"), "empty.jsonl: the file holds no records"),
        (write(tmp_path, "obj.json", json.dumps({"a": 1}, indent=1)), "a .json data file must hold a list of records, found an object"),
        (write(tmp_path, "scalar.jsonl", jsonl(GOOD, 7)), "scalar.jsonl:2: a record must be a JSON object, found a number"),
        (write(tmp_path, "mixed.jsonl", jsonl(GOOD, {"prompt": "p", "response": "r"})),
         "mixed.jsonl:2: this record is input-output but"),
        (write(tmp_path, "io.jsonl", jsonl({"prompt": "p", "response": "r"})),
         "io.jsonl:1: the record has 'prompt'/'response' (input-output format) but train_format is multi-turn"),
        (str(tmp_path / "missing.jsonl"), "missing.jsonl: no such data file"),
    ]
    for path, message in cases:
        with pytest.raises(DataError) as e:
            validate_records(read_records(path), MULTI_TURN)
        assert message in str(e.value), (path, str(e.value))


@pytest.mark.parametrize("role, hint", [("sytem", "system"), ("assitant", "assistant"), ("User", "user"),
                                        ("OBSERVATION", "observation"), ("tools", "tool")])
def test_a_misspelled_role_gets_a_did_you_mean(tmp_path, role, hint):
    path = write(tmp_path, "data.jsonl", jsonl(GOOD, conv(U, {"role": role, "content": "x"}, A)))
    with pytest.raises(DataError) as e:
        validate_records(read_records(path), MULTI_TURN)
    assert str(e.value) == (f"{path}:2: conversations[1].role: {role!r} is not one of system, user, assistant, tool, "
                            f"interpreter, observation; did you mean {hint!r}?")


def test_a_role_far_from_every_role_gets_no_guess(tmp_path):
    path = write(tmp_path, "data.jsonl", jsonl(conv(U, {"role": "narrator", "content": "x"}, A)))
    with pytest.raises(DataError) as e:
        validate_records(read_records(path), MULTI_TURN)
    assert str(e.value).endswith("'narrator' is not one of system, user, assistant, tool, interpreter, observation")


def test_unknown_train_format(tmp_path):
    with pytest.raises(DataError, match="train_format 'chat' is not one of multi-turn, input-output"):
        validate_records(read_records(write(tmp_path, "d.jsonl", jsonl(GOOD))), "chat")


@pytest.mark.parametrize("train_format, record, message", [
    ("sharegpt", {"conversations": [{"from": "humna", "value": "q"}, {"from": "gpt", "value": "a"}]},
     "conversations[0].from: 'humna' is not one of system, human, user, gpt, assistant, function_call, observation; "
     "did you mean 'human'?"),
    ("openai", {"messages": [{"role": "user", "content": "q"}, {"role": "Assistant", "content": "a"}]},
     "messages[1].role: 'Assistant' is not one of system, developer, user, assistant, tool; did you mean "
     "'assistant'?"),
])
def test_other_formats_suggest_their_own_roles(tmp_path, train_format, record, message):
    from chatglm3_finetune.data.formats import load_data

    path = write(tmp_path, "data.jsonl", jsonl(record))
    with pytest.raises(DataError) as e:
        load_data(path, train_format)
    assert str(e.value) == f"{path}:1: {message}"
