"""formats and sources: OpenAI messages, ShareGPT and Alpaca records give exactly the
tokens of the same conversation written in this project's format; every malformed record is named
`file:line: field: problem`; parquet files and datasets folders read like JSON lines."""

import json
from types import SimpleNamespace

import pytest

from chatglm3_finetune.data.formats import load_data, record_format_of, settle_record_format
from chatglm3_finetune.data.encoding import LengthLimits, encode_multi_turn, encode_prompt_response
from chatglm3_finetune.evaluate.evaluation import GenerationEval, build_eval_items
from chatglm3_finetune.data.records import ALPACA, AUTO, INPUT_OUTPUT, MULTI_TURN, OPENAI, SHAREGPT, DataError
from chatglm3_finetune.format.tokenizer import load_tokenizer
from chatglm3_finetune.data.training_data import length_limits, tokenize_records
from preprocess_utils import preview
from test_encoding import (
    ASSISTANT, EOS, GMASK, NEED_TOOL, NL, OBSERVATION, SOP, SUNNY, SYSTEM, SYSTEM_TEXT, TEMP_JSON, TOOL_CALL, USER,
    WEATHER_META, WEATHER_Q, X,
)

WEATHER_TOOL = {"name": "weather", "description": "Weather of a city", "parameters": {"city": "string"}}
SYSTEM_MSG = "You are a helpful assistant."


def call(call_id, name, arguments):
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}


def sharegpt_call(name, arguments):
    return {"from": "function_call", "value": json.dumps({"name": name, "arguments": arguments})}


