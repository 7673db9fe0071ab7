"""chat_engine.py and inference.py on tiny trained checkpoints: batched and streamed generation,
the chat loop through stdin (tools, interpreter, clear), one prompt, files with metrics, errors;
replies of several assistant messages (a thought, then a tool call) through a scripted model."""

import contextlib
import io
import json

import pytest
import torch
from transformers import GlmForCausalLM

import inference
from chatglm3_finetune.serve.chat_engine import ChatModel, MetadataSplitter, load_chat_model
from chatglm3_finetune.format.chat_parsing import ToolCall
from chatglm3_finetune.format.chat_format import render_tool_call
from chatglm3_finetune.format.tokenizer import load_tokenizer
from conftest import shared_path
from chatglm3_finetune.evaluate.evaluation import build_eval_items, evaluation_stop_token_ids
from chatglm3_finetune.evaluate.metrics import generation_metrics
from chatglm3_finetune.model.ptuning.prefix_model import PrefixTuningModel
from chatglm3_finetune.data.collation import DataCollatorForChatGLM
from chatglm3_finetune.format.chat_format import Message
from chatglm3_finetune.data.encoding import encode_multi_turn, encode_prompt_response

TOOLS = [{"name": "get_weather", "description": "Get the weather of a city", "parameters": {"city": "string"}}]
WEATHER = {"tools": TOOLS, "conversations": [
    {"role": "user", "content": "What is the weather in Paris?"},
    {"role": "tool", "name": "get_weather", "parameters": {"city": "Paris"}, "observation": {"temperature": 21}},
    {"role": "assistant", "content": "It is 21 degrees in Paris."},
]}
SUM = {"conversations": [
    {"role": "user", "content": "Add 2 and 3"},
    {"role": "interpreter", "content": "print(2 + 3)", "observation": "5"},
    {"role": "assistant", "content": "The sum is 5."},
]}
GREETING = {"conversations": [{"role": "user", "content": "Hello"},
                              {"role": "assistant", "content": "Hello! How can I help you today?"}]}
PROMPTS = [{"prompt": "The quick brown fox", "response": "jumps over the lazy dog."},
           {"prompt": "Thank you, that was helpful.", "response": "Goodbye."},
           {"prompt": "Here is the final answer", "response": "The user wants to know the details."}]
GEN = {"max_new_tokens": 24}


@contextlib.contextmanager
def one_thread():
    """Tiny models run fastest on one thread (the build machine's two cores are shared)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_thread():
        yield


def train(model, sequences, steps: int, lr: float):
    """A few full-batch AdamW steps on encoded records (what finetune.py does, minus the Trainer)."""
    batch = DataCollatorForChatGLM()([{"input_ids": s.input_ids, "labels": s.labels} for s in sequences])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval(), loss.item()


@pytest.fixture(scope="session")
def full_checkpoint(tiny_model_dir, tmp_path_factory):
    """A fully fine-tuned tiny model that learned the weather tool call, the interpreter turn and a
    greeting; saved WITHOUT a tokenizer (the reference's `--tokenizer BASE --model FULL`)."""
    tokenizer = load_tokenizer(tiny_model_dir)
    torch.manual_seed(0)
    model = GlmForCausalLM.from_pretrained(tiny_model_dir)
    records = [WEATHER, SUM, GREETING]
    with one_thread():
        _, loss = train(model, [encode_multi_turn(tokenizer, r) for r in records], steps=80, lr=3e-3)
    assert loss < 0.05, f"the tiny model did not learn its records (loss {loss})"
    out = tmp_path_factory.mktemp("full")
    model.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="session")
