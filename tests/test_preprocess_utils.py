"""Token layouts, validation, truncation, batching and the preview CLI of preprocess_utils."""

import json
import subprocess
import sys

import pytest

from conftest import ROOT
from chatglm3_finetune.records import INPUT_OUTPUT, MULTI_TURN, DataError, read_records, validate_records
from chatglm3_finetune.collation import DataCollatorForChatGLM
from chatglm3_finetune.encoding import (
    LengthLimits, encode_multi_turn, encode_prompt_response, sanity_check_lines,
)
from chatglm3_finetune.chat_format import build_chat_input, conversation_messages
from preprocess_utils import preview
from chatglm3_finetune.training_data import tokenize_records

X = -100
GMASK, SOP, SYSTEM, USER, ASSISTANT, OBSERVATION, EOS = 64790, 64792, 64794, 64795, 64796, 64797, 2
NL = [30910, 13]  # "\n" on its own: the dummy prefix piece, then the newline byte

# SentencePiece ids of the texts used below (real ChatGLM3 tokenizer.model)
SYSTEM_TEXT = [809, 383, 260, 6483, 9319, 30930]  # You are a helpful assistant.
WEATHER_Q = [1266, 323, 267, 5100, 291, 5231, 30987]  # What is the weather in Paris?
NEED_TOOL = [307, 720, 289, 792, 267, 5100, 2583, 30930]  # I need to use the weather tool.
WEATHER_META = [5100, 13]  # weather\n
TOOL_CALL = [16014, 23720, 13, 22268, 30962, 10372, 30946, 17654, 6521, 6078, 276, 1589, 1561, 30980,
             30966, 30945, 13, 10846, 31040]  # ```python\ntool_call(city='Paris', days=3)\n```
TEMP_JSON = [15821, 18179, 2932, 30910, 30943, 30939, 30983]  # {"temp": 21}
SUNNY = [2239, 2563, 30932, 30910, 30943, 30939, 7134, 30930]  # Sunny, 21 degrees.


def test_system_user_assistant_layout(real_tokenizer):
    record = {"conversations": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": "I need to use the weather tool."},
    ]}
    encoded = encode_multi_turn(real_tokenizer, record)
    assert encoded.input_ids == [GMASK, SOP, SYSTEM, *NL, *SYSTEM_TEXT, USER, *NL, *WEATHER_Q,
                                 ASSISTANT, *NL, *NEED_TOOL, EOS]
    # <|assistant|> is never a target; everything after it is, through the final eos
    assert encoded.labels == [X] * 22 + [*NL, *NEED_TOOL, EOS]
    assert not encoded.truncated


def test_sanity_check_starts_like_the_seed_readme(real_tokenizer):
    record = {"tools": ["weather: get the weather of a city"], "conversations": [
        {"role": "user", "content": "Let me know the response details."},
        {"role": "assistant", "content": "I need to use the weather tool."},
    ]}
    encoded = encode_multi_turn(real_tokenizer, record)
    lines = sanity_check_lines(real_tokenizer, encoded.input_ids, encoded.labels)
    assert lines[:7] == [
        "Sanity Check >>>>>>>>>>>>>",
        "'[gMASK]':  64790 ->   -100",
        "'sop':  64792 ->   -100",
        "'<|system|>':  64794 ->   -100",
        "'':  30910 ->   -100",
        "'\\n':     13 ->   -100",
        "'Answer':  20115 ->   -100",
    ]
    start = lines.index("'<|assistant|>':  64796 ->   -100")
    assert lines[start - 5:start] == [
        "'know':    683 ->   -100", "'the':    267 ->   -100", "'response':   3010 ->   -100",
        "'details':   3296 ->   -100", "'.':  30930 ->   -100",
    ]
    assert lines[start + 1:start + 5] == [
        "'':  30910 ->  30910", "'\\n':     13 ->     13", "'I':    307 ->    307", "'need':    720 ->    720",
    ]
    assert lines[-2:] == ["'':      2 ->      2", "<<<<<<<<<<<<< Sanity Check"]