# The same conversations, written in each format: (this project's record, {format: record}).
CASES = {
    "user-assistant": (
        {"conversations": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
        {OPENAI: {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
         SHAREGPT: {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}},
    ),
    "system": (
        {"conversations": [{"role": "system", "content": SYSTEM_MSG}, {"role": "user", "content": "Hi"},
                           {"role": "assistant", "content": "Hello"}]},
        {OPENAI: {"messages": [{"role": "system", "content": SYSTEM_MSG}, {"role": "user", "content": "Hi"},
                               {"role": "assistant", "content": "Hello"}]},
         SHAREGPT: {"system": SYSTEM_MSG, "conversations": [{"from": "human", "value": "Hi"},
                                                            {"from": "gpt", "value": "Hello"}]},
         ALPACA: {"system": SYSTEM_MSG, "instruction": "Hi", "input": "", "output": "Hello"}},
    ),
    "several turns, one untrained": (
        {"conversations": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello", "loss": False},
                           {"role": "user", "content": "Say hi\nto Bob"}, {"role": "assistant", "content": "Hi Bob"}]},
        {OPENAI: {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello", "weight": 0},
                               {"role": "user", "content": [{"type": "text", "text": "Say hi"},
                                                            {"type": "text", "text": "to Bob"}]},
                               {"role": "assistant", "content": "Hi Bob", "weight": 1}]},
         SHAREGPT: {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello", "loss": False},
                                      {"from": "human", "value": "Say hi\nto Bob"}, {"from": "gpt", "value": "Hi Bob"}]}},
    ),
    "thought, tool call, result, answer": (
        {"tools": [WEATHER_TOOL], "conversations": [
            {"role": "user", "content": "What is the weather in Paris?"},
            {"role": "assistant", "content": "I need to use the weather tool."},
            {"role": "tool", "name": "weather", "parameters": {"city": "Paris", "days": 3},
             "observation": {"temp": 21}},
            {"role": "assistant", "content": "Sunny, 21 degrees."}]},
        {OPENAI: {"tools": [{"type": "function", "function": WEATHER_TOOL}], "messages": [
            {"role": "user", "content": "What is the weather in Paris?"},
            {"role": "assistant", "content": "I need to use the weather tool.",
             "tool_calls": [call("c1", "weather", {"city": "Paris", "days": 3})]},
            {"role": "tool", "tool_call_id": "c1", "content": '{"temp": 21}'},
            {"role": "assistant", "content": "Sunny, 21 degrees."}]},
         SHAREGPT: {"tools": json.dumps([WEATHER_TOOL]), "conversations": [
             {"from": "human", "value": "What is the weather in Paris?"},
             {"from": "gpt", "value": "I need to use the weather tool."},
             sharegpt_call("weather", {"city": "Paris", "days": 3}),
             {"from": "observation", "value": '{"temp": 21}'},
             {"from": "gpt", "value": "Sunny, 21 degrees."}]}},
    ),
    "several calls in one message, results out of order": (
        {"tools": [WEATHER_TOOL], "conversations": [
            {"role": "system", "content": SYSTEM_MSG},
            {"role": "user", "content": "Paris and Rome?"},
            {"role": "tool", "name": "weather", "parameters": {"city": "Paris"}, "observation": "rain", "loss": False},
            {"role": "tool", "name": "weather", "parameters": {"city": "Rome"}, "observation": "sun", "loss": False},
            {"role": "assistant", "content": "Rain in Paris, sun in Rome."}]},
        {OPENAI: {"tools": [{"type": "function", "function": WEATHER_TOOL}], "messages": [
            {"role": "system", "content": SYSTEM_MSG},
            {"role": "user", "content": "Paris and Rome?"},
            {"role": "assistant", "content": None, "weight": 0, "tool_calls": [
                call("p", "weather", {"city": "Paris"}), call("r", "weather", {"city": "Rome"})]},
            {"role": "tool", "tool_call_id": "r", "content": "sun"},
            {"role": "tool", "tool_call_id": "p", "content": "rain"},
            {"role": "assistant", "content": "Rain in Paris, sun in Rome."}]},
         SHAREGPT: {"tools": [WEATHER_TOOL], "conversations": [
             {"from": "system", "value": SYSTEM_MSG},
             {"from": "human", "value": "Paris and Rome?"},
             dict(sharegpt_call("weather", {"city": "Paris"}), loss=False), {"from": "observation", "value": "rain"},
             dict(sharegpt_call("weather", {"city": "Rome"}), weight=0), {"from": "observation", "value": "sun"},
             {"from": "gpt", "value": "Rain in Paris, sun in Rome."}]}},
    ),
    "history": (
        {"conversations": [{"role": "system", "content": SYSTEM_MSG},
                           {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                           {"role": "user", "content": "Translate\nBonjour"}, {"role": "assistant", "content": "Hi"}]},
        {ALPACA: {"system": SYSTEM_MSG, "history": [["Hi", "Hello"]], "instruction": "Translate", "input": "Bonjour",
                  "output": "Hi"},
         OPENAI: {"messages": [{"role": "developer", "content": SYSTEM_MSG},
                               {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                               {"role": "user", "content": "Translate\nBonjour"},
                               {"role": "assistant", "content": "Hi"}]}},
    ),
}
GOLDEN = [(case, fmt) for case, (_, written) in CASES.items() for fmt in written]


def write_jsonl(tmp_path, name, *records):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("case, fmt", GOLDEN, ids=[f"{c}-{f}" for c, f in GOLDEN])
@pytest.mark.parametrize("named", [True, False], ids=["named", "auto"])
def test_each_format_gives_the_tokens_of_the_same_conversation(real_tokenizer, tmp_path, case, fmt, named):
    reference, written = CASES[case]
    data = load_data(write_jsonl(tmp_path, "d.jsonl", written[fmt]), fmt if named else AUTO)
    assert (data.source_format, data.record_format) == (fmt, MULTI_TURN)
    [(where, record)] = data.records
    assert where.endswith("d.jsonl:1")
    expected, got = encode_multi_turn(real_tokenizer, reference), encode_multi_turn(real_tokenizer, record)
    assert got.input_ids == expected.input_ids
    assert got.labels == expected.labels


def test_an_openai_tool_call_has_the_exact_chatglm3_layout(real_tokenizer, tmp_path):
    record = {"messages": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": "I need to use the weather tool.",
         "tool_calls": [call("c1", "weather", {"city": "Paris", "days": 3})]},
        {"role": "tool", "tool_call_id": "c1", "content": '{"temp": 21}'},
        {"role": "assistant", "content": "Sunny, 21 degrees."}]}
    [(_, converted)] = load_data(write_jsonl(tmp_path, "o.jsonl", record), OPENAI).records
    encoded = encode_multi_turn(real_tokenizer, converted)
    ids = ([GMASK, SOP, SYSTEM, *NL, *SYSTEM_TEXT, USER, *NL, *WEATHER_Q, ASSISTANT, *NL, *NEED_TOOL,
            ASSISTANT, *WEATHER_META, *TOOL_CALL, OBSERVATION, *NL, *TEMP_JSON, ASSISTANT, *NL, *SUNNY, EOS])
    assert encoded.input_ids == ids
    trained = ([X] * (2 + 1 + 2 + 6 + 1 + 2 + 7 + 1) + [*NL, *NEED_TOOL] + [ASSISTANT, *WEATHER_META, *TOOL_CALL]
               + [OBSERVATION] + [X] * (2 + 7) + [X, *NL, *SUNNY, EOS])
    assert encoded.labels == trained