def trained_prefix(tiny_model_dir, tmp_path_factory):
    """A P-Tuning v2 prefix (4 positions) trained on prompt/response records, saved (prefix files
    only); returns (folder, the in-memory model). A prefix cannot make a random tiny base memorize
    much, but it changes what it generates."""
    tokenizer = load_tokenizer(tiny_model_dir)
    torch.manual_seed(0)
    model = PrefixTuningModel(GlmForCausalLM.from_pretrained(tiny_model_dir), pre_seq_len=4, prefix_dropout=0.0,
                              base_model_name_or_path=tiny_model_dir)
    with one_thread():
        train(model, [encode_prompt_response(tokenizer, r) for r in PROMPTS], steps=10, lr=5e-2)
    out = tmp_path_factory.mktemp("pt")
    model.save_pretrained(str(out))
    return str(out), model


@pytest.fixture(scope="session")
def pt_checkpoint(trained_prefix):
    return trained_prefix[0]


@pytest.fixture(scope="session")
def pt_chat(tiny_model_dir, pt_checkpoint):
    return load_chat_model(tiny_model_dir, pt_checkpoint=pt_checkpoint, device="cpu")


@pytest.fixture(scope="session")
def full_chat(tiny_model_dir, full_checkpoint):
    return load_chat_model(full_checkpoint, tokenizer=tiny_model_dir, device="cpu")


def user(text: str) -> Message:
    return Message("user", "", text, False)


def tools_message() -> Message:
    return inference.system_messages(None, TOOLS)[0]


def shown(reply) -> str:
    """What `inference.py --prompt` prints for a ChatReply."""
    return "\n".join(inference.reply_text(segment) for segment in reply.segments)


# ---- the engine ---------------------------------------------------------------------------------

def prompt_batch(chat):
    items = build_eval_items(chat.tokenizer, PROMPTS, "input-output")
    return [item.prompt_ids for item in items] + [chat.chat_input_ids([user("Hello")])]


@pytest.mark.parametrize("which", ["pt_chat", "full_chat"])
def test_a_left_padded_batch_generates_what_each_prompt_generates_alone(which, request):
    chat = request.getfixturevalue(which)
    prompts = prompt_batch(chat)
    assert len({len(p) for p in prompts}) >= 3  # really padded
    batched = chat.generate(prompts, **GEN)
    alone = [chat.generate([p], **GEN)[0] for p in prompts]
    assert batched == alone
    assert all(stop not in row for row in batched for stop in chat.stop_token_ids)


def test_the_loaded_prefix_is_the_trained_one_and_is_used(pt_chat, trained_prefix, tiny_model_dir):
    prompts = prompt_batch(pt_chat)
    loaded = pt_chat.generate(prompts, **GEN)
    assert loaded == ChatModel(trained_prefix[1], pt_chat.tokenizer).generate(prompts, **GEN)
    base = ChatModel(GlmForCausalLM.from_pretrained(tiny_model_dir), pt_chat.tokenizer)
    assert sum(a != b for a, b in zip(loaded, base.generate(prompts, **GEN))) >= 3


def test_stream_pieces_join_to_the_generated_text_and_closing_stops_it(full_chat):
    prompt = full_chat.chat_input_ids([user("Hello")])
    completion = full_chat.generate_completions([prompt], **GEN)[0]
    stream = full_chat.stream(prompt, **GEN)
    pieces = list(stream)
    assert len(pieces) > 1 and "".join(pieces) == completion.text == stream.text
    assert stream.token_ids == completion.token_ids and stream.finish_reason == "stop"

    with full_chat.stream(prompt, max_new_tokens=500, min_new_tokens=500) as early:
        first = next(early)
    # closing stopped the generation thread after a few tokens of the 500 it was asked for
    assert first and early.finish_reason is None and len(early.token_ids) < 50