def test_tools_system_prompt_is_first_and_exact(real_tokenizer):
    import sentencepiece as spm

    tools = [{"name": "weather", "parameters": {"city": "string"}}, "天气"]
    record = {"tools": tools, "conversations": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    sp = spm.SentencePieceProcessor(model_file=real_tokenizer.vocab_file)
    tools_text = ("Answer the following questions as best as you can. You have access to the following tools:\n"
                  + json.dumps(tools, indent=4, ensure_ascii=False))
    expected_start = [GMASK, SOP, SYSTEM, *NL, *sp.encode(tools_text), SYSTEM, *NL, *SYSTEM_TEXT, USER]
    ids = encode_multi_turn(real_tokenizer, record).input_ids
    assert ids[:len(expected_start)] == expected_start


def test_tool_turn_layout_and_stop_targets(real_tokenizer):
    record = {"conversations": [
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": "I need to use the weather tool."},
        {"role": "tool", "name": "weather", "parameters": {"city": "Paris", "days": 3}, "observation": {"temp": 21}},
        {"role": "assistant", "content": "Sunny, 21 degrees."},
    ]}
    encoded = encode_multi_turn(real_tokenizer, record)
    assert encoded.input_ids == [
        GMASK, SOP, USER, *NL, *WEATHER_Q,
        ASSISTANT, *NL, *NEED_TOOL,
        ASSISTANT, *WEATHER_META, *TOOL_CALL,
        OBSERVATION, *NL, *TEMP_JSON,
        ASSISTANT, *NL, *SUNNY, EOS]
    assert encoded.labels == [
        X, X, X, X, X, *[X] * len(WEATHER_Q),
        X, *NL, *NEED_TOOL,
        ASSISTANT, *WEATHER_META, *TOOL_CALL,  # a supervised message before it makes <|assistant|> a target
        OBSERVATION, *[X] * (2 + len(TEMP_JSON)),  # the model learns to stop on <|observation|>
        X, *NL, *SUNNY, EOS]


def test_interpreter_turn_layout(real_tokenizer):
    record = {"conversations": [
        {"role": "user", "content": "Compute 1+2"},
        {"role": "interpreter", "content": "print(1 + 2)", "observation": "3"},
        {"role": "assistant", "content": "The answer is 3."},
    ]}
    compute = [2095, 1146, 30910, 30939, 31011, 30943]
    interpreter_meta = [17884, 363, 13]  # interpreter\n
    code = [16014, 23720, 13, 4466, 30946, 30939, 1270, 30910, 30943, 30945, 13, 10846, 31040]
    three = [30910, 30966]
    answer = [353, 3238, 323, 30910, 30966, 30930]
    encoded = encode_multi_turn(real_tokenizer, record)
    assert encoded.input_ids == [GMASK, SOP, USER, *NL, *compute, ASSISTANT, *interpreter_meta, *code,
                                 OBSERVATION, *NL, *three, ASSISTANT, *NL, *answer, EOS]
    assert encoded.labels == [X] * 12 + [*interpreter_meta, *code, OBSERVATION, X, X, X, X, X,
                                         *NL, *answer, EOS]


def test_assistant_turn_with_loss_false(real_tokenizer):
    record = {"conversations": [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello", "loss": False},
        {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "You are welcome."}]}
    encoded = encode_multi_turn(real_tokenizer, record)
    assert encoded.input_ids == [GMASK, SOP, USER, *NL, 8686, ASSISTANT, *NL, 13755, USER, *NL, 1690, 30911,
                                 ASSISTANT, *NL, 809, 383, 5707, 30930, EOS]
    # the unsupervised answer teaches nothing, not even the <|user|> that follows it
    assert encoded.labels == [X] * 16 + [*NL, 809, 383, 5707, 30930, EOS]


def test_user_turn_is_never_supervised_even_with_loss_true(real_tokenizer):
    record = {"conversations": [{"role": "user", "content": "Hi", "loss": True},
                                {"role": "assistant", "content": "Hello"}]}
    assert encode_multi_turn(real_tokenizer, record).labels == [X] * 7 + [*NL, 13755, EOS]


def test_prompt_response_layout_with_both_caps(real_tokenizer):
    record = {"prompt": "What is the weather in Paris?", "response": "Sunny, 21 degrees."}
    full = encode_prompt_response(real_tokenizer, record)
    assert full.input_ids == [GMASK, SOP, *WEATHER_Q, *SUNNY, EOS]
    assert full.labels == [X] * 9 + [*SUNNY, EOS]
    capped = encode_prompt_response(real_tokenizer, record, max_source_length=5, max_target_length=4)
    assert capped.input_ids == [GMASK, SOP, 1266, 323, 267, 2239, 2563, 30932, 30910, EOS]
    assert capped.labels == [X] * 5 + [2239, 2563, 30932, 30910, EOS]
    assert capped.truncated and capped.lost_targets
    source_only = encode_prompt_response(real_tokenizer, record, max_source_length=5, max_target_length=128)
    assert source_only.truncated and not source_only.lost_targets


def test_truncation_is_counted_and_flags_the_lost_stop(real_tokenizer):
    record = {"conversations": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    full = encode_multi_turn(real_tokenizer, record)
    only_eos_cut = encode_multi_turn(real_tokenizer, record, max_seq_length=len(full.input_ids) - 1)
    assert only_eos_cut.input_ids == full.input_ids[:-1]
    assert only_eos_cut.truncated and only_eos_cut.lost_targets and only_eos_cut.lost_stop
    prompt_cut = encode_multi_turn(real_tokenizer, {"conversations": [
        {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "What is the weather in Paris?"}]},
        max_seq_length=8)
    assert prompt_cut.truncated and not prompt_cut.lost_targets and not prompt_cut.lost_stop


def test_chinese_round_trips(real_tokenizer):
    text = "你好，世界和平！这款连衣裙显瘦。\n第二行 with English 😀"
    assert real_tokenizer.encode_text("你好") == [36474, 54591]
    assert real_tokenizer.decode(real_tokenizer.encode_text(text)) == text


def test_layout_rules_on_a_tiny_tokenizer(tiny_tokenizer):
    """The same layout on a tokenizer trained in the test run: special tokens follow its pieces."""
    tok = tiny_tokenizer
    n = tok.num_pieces
    assert [tok.get_command(t) for t in ("[gMASK]", "sop", "<|system|>", "<|observation|>")] == [n + 1, n + 3, n + 5, n + 8]
    nl = tok.encode_text("\n")
    record = {"conversations": [
        {"role": "user", "content": "Hi"},
        {"role": "tool", "name": "weather", "parameters": {"city": "Paris"}, "observation": "sunny"},
        {"role": "assistant", "content": "It is sunny."}]}
    encoded = encode_multi_turn(tok, record)
    call = tok.encode_text("```python\ntool_call(city='Paris')\n```")
    expected = ([n + 1, n + 3, n + 6, *nl, *tok.encode_text("Hi"), n + 7, *tok.encode_text("weather\n"), *call,
                 n + 8, *nl, *tok.encode_text("sunny"), n + 7, *nl, *tok.encode_text("It is sunny."), 2])
    assert encoded.input_ids == expected
    user_len = 3 + len(nl) + len(tok.encode_text("Hi"))
    call_len = len(tok.encode_text("weather\n")) + len(call)
    obs_len = len(nl) + len(tok.encode_text("sunny"))
    assert encoded.labels == ([X] * (user_len + 1) + expected[user_len + 1:user_len + 1 + call_len]
                              + [n + 8] + [X] * (obs_len + 1) + expected[-(len(nl) + len(tok.encode_text("It is sunny.")) + 1):])
    text = "你好，世界 people\n  x"
    assert tok.decode(tok.encode_text(text)) == text


def test_chat_input_for_generation_ends_with_assistant(real_tokenizer):
    messages = conversation_messages({"conversations": [{"role": "user", "content": "Hi"},
                                                        {"role": "assistant", "content": "Hello"}]})[:1]
    assert build_chat_input(real_tokenizer, messages) == [GMASK, SOP, USER, *NL, 8686, ASSISTANT]


# --- validation ---------------------------------------------------------------------------------

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


def test_unknown_train_format(tmp_path):
    with pytest.raises(DataError, match="train_format 'chat' is not one of multi-turn, input-output"):
        validate_records(read_records(write(tmp_path, "d.jsonl", jsonl(GOOD))), "chat")


# --- datasets, truncation policy, batching ----------------------------------------------------

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
    from chatglm3_finetune import training_data

    records = [("d:1", GOOD), ("d:2", GOOD)]
    tokenize_records(tiny_tokenizer, records, MULTI_TURN, LengthLimits(), cache_dir=str(tmp_path))
    calls = []
    original = training_data.encode_record
    monkeypatch.setattr(training_data, "encode_record", lambda *a: calls.append(1) or original(*a))
    tokenize_records(tiny_tokenizer, records, MULTI_TURN, LengthLimits(), cache_dir=str(tmp_path))
    assert calls == []
    tokenize_records(tiny_tokenizer, records, MULTI_TURN, LengthLimits(), cache_dir=str(tmp_path), overwrite_cache=True)
    assert len(calls) == 2


def test_collator_pads_to_longest_or_to_max_length():
    features = [{"input_ids": [5, 6, 7], "labels": [X, 6, 7]}, {"input_ids": [8], "labels": [X]}]
    batch = DataCollatorForChatGLM()(features)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[X, 6, 7], [X, X, X]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert DataCollatorForChatGLM(pad_to_multiple_of=8)(features)["input_ids"].shape == (2, 8)
    assert DataCollatorForChatGLM(max_length=16)(features)["labels"].shape == (2, 16)


def test_works_with_transformers_data_collators(tiny_tokenizer):
    from transformers import DataCollatorForSeq2Seq

    features = [{"input_ids": [5, 6, 7], "labels": [X, 6, 7]}, {"input_ids": [8], "labels": [X]}]
    tiny_tokenizer.padding_side = "right"
    batch = DataCollatorForSeq2Seq(tiny_tokenizer, padding=True)(features)
    tiny_tokenizer.padding_side = "left"
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[X, 6, 7], [X, X, X]]


# --- the preview command -----------------------------------------------------------------------

def test_preview_command_prints_layout_and_summary(tmp_path, real_tokenizer):
    record = {"tools": ["weather"], "conversations": [
        {"role": "user", "content": "Let me know the response details."},
        {"role": "assistant", "content": "I need to use the weather tool."}]}
    path = write(tmp_path, "tool.jsonl", jsonl(GOOD, record))
    result = subprocess.run(
        [sys.executable, str(ROOT / "preprocess_utils.py"), "--tokenizer", real_tokenizer.vocab_file.rsplit("/", 1)[0],
         "--train_format", "multi-turn", "--data", path, "--index", "1", "--max_seq_length", "2048"],
        capture_output=True, text=True, check=True)
    lines = result.stdout.splitlines()
    assert lines[:4] == ["Sanity Check >>>>>>>>>>>>>", "'[gMASK]':  64790 ->   -100", "'sop':  64792 ->   -100",
                         "'<|system|>':  64794 ->   -100"]
    assert "'I':    307 ->    307" in lines
    total = sum(len(encode_multi_turn(real_tokenizer, r).input_ids) for r in (GOOD, record))
    assert lines[-1].startswith(f"2 records, {total} tokens, ")
    assert lines[-1].endswith("0 truncated records (0 lost supervised targets, 0 lost the final stop target)")


def test_preview_command_reports_data_errors_without_traceback(tmp_path, tiny_model_dir):
    path = write(tmp_path, "bad.jsonl", jsonl(GOOD, conv(U, {"role": "sytem", "content": "x"})))
    result = subprocess.run([sys.executable, str(ROOT / "preprocess_utils.py"), "--tokenizer", tiny_model_dir,
                             "--train_format", "multi-turn", "--data", path], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip() == (f"error: {path}:2: conversations[1].role: 'sytem' is not one of system, "
                                     "user, assistant, tool, interpreter, observation")


def test_preview_function_rejects_bad_index(tmp_path, tiny_tokenizer):
    path = write(tmp_path, "d.jsonl", jsonl(GOOD))
    with pytest.raises(DataError, match="--index 3 is out of range"):
        preview(tiny_tokenizer, path, MULTI_TURN, LengthLimits(), index=3)


def test_records_left_without_targets_are_left_out_and_counted(tiny_tokenizer):
    long_prompt = {"conversations": [{"role": "user", "content": "word " * 60}, A]}
    records = [("d:1", GOOD), ("d:2", long_prompt)]
    dataset, report = tokenize_records(tiny_tokenizer, records, MULTI_TURN, LengthLimits(max_seq_length=20))
    assert len(dataset) == 1 and report.no_targets_left == 1 and report.kept == 1
    assert "1 left out because no supervised target was left" in report.summary()


@pytest.mark.parametrize("flags,message", [
    (["--max_seq_length", "-5"], "--max_seq_length must be at least 3 tokens, got -5"),
    (["--max_seq_length", "0"], "--max_seq_length must be at least 3 tokens, got 0"),
    (["--max_source_length", "2"], "--max_source_length must be at least 3 tokens, got 2"),
    (["--max_target_length", "0"], "--max_target_length must be at least 1 tokens, got 0"),
])
def test_preview_rejects_caps_finetune_rejects(tmp_path, tiny_model_dir, capsys, flags, message):
    import preprocess_utils

    path = write(tmp_path, "d.jsonl", jsonl(GOOD))
    with pytest.raises(SystemExit) as exit_info:
        preprocess_utils.main(["--tokenizer", tiny_model_dir, "--train_format", "multi-turn", "--data", path, *flags])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().endswith(f"error: {message}")


def test_preview_names_its_own_tokenizer_flag(tmp_path, capsys):
    import preprocess_utils

    path = write(tmp_path, "d.jsonl", jsonl(GOOD))
    assert preprocess_utils.main(["--tokenizer", str(tmp_path / "none"), "--train_format", "multi-turn",
                                  "--data", path]) == 2
    assert capsys.readouterr().err.strip() == f"error: --tokenizer: {tmp_path / 'none'}: missing (no such folder)"
    assert preprocess_utils.main(["--tokenizer", str(tmp_path), "--train_format", "multi-turn", "--data", path]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --tokenizer: no tokenizer.model in {tmp_path}") and "tokenizer_name" not in err


def test_preview_warns_about_what_the_caps_cut(tmp_path, tiny_model_dir, capsys):
    import preprocess_utils

    long_prompt = {"conversations": [{"role": "user", "content": "word " * 60}, A]}
    path = write(tmp_path, "d.jsonl", jsonl(GOOD, long_prompt))
    assert preprocess_utils.main(["--tokenizer", tiny_model_dir, "--train_format", "multi-turn", "--data", path,
                                  "--max_seq_length", "20"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-2].startswith("warning: 1 of 2 records were cut by --max_seq_length 20")
    assert lines[-1].startswith("warning: 1 of 2 records left out because the cut removed every supervised target")


def test_sanity_check_of_a_long_record_shows_its_start_and_end(tiny_tokenizer):
    from chatglm3_finetune.encoding import SANITY_CHECK_HEAD, SANITY_CHECK_TAIL

    encoded = encode_multi_turn(tiny_tokenizer, conv(U, {"role": "assistant", "content": "word " * 400}))
    total = len(encoded.input_ids)
    full = sanity_check_lines(tiny_tokenizer, encoded.input_ids, encoded.labels, full=True)
    assert len(full) == total + 2
    short = sanity_check_lines(tiny_tokenizer, encoded.input_ids, encoded.labels)
    hidden = total - SANITY_CHECK_HEAD - SANITY_CHECK_TAIL
    assert short == (full[:SANITY_CHECK_HEAD + 1]
                     + [f"... {hidden} tokens not shown (--full_sanity_check shows every token) ..."]
                     + full[-SANITY_CHECK_TAIL - 1:])
    few = encode_multi_turn(tiny_tokenizer, GOOD)
    assert len(sanity_check_lines(tiny_tokenizer, few.input_ids, few.labels)) == len(few.input_ids) + 2