def test_plain_alpaca_is_prompt_response_with_the_input_on_a_new_line(real_tokenizer, tmp_path):
    records = [{"instruction": "Translate", "input": "Bonjour", "output": "Hello"},
               {"instruction": "Say hi", "output": "Hi"},
               {"instruction": "", "input": "Only input", "output": "Ok"},
               {"instruction": "Say hi", "input": None, "output": "Hi", "system": None, "history": None}]
    data = load_data(write_jsonl(tmp_path, "a.jsonl", *records), AUTO)
    assert (data.source_format, data.record_format) == (ALPACA, INPUT_OUTPUT)
    assert [record for _, record in data.records] == [{"prompt": "Translate\nBonjour", "response": "Hello"},
                                                      {"prompt": "Say hi", "response": "Hi"},
                                                      {"prompt": "Only input", "response": "Ok"},
                                                      {"prompt": "Say hi", "response": "Hi"}]
    expected = encode_prompt_response(real_tokenizer, {"prompt": "Translate\nBonjour", "response": "Hello"})
    assert encode_prompt_response(real_tokenizer, data.records[0][1]).input_ids == expected.input_ids


def test_one_alpaca_record_with_history_makes_the_whole_file_conversations(tmp_path):
    path = write_jsonl(tmp_path, "a.jsonl", {"instruction": "Say hi", "output": "Hi"},
                       {"instruction": "Again", "output": "Hi", "history": [["Say hi", "Hi"]]})
    data = load_data(path, ALPACA)
    assert data.record_format == MULTI_TURN
    assert f"as conversations because {path}:2 has a system or history" in data.describe()
    assert data.records[0][1] == {"conversations": [{"role": "user", "content": "Say hi"},
                                                    {"role": "assistant", "content": "Hi"}]}


def test_auto_says_what_it_recognised(tmp_path):
    path = write_jsonl(tmp_path, "o.jsonl", CASES["system"][1][OPENAI])
    assert load_data(path, AUTO).describe() == (
        f"{path}: 1 openai records (recognised from the first record), read as multi-turn records")
    assert "(as --train_format says)" in load_data(path, OPENAI).describe()


# ---- bad input: one test per error -----------------------------------------------------------------

U = {"role": "user", "content": "Hi"}
A = {"role": "assistant", "content": "Hello"}
CALL = {"role": "assistant", "tool_calls": [call("c1", "weather", {"city": "Paris"})]}
RESULT = {"role": "tool", "tool_call_id": "c1", "content": "rain"}
H = {"from": "human", "value": "Hi"}
G = {"from": "gpt", "value": "Hello"}
FC = sharegpt_call("weather", {"city": "Paris"})
OBS = {"from": "observation", "value": "rain"}


def messages(*items, **extra):
    return {"messages": list(items), **extra}


def sharegpt(*turns, **extra):
    return {"conversations": list(turns), **extra}


def alpaca(**fields):
    return {"instruction": "Say hi", "output": "Hi", **fields}


def with_arguments(arguments):
    return {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function",
                                                 "function": {"name": "weather", "arguments": arguments}}]}