def test_stop_strings_and_length_limits(full_chat):
    prompt = full_chat.chat_input_ids([user("Hello")])
    text = full_chat.generate_completions([prompt], **GEN)[0].text
    assert "How can" in text
    cut = full_chat.generate_completions([prompt], stop_strings=["How can"], **GEN)[0]
    assert cut.text == text[:text.index("How can")] and cut.finish_reason == "stop"
    assert "How can" in full_chat.decode(cut.token_ids)
    streamed = full_chat.stream(prompt, stop_strings=["How can"], **GEN)
    assert "".join(streamed) == cut.text
    short = full_chat.generate_completions([prompt], max_new_tokens=3)[0]
    assert len(short.token_ids) == 3 and short.finish_reason == "length"
    fixed = full_chat.generate([prompt], max_new_tokens=30, min_new_tokens=30)[0]
    assert len(fixed) == 30


def test_reply_parses_the_learned_tool_call_and_interpreter_code(full_chat):
    call = full_chat.reply([tools_message(), user("What is the weather in Paris?")], **GEN)
    assert call.tool_call is not None and (call.tool_call.name, call.tool_call.parameters) == ("get_weather",
                                                                                              {"city": "Paris"})
    assert len(call.segments) == 1 and call.finish_reason == "stop"
    code = full_chat.reply([user("Add 2 and 3")], **GEN)
    assert code.last.metadata == "interpreter" and code.code == "print(2 + 3)"


def test_metadata_splitter_streams_only_the_content():
    splitter = MetadataSplitter()
    shown = [splitter.feed(p) for p in ["", "\n", " Hel", "lo"]]
    assert splitter.metadata == "" and "".join(shown) == "Hello"
    call = MetadataSplitter()
    assert call.feed("get_wea") == "" and call.metadata is None
    call.feed("ther\n```python")
    assert call.metadata == "get_weather"
    unfinished = MetadataSplitter()
    assert unfinished.feed("no line break") == "" and unfinished.finish() == "no line break"


# ---- the chat loop ------------------------------------------------------------------------------

def run_cli(monkeypatch, capsys, argv, stdin=""):
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    code = inference.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_chat_loop_through_stdin_with_a_learned_tool_call_and_clear(monkeypatch, capsys, tmp_path, tiny_model_dir,
                                                               full_checkpoint):
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps(TOOLS))
    stdin = "\n".join(["What is the weather in Paris?", '{"temperature": 21}', "clear",
                       "What is the weather in Paris?", '{"temperature": 21}', "exit"]) + "\n"
    code, out, err = run_cli(monkeypatch, capsys, ["--tokenizer", tiny_model_dir, "--model", full_checkpoint,
                                                   "--tools", str(tools), "--max-new-tokens", "24"], stdin)
    assert code == 0, err
    assert out.count('[tool call] get_weather {"city": "Paris"}') == 2
    assert out.count("Observation: Assistant: It is 21 degrees in Paris.") == 2  # the answer after the observation
    assert out.count("(conversation cleared)") == 1 and out.rstrip().endswith("User:")


class ScriptedModel:
    """Stands in for the network behind ChatModel: each `generate` call records its prompts and
    writes the next scripted reply (token ids) for every row, stopping at `eos_token_id` and
    `max_new_tokens` and feeding the streamer as transformers' generate does."""

    def __init__(self, replies: list[list[int]]):
        self.replies, self.prompts = list(replies), []
        self.device = torch.device("cpu")

    def eval(self):
        return self

    def generate(self, input_ids, attention_mask, streamer=None, max_new_tokens=20, eos_token_id=(), pad_token_id=0,
                 **kwargs):
        rows = []
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist()):
            self.prompts.append([token for token, kept in zip(ids, mask) if kept])
            new = []
            for token in self.replies.pop(0)[:max_new_tokens]:
                new.append(token)
                if token in eos_token_id:
                    break
            rows.append(new)
        if streamer is not None:
            streamer.put(input_ids)
            for token in rows[0]:
                streamer.put(torch.tensor([token]))
            streamer.end()
        width = max(len(row) for row in rows)
        padded = torch.tensor([row + [pad_token_id] * (width - len(row)) for row in rows], dtype=torch.long)
        return torch.cat([input_ids, padded], dim=1)