BAD = [
    # OpenAI chat messages
    (OPENAI, {"message": []}, "messages: missing"),
    (OPENAI, {"messages": {"role": "user"}}, "messages: must be a list of turns, found an object"),
    (OPENAI, messages(), "messages: the list is empty"),
    (OPENAI, messages(U, "Hello"), "messages[1]: a turn must be an object, found a string"),
    (OPENAI, messages(U, {"content": "x"}), "messages[1].role: missing"),
    (OPENAI, messages(U, {"role": "bot", "content": "x"}),
     "messages[1].role: 'bot' is not one of system, developer, user, assistant, tool"),
    (OPENAI, messages(U, {"role": "assistant", "content": None, "function_call": {"name": "w"}}),
     "messages[1].function_call: the legacy form; write the call in 'tool_calls'"),
    (OPENAI, messages(U, dict(A, weight=1, loss=True)), "messages[1]: has both 'weight' and 'loss'; keep one"),
    (OPENAI, messages(dict(U, weight=1), A), "messages[0].weight: only assistant turns are trained"),
    (OPENAI, messages(U, dict(A, weight=0.5)), "messages[1].weight: must be 0 or 1, found 0.5"),
    (OPENAI, messages(U, dict(A, loss="no")), 'messages[1].loss: must be true or false, found "no"'),
    (OPENAI, messages(U, {"role": "user"}, A), "messages[1].content: missing"),
    (OPENAI, messages(U, {"role": "assistant", "content": 7}),
     "messages[1].content: must be a string or a list of text parts, found a number"),
    (OPENAI, messages({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}, A),
     "messages[0].content[0]: only text parts"),
    (OPENAI, messages(U, RESULT, A), "messages[1]: a 'tool' message must follow the assistant message"),
    (OPENAI, messages(U, {"role": "assistant", "tool_calls": {"id": "c1"}}),
     "messages[1].tool_calls: must be a list, found an object"),
    (OPENAI, messages(U, {"role": "assistant", "tool_calls": [{"id": "c1"}]}), "messages[1].tool_calls[0].function: missing"),
    (OPENAI, messages(U, {"role": "assistant", "tool_calls": [{"function": {"name": "", "arguments": "{}"}}]}),
     "messages[1].tool_calls[0].function.name: must be a non-empty string, found a string"),
    (OPENAI, messages(U, {"role": "assistant", "tool_calls": [{"function": {"name": "weather"}}]}),
     "messages[1].tool_calls[0].function.arguments: missing"),
    (OPENAI, messages(U, with_arguments("{city: Paris}"), RESULT),
     "messages[1].tool_calls[0].function.arguments: not valid JSON (Expecting property name"),
    (OPENAI, messages(U, with_arguments('["Paris"]'), RESULT),
     "messages[1].tool_calls[0].function.arguments: must be a JSON object of arguments, found a list"),
    (OPENAI, messages(U, CALL, dict(RESULT, tool_call_id="c9"), A),
     "messages[2].tool_call_id: 'c9' matches no call of messages[1] (its call ids: 'c1')"),
    (OPENAI, messages(U, CALL, RESULT, RESULT, A), "messages[3].tool_call_id: a second result for call 'c1'"),
    (OPENAI, messages(U, CALL, {"role": "tool", "content": "a"}, {"role": "tool", "content": "b"}, A),
     "messages[3]: a 'tool' result with no call left to answer (messages[1] has 1 tool_calls)"),
    (OPENAI, messages(U, CALL, A), "messages[1].tool_calls[0]: no 'tool' message answers this call"),
    (OPENAI, messages(U, CALL, dict(RESULT, weight=1), A), "messages[2].weight: only assistant turns are trained"),
    (OPENAI, messages(U, A, tools={"type": "function"}), "tools: must be a list of tools, found an object"),
    (OPENAI, messages(U, A, tools="[{"), "tools: a string must hold a JSON list of tools"),
    (OPENAI, messages(U, A, tools=[{"type": "function", "function": "weather"}]),
     "tools[0].function: must be an object"),
    (OPENAI, messages(U, {"role": "system", "content": "s"}, A), "messages[1].role: 'system' must come before any"),
    (OPENAI, messages({"role": "system", "content": "s"}, {"role": "developer", "content": "t"}, U, A),
     "messages[1].role: a second 'system' turn"),
    (OPENAI, messages(U, dict(A, weight=0)), "messages: no turn is trained"),
    # ShareGPT
    (SHAREGPT, {"conversation": [H, G]}, "conversations: missing"),
    (SHAREGPT, sharegpt(H, {"value": "x"}), "conversations[1].from: missing"),
    (SHAREGPT, sharegpt(H, ["gpt", "Hello"]), "conversations[1]: a turn must be an object, found a list"),
    (SHAREGPT, sharegpt(H, {"from": "bot", "value": "x"}),
     "conversations[1].from: 'bot' is not one of system, human, user, gpt, assistant, function_call, observation"),
    (SHAREGPT, sharegpt(H, {"from": "gpt"}), "conversations[1].value: missing"),
    (SHAREGPT, sharegpt(H, {"from": "gpt", "value": ["x"]}), "conversations[1].value: must be a string, found a list"),
    (SHAREGPT, sharegpt(H, OBS, G), "conversations[1].from: an 'observation' must come right after the 'function_call'"),
    (SHAREGPT, sharegpt(H, FC, G), "conversations[1]: a function_call must be followed by its 'observation' turn"),
    (SHAREGPT, sharegpt(H, {"from": "function_call", "value": "weather(Paris)"}, OBS),
     "conversations[1].value: a function_call's value must be JSON"),
    (SHAREGPT, sharegpt(H, {"from": "function_call", "value": json.dumps([json.loads(FC["value"])] * 2)}, OBS),
     "conversations[1].value: several calls in one turn"),
    (SHAREGPT, sharegpt(H, {"from": "function_call", "value": '"weather"'}, OBS),
     "conversations[1].value: must be a JSON object {\"name\", \"arguments\"}, found a string"),
    (SHAREGPT, sharegpt(H, {"from": "function_call", "value": '{"arguments": {}}'}, OBS),
     "conversations[1].value: the call's \"name\" must be a non-empty string"),
    (SHAREGPT, sharegpt(H, {"from": "function_call", "value": '{"name": "weather"}'}, OBS),
     "conversations[1].value: the call has no \"arguments\" (write {} for none)"),
    (SHAREGPT, sharegpt(H, sharegpt_call("weather", "Paris"), OBS),
     "conversations[1].value: arguments: not valid JSON"),
    (SHAREGPT, sharegpt(H, sharegpt_call("weather", ["Paris"]), OBS),
     "conversations[1].value: arguments: must be a JSON object of arguments, found a list"),
    (SHAREGPT, sharegpt(H, G, system=["s"]), "system: must be a string, found a list"),
    (SHAREGPT, sharegpt(dict(H, weight=0), G), "conversations[0].weight: only assistant turns are trained"),
    (SHAREGPT, sharegpt(H, FC, dict(OBS, loss=True), G), "conversations[2].loss: only assistant turns are trained"),
    (SHAREGPT, sharegpt({"from": "system", "value": "t"}, H, G, system="s"),
     "conversations[0].from: a second 'system' turn"),
    (SHAREGPT, sharegpt(H, dict(G, loss=False)), "conversations: no turn is trained"),
    # Alpaca
    (ALPACA, {"output": "Hi"}, "instruction: missing"),
    (ALPACA, alpaca(output=["Hi", "Hello"]), "output: must be a string, found a list"),
    (ALPACA, alpaca(input=3), "input: must be a string, found a number"),
    (ALPACA, {"instruction": None, "output": "Hi"}, "instruction: must be a string, found null"),
    (ALPACA, alpaca(instruction="", input=""), "instruction: empty, and no input: the record has no prompt"),
    (ALPACA, alpaca(system={"text": "s"}), "system: must be a string, found an object"),
    (ALPACA, alpaca(history="Hi"), "history: must be a list of [question, answer] pairs, found a string"),
    (ALPACA, alpaca(history=[["Hi", "Hello"], ["Bye"]]), 'history[1]: must be a [question, answer] pair of strings, '
                                                         'found ["Bye"]'),
]


@pytest.mark.parametrize("fmt, record, message", BAD, ids=[f"{f}-{i}" for i, (f, _, _) in enumerate(BAD)])
def test_a_malformed_record_is_named_by_line_and_field(tmp_path, fmt, record, message):
    good = {OPENAI: messages(U, A), SHAREGPT: sharegpt(H, G), ALPACA: alpaca()}[fmt]
    path = write_jsonl(tmp_path, "data.jsonl", good, good, record)
    with pytest.raises(DataError) as e:
        load_data(path, fmt)
    assert str(e.value).startswith(f"{path}:3: {message}"), str(e.value)


def test_format_level_errors(tmp_path):
    def error(path, train_format=AUTO, split=None):
        with pytest.raises(DataError) as e:
            load_data(path, train_format, split)
        return str(e.value)

    path = write_jsonl(tmp_path, "odd.jsonl", {"question": "q", "answer": "a"})
    assert error(path).startswith(f"{path}:1: cannot tell the format of this record (it has 'question', 'answer'): "
                                  f"expected 'messages' of role/content (openai);")
    path = write_jsonl(tmp_path, "mixed.jsonl", messages(U, A), messages(U, A), sharegpt(H, G))
    assert error(path) == (f"{path}:3: this record is sharegpt ('conversations' of from/value) but {path}:1 is "
                           f"openai: a file must hold records of one format")
    assert error(path, SHAREGPT) == (f"{path}:1: this record is openai ('messages' of role/content) but "
                                     f"--train_format is sharegpt; pass --train_format openai (or auto)")
    path = write_jsonl(tmp_path, "sharegpt.jsonl", sharegpt(H, G))
    assert error(path, MULTI_TURN).startswith(f"{path}:1: this record is sharegpt ('conversations' of from/value) "
                                              f"but --train_format is multi-turn")
    path = write_jsonl(tmp_path, "scalar.jsonl", alpaca(), 5)
    assert error(path) == f"{path}:2: a record must be a JSON object, found a number"