def reply_ids(tokenizer, *messages: tuple[str, str], stop: str = "<|user|>") -> list[int]:
    """Generated ids: (metadata, text) messages joined by `<|assistant|>`, then the stop token."""
    ids = []
    for i, (metadata, text) in enumerate(messages):
        if i:
            ids.append(tokenizer.role_token_id("assistant"))
        ids += tokenizer.encode_text(metadata + "\n") + tokenizer.encode_text(text)
    return ids + [tokenizer.get_command(stop)]


THOUGHT = "I need the weather in Paris."
CALL_TEXT = render_tool_call("getCurrentWeather", {"city": "Paris"})
ALPACA_TOOLS = [{"name": "getCurrentWeather", "description": "Weather of a city", "parameters": {"city": "string"}}]
ALPACA = {"tools": ALPACA_TOOLS, "conversations": [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": THOUGHT},
    {"role": "tool", "name": "getCurrentWeather", "parameters": {"city": "Paris"}, "observation": {"temp_c": 18}},
    {"role": "assistant", "content": "It is 18 degrees in Paris."},
]}


def thought_then_call(tokenizer) -> list[int]:
    """A ToolAlpaca-trained model's reply: the thought, `<|assistant|>`, the call, `<|observation|>`."""
    return reply_ids(tokenizer, ("", THOUGHT), ("getCurrentWeather", CALL_TEXT), stop="<|observation|>")


def test_reply_with_a_thought_then_a_call_gives_both_messages_parsed(tiny_tokenizer):
    generated = reply_ids(tiny_tokenizer, ("", "Let me think."), ("name", "```python\ntool_call(a=1)\n```"),
                          stop="<|observation|>")
    chat = ChatModel(ScriptedModel([generated]), tiny_tokenizer)
    reply = chat.reply([user("Go")])
    assert [(s.metadata, s.content, s.error) for s in reply.segments[:1]] == [("", "Let me think.", None)]
    assert reply.tool_call == ToolCall("name", {"a": 1}) and reply.last.error is None
    assert reply.finish_reason == "stop"


def test_split_reply_cuts_the_text_where_assistant_tokens_stand(tiny_tokenizer):
    chat = ChatModel(ScriptedModel([]), tiny_tokenizer)
    ids = thought_then_call(tiny_tokenizer)[:-1]
    at = ids.index(chat.assistant_id)
    thought, call = chat.decode(ids[:at]), chat.decode(ids[at + 1:])
    text = chat.decode(ids)
    assert text == thought + call and THOUGHT in thought and call.startswith("getCurrentWeather\n")
    assert chat.reply_segments(ids, text) == [thought, call]
    assert chat.reply_segments(ids, text[:len(thought)]) == [thought, ""]  # the second message has begun
    assert chat.reply_segments(ids, text[:len(thought) - 1]) == [thought[:-1]]  # not reached yet
    assert chat.reply_segments(ids[:at], thought) == [thought]


def test_chat_loop_shows_the_thought_and_the_call_and_keeps_both_messages(tiny_tokenizer):
    tok = tiny_tokenizer
    model = ScriptedModel([thought_then_call(tok), reply_ids(tok, ("", "It is 18 degrees in Paris."))])
    chat = ChatModel(model, tok)
    out = io.StringIO()
    start = inference.system_messages(None, ALPACA_TOOLS)
    inference.chat_loop(chat, start, {}, io.StringIO('Weather in Paris?\n{"temp_c": 18}\nexit\n'), out)
    shown_text = out.getvalue()
    assert (f'Assistant: {THOUGHT}\n[tool call] getCurrentWeather {{"city": "Paris"}}\nObservation: '
            f'Assistant: It is 18 degrees in Paris.\n') in shown_text
    assert "could not read" not in shown_text
    # the second prompt is the training sequence up to the final answer's <|assistant|>
    training = encode_multi_turn(tok, ALPACA).input_ids
    last_assistant = len(training) - 1 - training[::-1].index(chat.assistant_id)
    assert model.prompts[1] == training[:last_assistant + 1]
    specials = [tok.token_text(t) for t in model.prompts[1] if t >= tok.num_pieces]
    assert specials == ["[gMASK]", "sop", "<|system|>", "<|user|>", "<|assistant|>", "<|assistant|>",
                        "<|observation|>", "<|assistant|>"]


def test_prompt_mode_shows_every_message_of_the_reply(tiny_tokenizer, capsys):
    chat = ChatModel(ScriptedModel([thought_then_call(tiny_tokenizer)]), tiny_tokenizer)
    inference.answer_prompt(chat, [], "Weather in Paris?", {})
    assert capsys.readouterr().out == f'{THOUGHT}\n[tool call] getCurrentWeather {{"city": "Paris"}}\n'


def test_chat_loop_keeps_the_history_exactly_as_training_renders_it(tiny_tokenizer):
    tok = tiny_tokenizer
    model = ScriptedModel([
        reply_ids(tok, ("interpreter", "```python\nprint(1 + 2)\n```"), stop="<|observation|>"),
        reply_ids(tok, ("", "Three.")),
        reply_ids(tok, ("get_weather", "```python\ntool_call(city=Paris)\n```")),  # malformed: shown, kept as text
    ])
    chat = ChatModel(model, tok)
    out = io.StringIO()
    start = [Message("system", "", "Be brief.", False)]
    inference.chat_loop(chat, start, {}, io.StringIO("Add 1 and 2\n3\nAgain\n"), out)
    shown_text = out.getvalue()
    assert "[code interpreter]\nprint(1 + 2)" in shown_text and "Interpreter output: " in shown_text
    assert "Assistant: Three." in shown_text
    assert "tool_call(city=Paris)" in shown_text and "[could not read the call:" in shown_text
    expected_history = start + [
        user("Add 1 and 2"),
        Message("assistant", "interpreter", "```python\nprint(1 + 2)\n```", True),
        Message("observation", "", "3", False),
        Message("assistant", "", "Three.", True),
        user("Again"),
    ]
    assert model.prompts[2] == chat.chat_input_ids(expected_history)


def test_file_mode_scores_only_the_first_message_of_each_turn(tiny_tokenizer, tmp_path):
    """Every item gets `thought <|assistant|> call`: generation stops at `<|assistant|>`, so each
    item's prediction is the thought alone (the call is the next item's job)."""
    model = ScriptedModel([thought_then_call(tiny_tokenizer)] * 3)
    chat = ChatModel(model, tiny_tokenizer)
    output = tmp_path / "alpaca.jsonl"
    metrics = inference.evaluate_file(chat, "multi-turn", [ALPACA], str(output), 8, 1024, {"max_new_tokens": 64})
    [row] = [json.loads(line) for line in output.read_text().splitlines()]
    thought = chat.decode(tiny_tokenizer.encode_text("\n") + tiny_tokenizer.encode_text(THOUGHT))
    assert [(p["turn"], p["text"], p["content"], p["error"]) for p in row["prediction"]] == [
        (turn, thought, THOUGHT, None) for turn in (1, 2, 3)]
    assert metrics["num_plain_turns"] == 2 and metrics["num_expected_calls"] == 1
    assert metrics["tool_name_accuracy"] == 0.0  # the tool turn answered with the thought


# ---- one prompt and the reference's invocation styles --------------------------------------------