def test_splits_that_become_different_formats_are_refused():
    data_args = SimpleNamespace(train_format=AUTO)
    with pytest.raises(RuntimeError, match="read the data before"):
        record_format_of(data_args)
    settle_record_format(data_args, SimpleNamespace(record_format=INPUT_OUTPUT), "train.jsonl")
    assert record_format_of(data_args) == INPUT_OUTPUT
    assert length_limits(SimpleNamespace(**data_args.__dict__, max_seq_length=9, max_source_length=5,
                                         max_target_length=4)) == LengthLimits(None, 5, 4)
    with pytest.raises(DataError, match="dev.jsonl: its records become multi-turn records but the run's other data "
                                        "became input-output: give every split in one format"):
        settle_record_format(data_args, SimpleNamespace(record_format=MULTI_TURN), "dev.jsonl")
    assert record_format_of(SimpleNamespace(train_format=SHAREGPT)) == MULTI_TURN


# ---- parquet files and datasets folders ------------------------------------------------------------

# (a column holds one type: content as text parts and as strings cannot share a table)
OPENAI_RECORDS = [CASES[case][1][OPENAI] for case in ("thought, tool call, result, answer",
                                                      "several calls in one message, results out of order",
                                                      "history")]


def test_parquet_and_dataset_folders_read_like_json_lines(tmp_path):
    import datasets

    expected = [record for _, record in load_data(write_jsonl(tmp_path, "o.jsonl", *OPENAI_RECORDS), AUTO).records]
    # one table for every row: each message gets every field any message has (null where absent)
    table = datasets.Dataset.from_list(OPENAI_RECORDS)
    table.to_parquet(str(tmp_path / "o.parquet"))
    data = load_data(str(tmp_path / "o.parquet"), AUTO)
    assert [where for where, _ in data.records] == [f"{tmp_path / 'o.parquet'}[{i}]" for i in range(3)]
    assert [record for _, record in data.records] == expected

    table.save_to_disk(str(tmp_path / "single"))
    assert [record for _, record in load_data(str(tmp_path / "single"), OPENAI).records] == expected
    datasets.DatasetDict({"train": table, "test": table.select([1])}).save_to_disk(str(tmp_path / "dict"))
    test = load_data(str(tmp_path / "dict"), AUTO, "test")
    assert test.records == [(f"{tmp_path / 'dict' / 'test'}[0]", expected[1])]


def test_multi_turn_records_in_parquet_lose_the_nulls_the_table_adds(tmp_path, tiny_tokenizer):
    import datetime

    import datasets

    records = [{"conversations": [{"role": "user", "content": "Hi"},
                                  {"role": "tool", "name": "w", "parameters": {"city": "Paris"}, "observation": "x"},
                                  {"role": "assistant", "content": "Hello", "loss": False}]},
               {"conversations": [{"role": "user", "content": "Hi"},
                                  {"role": "tool", "name": "w", "parameters": {"days": 2}, "observation": "y"}]}]
    created = datetime.datetime(2026, 11, 30, 12, 0)
    datasets.Dataset.from_list([dict(r, created=created) for r in records]).to_parquet(str(tmp_path / "m.parquet"))
    data = load_data(str(tmp_path / "m.parquet"), MULTI_TURN)
    assert [record for _, record in data.records] == [dict(r, created=str(created)) for r in records]
    dataset, _ = tokenize_records(tiny_tokenizer, data.records, MULTI_TURN, LengthLimits())  # JSON all through
    assert dataset["input_ids"] == [encode_multi_turn(tiny_tokenizer, r).input_ids for r in records]


def test_source_errors(tmp_path):
    import datasets

    def error(path, split=None, flag="--split"):
        with pytest.raises(DataError) as e:
            load_data(str(path), AUTO, split, flag)
        return str(e.value)

    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    assert error(tmp_path / "bad.parquet").startswith(f"{tmp_path / 'bad.parquet'}: not a readable parquet file (")
    assert error(tmp_path / "none.parquet") == f"{tmp_path / 'none.parquet'}: no such data file"
    datasets.Dataset.from_list([]).to_parquet(str(tmp_path / "empty.parquet"))
    assert error(tmp_path / "empty.parquet") == f"{tmp_path / 'empty.parquet'}: the data holds no records"
    (tmp_path / "plain").mkdir()
    assert error(tmp_path / "plain").startswith(f"{tmp_path / 'plain'}: not a dataset folder (a folder must be saved "
                                                f"by datasets' save_to_disk")
    table = datasets.Dataset.from_list([alpaca()])
    datasets.DatasetDict({"train": table, "dev": table}).save_to_disk(str(tmp_path / "dict"))
    assert error(tmp_path / "dict", flag="--train_split") == (
        f"{tmp_path / 'dict'}: the dataset has the splits train, dev: choose one with --train_split")
    assert error(tmp_path / "dict", "test", "--test_split") == (
        f"{tmp_path / 'dict'}: --test_split test: no such split (the dataset has train, dev)")
    table.save_to_disk(str(tmp_path / "single"))
    assert error(tmp_path / "single", "train").startswith(f"{tmp_path / 'single'}: --split train: this dataset folder "
                                                          f"holds one Dataset, not splits")
    path = write_jsonl(tmp_path, "a.jsonl", alpaca())
    assert error(path, "train", "--validation_split").startswith(
        f"{path}: --validation_split train chooses a split, but only a dataset folder")
    datasets.DatasetDict({"train": table}).save_to_disk(str(tmp_path / "one"))
    assert load_data(str(tmp_path / "one"), AUTO).records[0][0] == f"{tmp_path / 'one' / 'train'}[0]"


# ---- what reads data: the preview, evaluation -------------------------------------------------------

@pytest.mark.parametrize("fmt", [OPENAI, SHAREGPT, ALPACA])
def test_the_preview_prints_the_sanity_check_of_each_format(real_tokenizer, tmp_path, fmt):
    case = "history" if fmt == ALPACA else "thought, tool call, result, answer"
    reference, written = CASES[case]
    path = write_jsonl(tmp_path, f"{fmt}.jsonl", written[fmt])
    lines = preview(real_tokenizer, path, AUTO, LengthLimits(max_seq_length=2048))
    expected = preview(real_tokenizer, write_jsonl(tmp_path, "ref.jsonl", reference), MULTI_TURN,
                       LengthLimits(max_seq_length=2048))
    assert lines[0] == "Sanity Check >>>>>>>>>>>>>" and lines[1] == "'[gMASK]':  64790 ->   -100"
    assert lines[:-2] == expected[:-2] and lines[-1] == expected[-1]
    assert lines[-2].startswith(f"{path}: 1 {fmt} records (recognised from the first record")
    assert lines[-2].endswith("read as multi-turn records")