def test_prompt_mode_with_tools_and_both_reference_styles(monkeypatch, capsys, tmp_path, tiny_model_dir,
                                                          full_checkpoint, pt_checkpoint, pt_chat):
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps(TOOLS))
    code, out, _ = run_cli(monkeypatch, capsys, ["--tokenizer", tiny_model_dir, "--model", full_checkpoint,
                                                 "--tools", str(tools), "--prompt", "What is the weather in Paris?"])
    assert code == 0 and out.strip() == '[tool call] get_weather {"city": "Paris"}'

    code, out, _ = run_cli(monkeypatch, capsys, ["--pt-checkpoint", pt_checkpoint, "--model", tiny_model_dir,
                                                 "--prompt", "Hello", "--max-new-tokens", "24"])
    assert code == 0
    assert out.strip() == shown(pt_chat.reply([user("Hello")], **GEN))
    # the prefix folder names its base model
    for argv in (["--model", pt_checkpoint], ["--pt-checkpoint", pt_checkpoint]):
        code, again, _ = run_cli(monkeypatch, capsys, argv + ["--prompt", "Hello", "--max-new-tokens", "24"])
        assert code == 0 and again == out


# ---- files --------------------------------------------------------------------------------------

def test_file_mode_prompt_response_predictions_and_metrics(monkeypatch, capsys, tmp_path, tiny_model_dir,
                                                           pt_checkpoint, pt_chat):
    data = tmp_path / "test.json"
    data.write_text(json.dumps([dict(r, id=i) for i, r in enumerate(PROMPTS)]))
    output = tmp_path / "out" / "predictions.jsonl"
    code, out, _ = run_cli(monkeypatch, capsys, ["--model", tiny_model_dir, "--pt-checkpoint", pt_checkpoint,
                                                 "--input", str(data), "--output", str(output), "--batch-size", "2",
                                                 "--max-new-tokens", "24"])
    assert code == 0
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert [{k: v for k, v in r.items() if k != "prediction"} for r in rows] == [dict(r, id=i)
                                                                                for i, r in enumerate(PROMPTS)]
    # batches of 2 (sorted by length) give what each prompt gives alone
    stops = evaluation_stop_token_ids(pt_chat.tokenizer)
    alone = [pt_chat.decode(pt_chat.generate([p], stop_token_ids=stops, **GEN)[0]) for p in prompt_batch(pt_chat)[:3]]
    assert [r["prediction"] for r in rows] == alone
    metrics = json.loads((tmp_path / "out" / "predictions.jsonl.metrics.json").read_text())
    assert metrics == {**generation_metrics(alone, [r["response"] for r in PROMPTS]), "num_predictions": 3}
    assert set(metrics) == {"rouge-1", "rouge-2", "rouge-l", "bleu-4", "num_predictions"}
    assert json.loads(out[:out.index("}") + 1]) == metrics


def test_file_mode_prompt_cap_matches_training(monkeypatch, capsys, tmp_path, tiny_model_dir, pt_checkpoint,
                                               pt_chat):
    data = tmp_path / "test.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in PROMPTS))
    output = tmp_path / "capped.jsonl"
    assert run_cli(monkeypatch, capsys, ["--model", tiny_model_dir, "--pt-checkpoint", pt_checkpoint, "--input",
                                         str(data), "--output", str(output), "--max-source-length", "4",
                                         "--max-new-tokens", "24"])[0] == 0
    capped = [item.prompt_ids for item in build_eval_items(pt_chat.tokenizer, PROMPTS, "input-output", 4)]
    assert {len(p) for p in capped} == {4}
    stops = evaluation_stop_token_ids(pt_chat.tokenizer)
    expected = [pt_chat.decode(ids) for ids in pt_chat.generate(capped, stop_token_ids=stops, **GEN)]
    assert [json.loads(line)["prediction"] for line in output.read_text().splitlines()] == expected


def score_file(monkeypatch, capsys, tmp_path, tiny_model_dir, full_checkpoint, records, name):
    """Runs `inference.py --input` on records with the fully fine-tuned model: (rows, metrics, stderr)."""
    data = tmp_path / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    output = tmp_path / f"{name}.pred.jsonl"
    code, _, err = run_cli(monkeypatch, capsys, ["--tokenizer", tiny_model_dir, "--model", full_checkpoint,
                                                 "--input", str(data), "--output", str(output)])
    assert code == 0, err
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    return rows, json.loads(output.with_name(f"{name}.pred.jsonl.metrics.json").read_text()), err


def assert_weather_and_greeting_scored(rows, metrics):
    weather = rows[0]["prediction"]
    assert [p["turn"] for p in weather] == [1, 2] and [p["role"] for p in weather] == ["tool", "assistant"]
    assert weather[0]["tool_call"] == {"name": "get_weather", "parameters": {"city": "Paris"}}
    assert weather[1]["content"] == "It is 21 degrees in Paris."
    assert metrics["tool_name_accuracy"] == metrics["parameters_exact_match"] == 100.0
    assert metrics["num_expected_calls"] == 1 and metrics["num_unexpected_calls"] == 0
    assert metrics["rouge-l"] == 100.0 and metrics["num_plain_turns"] == 2


def test_file_mode_conversations_score_tool_calls(monkeypatch, capsys, tmp_path, tiny_model_dir, full_checkpoint):
    rows, metrics, _ = score_file(monkeypatch, capsys, tmp_path, tiny_model_dir, full_checkpoint,
                                  (WEATHER, GREETING), "tools")
    assert_weather_and_greeting_scored(rows, metrics)


def test_file_mode_scores_tool_calls_of_openai_messages(monkeypatch, capsys, tmp_path, tiny_model_dir,
                                                        full_checkpoint):
    """WEATHER and GREETING written as OpenAI chat messages (tools, tool_calls with JSON-string
    arguments, a tool result by tool_call_id) are scored exactly as the conversations are."""
    weather = {"tools": [{"type": "function", "function": TOOLS[0]}], "messages": [
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21}'},
        {"role": "assistant", "content": "It is 21 degrees in Paris."}]}
    greeting = {"messages": [{"role": "user", "content": "Hello"},
                             {"role": "assistant", "content": "Hello! How can I help you today?"}]}
    rows, metrics, err = score_file(monkeypatch, capsys, tmp_path, tiny_model_dir, full_checkpoint,
                                    (weather, greeting), "openai")
    assert (f"{tmp_path / 'openai.jsonl'}: 2 openai records (recognised from the first record), read as "
            f"multi-turn records") in err
    # the rows hold the records as read: tool results are text, as OpenAI messages have them
    as_read = dict(WEATHER, conversations=[dict(turn, observation=json.dumps(turn["observation"])) if "observation" in turn
                                           else turn for turn in WEATHER["conversations"]])
    assert [{k: v for k, v in row.items() if k != "prediction"} for row in rows] == [as_read, GREETING]
    assert_weather_and_greeting_scored(rows, metrics)


# ---- errors -------------------------------------------------------------------------------------