def test_the_preview_command_reads_a_dataset_folder_split(real_tokenizer, tmp_path, capsys):
    """The split is read through the command's main in-process; the refusal without --split is seen from
    a real process (its exit code and stderr, as a shell sees them)."""
    import subprocess
    import sys

    import datasets

    import preprocess_utils
    from conftest import ROOT

    table = datasets.Dataset.from_list([alpaca(input="Bob"), alpaca()])
    datasets.DatasetDict({"train": table, "test": table}).save_to_disk(str(tmp_path / "d"))
    options = ["--tokenizer", real_tokenizer.vocab_file.rsplit("/", 1)[0], "--train_format", "auto",
               "--data", str(tmp_path / "d")]
    command = [sys.executable, str(ROOT / "preprocess_utils.py"), *options]
    capsys.readouterr()
    assert preprocess_utils.main(options + ["--split", "test"]) == 0
    lines = capsys.readouterr().out.splitlines()
    expected = encode_prompt_response(real_tokenizer, {"prompt": "Say hi\nBob", "response": "Hi"})
    assert len(lines) == len(expected.input_ids) + 4 and lines[1] == "'[gMASK]':  64790 ->   -100"
    assert lines[-2] == (f"{tmp_path / 'd' / 'test'}: 2 alpaca records (recognised from the first record), read as "
                         f"input-output records")
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == f"error: {tmp_path / 'd'}: the dataset has the splits train, test: choose one with --split"


def test_generation_eval_reads_openai_validation_data_like_conversations(tiny_tokenizer, tmp_path):
    reference, written = CASES["thought, tool call, result, answer"]
    path = write_jsonl(tmp_path, "dev.jsonl", written[OPENAI], written[OPENAI])
    data_args = SimpleNamespace(train_format=AUTO, max_source_length=64, validation_file=path, test_file=None,
                                max_eval_samples=1, max_predict_samples=None, validation_split=None,
                                test_split=None)
    training_args = SimpleNamespace(do_eval=True, do_predict=False)
    generation = GenerationEval.from_args(tiny_tokenizer, data_args, training_args)
    assert generation.train_format == data_args.resolved_format == MULTI_TURN
    expected = build_eval_items(tiny_tokenizer, [reference], MULTI_TURN)
    assert [(i.role, i.prompt_ids, i.reference, i.expected_call) for i in generation.items] == [
        (i.role, i.prompt_ids, i.reference, i.expected_call) for i in expected]


@pytest.mark.slow
def test_finetune_trains_on_a_dataset_folder_of_openai_records(tiny_model_dir, tmp_path, finetune_in_process):
    import datasets

    table = datasets.Dataset.from_list(OPENAI_RECORDS)
    datasets.DatasetDict({"train": table, "test": table.select([0])}).save_to_disk(str(tmp_path / "chats"))
    result = finetune_in_process(
        "--model_name_or_path", tiny_model_dir, "--train_format", "auto", "--train_file", str(tmp_path / "chats"),
        "--train_split", "train", "--validation_file", str(tmp_path / "chats"), "--validation_split", "test",
        "--do_train", "--do_eval", "--output_dir", str(tmp_path / "out"), "--use_cpu", "--report_to", "none",
        "--pre_seq_len", "2", "--max_steps", "1", "--save_strategy", "no", "--per_device_train_batch_size", "3",
        "--preprocessing_cache_dir", str(tmp_path / "cache"), "--full_sanity_check")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (f"{tmp_path / 'chats' / 'train'}: 3 openai records (recognised from the first record), read as "
            f"multi-turn records") in result.stdout
    assert f"{tmp_path / 'chats' / 'test'}: 1 openai records" in result.stdout
    expected = encode_multi_turn(load_tokenizer(tiny_model_dir), CASES["thought, tool call, result, answer"][0])
    sanity = result.stdout[result.stdout.index("Sanity Check >>>"):result.stdout.index("<<<<<<<<<<<<< Sanity Check")]
    assert len(sanity.splitlines()) == 1 + len(expected.input_ids)
    metrics = json.loads((tmp_path / "out" / "train_results.json").read_text())
    assert metrics["train_records"] == 3
    assert metrics["train_supervised_tokens"] == sum(
        sum(label != X for label in encode_multi_turn(load_tokenizer(tiny_model_dir), record).labels)
        for _, record in load_data(str(tmp_path / "chats"), AUTO, "train").records)
    assert "eval_loss" in json.loads((tmp_path / "out" / "eval_results.json").read_text())