def test_clear_errors_without_tracebacks(monkeypatch, capsys, tmp_path, tiny_model_dir, pt_checkpoint,
                                         full_checkpoint):
    def error_of(*argv):
        code, _, err = run_cli(monkeypatch, capsys, list(argv) + ["--prompt", "hi"])
        assert code == 2 and "Traceback" not in err
        return err

    assert "no such folder" in error_of("--model", str(tmp_path / "missing"))
    original = str(shared_path("chatglm3-tiny-original", "model"))
    err = error_of("--model", original)  # remote code: the message names inference's own flag
    assert "is an original ChatGLM3 checkpoint" in err and "--trust-remote-code" in err and "_remote_" not in err
    assert "no such folder" in error_of("--model", tiny_model_dir, "--pt-checkpoint", str(tmp_path / "nope"))
    err = error_of("--model", tiny_model_dir, "--pt-checkpoint", pt_checkpoint, "--pt-pre-seq-len", "16")
    assert "pre_seq_len 16" in err and "pre_seq_len 4" in err
    assert "--tokenizer" in error_of("--model", full_checkpoint)  # no tokenizer.model beside the weights
    assert "is a P-Tuning checkpoint" in error_of("--model", pt_checkpoint, "--pt-checkpoint", pt_checkpoint)
    orphan = tmp_path / "orphan"
    orphan.mkdir()
    for name in ("prefix_config.json", "prefix_encoder.safetensors"):
        orphan.joinpath(name).write_bytes(open(f"{pt_checkpoint}/{name}", "rb").read())
    config = json.loads(orphan.joinpath("prefix_config.json").read_text())
    orphan.joinpath("prefix_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "gone/base"}))
    assert "names 'gone/base'" in error_of("--pt-checkpoint", str(orphan))
    bad_tools = tmp_path / "tools.json"
    bad_tools.write_text('{"name": "x"}')
    assert "JSON list" in error_of("--model", tiny_model_dir, "--tools", str(bad_tools))

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(GREETING) + "\n" + json.dumps({"conversations": [{"role": "sytem", "content": "x"}]}))
    code, _, err = run_cli(monkeypatch, capsys, ["--model", tiny_model_dir, "--input", str(bad), "--output",
                                                 str(tmp_path / "o.jsonl")])
    assert code == 2 and f"{bad}:2: conversations[0].role: 'sytem'" in err and "Traceback" not in err
    code, _, err = run_cli(monkeypatch, capsys, ["--model", tiny_model_dir, "--input", str(tmp_path / "no.jsonl"),
                                                 "--output", str(tmp_path / "o.jsonl")])
    assert code == 2 and "no such data file" in err


def test_pre_seq_len_given_right_is_accepted(tiny_model_dir, pt_checkpoint):
    assert load_chat_model(tiny_model_dir, pt_checkpoint=pt_checkpoint, pt_pre_seq_len=4).is_prefix_tuned


def test_a_lora_adapter_loads_merged_and_generates_like_the_peft_model(tiny_model_dir, tmp_path, monkeypatch,
                                                                       capsys):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    peft_model = get_peft_model(GlmForCausalLM.from_pretrained(tiny_model_dir),
                                LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    tokenizer = load_tokenizer(tiny_model_dir)
    in_memory = ChatModel(peft_model, tokenizer)  # an unmerged peft model works too
    prompts = prompt_batch(in_memory)
    expected = in_memory.generate(prompts, **GEN)
    merged = load_chat_model(tiny_model_dir, lora=str(tmp_path / "adapter"), device="cpu")
    assert merged.generate(prompts, **GEN) == expected
    base = ChatModel(GlmForCausalLM.from_pretrained(tiny_model_dir), tokenizer)
    assert base.generate(prompts, **GEN) != expected
    # the adapter folder alone names its base model
    code, out, _ = run_cli(monkeypatch, capsys, ["--model", str(tmp_path / "adapter"), "--prompt", "Hello",
                                                 "--max-new-tokens", "24"])
    assert code == 0 and out.strip() == shown(in_memory.reply([user("Hello")], **GEN))


def test_an_original_format_ptuning_checkpoint_reproduces_the_original_model(tmp_path):
    from chatglm3_finetune.model import conversion
    from safetensors.torch import load_file

    model_dir = shared_path("chatglm3-tiny-original", "model")
    ptuning = shared_path("chatglm3-tiny-original", "ptuning")
    reference = load_file(str(shared_path("chatglm3-tiny-original", "reference_outputs.safetensors")))
    converted = conversion.convert_checkpoint(str(model_dir), str(tmp_path / "converted"), dtype="float32")
    chat = load_chat_model(converted, pt_checkpoint=str(ptuning), pt_pre_seq_len=4, device="cpu", dtype="float32")
    for i in range(2):
        prompt = reference[f"prompt{i}.input_ids"][0].tolist()
        expected = reference[f"prompt{i}.ptuning_greedy8"].reshape(-1).tolist()
        got = chat.generate([prompt], max_new_tokens=8)[0]
        # generation stops on ChatGLM3's stop tokens; the reference ran 8 steps without stopping
        assert got == expected[:len(got)]
        assert len(got) == 8 or expected[len(got)] in chat.stop_token_ids
