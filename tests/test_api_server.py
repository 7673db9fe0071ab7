"""api_server.py: the openai client against a live server on 127.0.0.1, tool calls both ways,
OpenAI-style errors, disconnects, concurrent clients, the command line.

Two models stand behind the server: the random tiny GLM (real generation; greedy answers are
deterministic, so the same request must always get the same answer), and a ScriptedModel that
"generates" a given reply token by token through chat_engine's real generation paths, so a tool
call and the exact prompt ids the model received can be checked.
"""

import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from api_server import (ServerLimits, create_app, main, parse_args, served_model_name,  # noqa: E402
                        server_limits)
from chatglm3_finetune.serve.openai_protocol import (StreamedReply, assistant_message,  # noqa: E402
                                               openai_messages_to_chatglm as chat_messages)
from chatglm3_finetune.serve.chat_engine import ChatModel, load_chat_model, split_reply  # noqa: E402
from chatglm3_finetune.format.chat_format import render_tool_call  # noqa: E402
from chatglm3_finetune.format.chat_format import Message, build_chat_input, tools_system_prompt  # noqa: E402

WEATHER_TOOL = {"type": "function", "function": {
    "name": "getCurrentWeather", "description": "Get the current weather of a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


# ---- a live server in a thread, and a model that follows a script --------------------------------

class ServerThread:
    """A uvicorn server for `app` on 127.0.0.1, on a free port, in a daemon thread."""

    def __init__(self, app):
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.port = self.socket.getsockname()[1]
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)

    def client(self):
        return openai.OpenAI(base_url=self.base_url + "/v1", api_key="unused", max_retries=0, timeout=60)


class ScriptedModel:
    """Stands in for the network behind the batched decoder: its forward "predicts" the next token
    of each row's scripted reply (one script per new prompt, in order; once a script runs out it
    repeats `filler_id`). The cache it is handed is real: each row's keys are its token ids and its
    values a row number, so rows are followed through joins, padding and leaves as the decoder
    moves them. `pause_at` = (n, event) holds the forward that would give any row its n-th token
    until the event is set; `delay` sleeps in each forward; `fail_at` = n raises at the n-th token."""

    def __init__(self, filler_id: int, vocab_size: int, max_positions: int = 4096):
        self.config = SimpleNamespace(max_position_embeddings=max_positions)
        self.device = torch.device("cpu")
        self.filler_id, self.vocab_size = filler_id, vocab_size
        self.replies: list[list[int]] = []
        self.prompts: list[list[int]] = []
        self.generated: dict[int, int] = {}  # row number -> tokens predicted
        self.scripts: dict[int, list[int]] = {}
        self.pause_at: tuple[int, threading.Event] | None = None
        self.delay = 0.0
        self.fail_at: int | None = None

    def eval(self):
        return self

    def __call__(self, **kwargs):
        return self.forward(**kwargs)

    def forward(self, input_ids, attention_mask, position_ids, cache, use_cache=True, return_dict=True):
        batch, length = input_ids.shape
        if length > 1:  # a prefill: new rows
            rows = torch.arange(len(self.scripts), len(self.scripts) + batch, dtype=torch.float)
            for row, ids, mask in zip(rows.long().tolist(), input_ids, attention_mask):
                self.prompts.append(ids[mask.bool()].tolist())
                self.scripts[row] = self.replies.pop(0) if self.replies else []
                self.generated[row] = 0
        else:
            rows = cache.layers[0].values[:, 0, -1, 0]
        keys = input_ids[:, None, :, None].float()
        cache.update(keys, rows[:, None, None, None].expand_as(keys).contiguous(), 0)
        logits = torch.zeros(batch, 1, self.vocab_size)
        for i, row in enumerate(rows.long().tolist()):
            step = self.generated[row]
            if self.pause_at and step == self.pause_at[0]:
                assert self.pause_at[1].wait(timeout=60), "the test never released the paused generation"
            if self.fail_at is not None and step == self.fail_at:
                raise RuntimeError("injected failure")
            script = self.scripts[row]
            logits[i, 0, script[step] if step < len(script) else self.filler_id] = 1e4  # sampled or not
            self.generated[row] = step + 1
        time.sleep(self.delay)
        return SimpleNamespace(logits=logits)


def wait_until_idle(server: "ServerThread", timeout: float = 20) -> bool:
    """True once no request is in the batch or waiting for it."""
    decoder = server.app.state.chat_server.decoder
    deadline = time.monotonic() + timeout
    while decoder.load != (0, 0):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def reply_ids(tokenizer, *messages: tuple[str, str], stop: str = "<|user|>") -> list[int]:
    """Token ids of a generated reply: (metadata, text) messages joined by `<|assistant|>`, then the stop token."""
    ids = []
    for i, (metadata, text) in enumerate(messages):
        if i:
            ids.append(tokenizer.role_token_id("assistant"))
        ids += tokenizer.encode_text(metadata + "\n") + tokenizer.encode_text(text)
    return ids + [tokenizer.get_command(stop)]


@pytest.fixture(scope="module")
def tiny_chat(tiny_model_dir):
    return load_chat_model(tiny_model_dir, device="cpu")


@pytest.fixture(scope="module")
def tiny_server(tiny_chat):
    with ServerThread(create_app(tiny_chat, "tiny-chatglm3")) as server:
        yield server


def scripted_server(tokenizer, **limits) -> tuple[ScriptedModel, ServerThread]:
    model = ScriptedModel(filler_id=tokenizer.encode_text("ok")[-1], vocab_size=len(tokenizer))
    return model, ServerThread(create_app(ChatModel(model, tokenizer), "scripted", limits=ServerLimits(**limits)))


@pytest.fixture(scope="module")
def scripted(tiny_tokenizer):
    model, server = scripted_server(tiny_tokenizer)
    with server:
        yield SimpleNamespace(model=model, server=server, tokenizer=tiny_tokenizer)


@pytest.fixture
def scripted_model(scripted):
    scripted.model.replies.clear()
    scripted.model.prompts.clear()
    scripted.model.pause_at, scripted.model.delay, scripted.model.fail_at = None, 0.0, None
    return scripted.model


def post(server: ServerThread, path: str, body, headers: dict | None = None, method: str = "POST"):
    """(status, decoded JSON body) of a raw request: bodies the openai client would never send."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    response = conn.getresponse()
    payload = response.read()
    conn.close()
    return response.status, json.loads(payload)


# ---- the openai client against the tiny model ----------------------------------------------------

def test_models_lists_the_served_model(tiny_server):
    models = tiny_server.client().models.list()
    assert [m.id for m in models.data] == ["tiny-chatglm3"]
    assert tiny_server.client().models.retrieve("tiny-chatglm3").id == "tiny-chatglm3"


def test_completion_is_the_engine_answer_with_usage_and_streaming_adds_up_to_it(tiny_server, tiny_chat):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello"}]
    prompt = tiny_chat.chat_input_ids([Message("system", "", "You are terse.", False),
                                       Message("user", "", "Hello", False)])
    expected = tiny_chat.generate_completions([prompt], max_new_tokens=12)[0]
    expected_content, expected_calls = assistant_message([expected.text])
    assert not expected_calls

    client = tiny_server.client()
    answer = client.chat.completions.create(model="tiny-chatglm3", messages=messages, max_tokens=12, temperature=0)
    assert answer.object == "chat.completion" and answer.model == "tiny-chatglm3"
    assert answer.choices[0].message.role == "assistant"
    assert answer.choices[0].message.content == expected_content
    assert answer.choices[0].finish_reason == expected.finish_reason
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (len(prompt), len(expected.token_ids))
    assert answer.usage.total_tokens == len(prompt) + len(expected.token_ids)

    chunks = list(client.chat.completions.create(model="tiny-chatglm3", messages=messages, max_tokens=12,
                                                 temperature=0, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected_content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [expected.finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(expected.token_ids)


def test_stream_is_server_sent_events_ending_with_done(tiny_server):
    conn = http.client.HTTPConnection("127.0.0.1", tiny_server.port, timeout=60)
    conn.request("POST", "/v1/chat/completions", body=json.dumps(
        {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0, "stream": True}))
    response = conn.getresponse()
    assert response.status == 200 and response.getheader("content-type").startswith("text/event-stream")
    events = response.read().decode().split("\n\n")
    conn.close()
    assert events[-2:] == ["data: [DONE]", ""]
    assert all(event.startswith("data: {") for event in events[:-2])


def test_stop_string_and_max_tokens(tiny_server, tiny_chat):
    prompt = tiny_chat.chat_input_ids([Message("user", "", "Tell me more", False)])
    full = tiny_chat.generate_completions([prompt], max_new_tokens=30)[0]
    content, _ = assistant_message([full.text])
    stop = content.strip()[3:5]
    if len(stop) < 2 or stop.isspace():
        pytest.skip("the random model's answer is too short to cut with a stop string")
    client = tiny_server.client()
    cut = client.chat.completions.create(model="tiny-chatglm3", messages=[{"role": "user", "content": "Tell me more"}],
                                         max_tokens=30, temperature=0, stop=[stop])
    assert cut.choices[0].message.content == content[:content.index(stop)].strip()
    assert cut.choices[0].finish_reason == "stop"
    short = client.chat.completions.create(model="tiny-chatglm3",
                                           messages=[{"role": "user", "content": "Tell me more"}],
                                           max_tokens=2, temperature=0)
    assert short.usage.completion_tokens <= 2


# ---- tool calls, both ways -------------------------------------------------------------------------

def test_tool_call_round_trip_renders_training_layout(scripted, scripted_model):
    tok = scripted.tokenizer
    thought = "I need the weather in Paris."
    call = render_tool_call("getCurrentWeather", {"city": "Paris"})
    scripted_model.replies += [
        reply_ids(tok, ("", thought), ("getCurrentWeather", call), stop="<|observation|>"),
        reply_ids(tok, ("", "It is sunny in Paris.")),
    ]
    client = scripted.server.client()
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    first = client.chat.completions.create(model="scripted", messages=messages, tools=[WEATHER_TOOL], temperature=0)

    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == thought
    [tool_call] = choice.message.tool_calls
    assert tool_call.type == "function" and tool_call.function.name == "getCurrentWeather"
    assert json.loads(tool_call.function.arguments) == {"city": "Paris"}
    system = Message("system", "", tools_system_prompt([WEATHER_TOOL["function"]]), False)
    user = Message("user", "", "Weather in Paris?", False)
    assert scripted_model.prompts[0] == build_chat_input(tok, [system, user])

    messages += [choice.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": tool_call.id, "content": '{"temperature_c": 18}'}]
    second = client.chat.completions.create(model="scripted", messages=messages, tools=[WEATHER_TOOL], temperature=0)

    assert second.choices[0].message.content == "It is sunny in Paris."
    assert second.choices[0].finish_reason == "stop" and not second.choices[0].message.tool_calls
    expected = build_chat_input(tok, [system, user, Message("assistant", "", thought, False),
                                      Message("assistant", "getCurrentWeather", call, False),
                                      Message("observation", "", '{"temperature_c": 18}', False)])
    assert scripted_model.prompts[1] == expected
    specials = [tok.token_text(t) for t in scripted_model.prompts[1] if t >= tok.num_pieces]
    assert specials == ["[gMASK]", "sop", "<|system|>", "<|user|>", "<|assistant|>", "<|assistant|>",
                        "<|observation|>", "<|assistant|>"]


def test_streamed_tool_call(scripted, scripted_model):
    tok = scripted.tokenizer
    scripted_model.replies.append(reply_ids(
        tok, ("", "Let me look."), ("getCurrentWeather", render_tool_call("getCurrentWeather", {"city": "Oslo"})),
        stop="<|observation|>"))
    chunks = list(scripted.server.client().chat.completions.create(
        model="scripted", messages=[{"role": "user", "content": "Oslo?"}], tools=[WEATHER_TOOL], stream=True,
        temperature=0))
    deltas = [c.choices[0].delta for c in chunks]
    assert "".join(d.content or "" for d in deltas) == "Let me look."
    [calls] = [d.tool_calls for d in deltas if d.tool_calls]
    assert calls[0].index == 0 and calls[0].id.startswith("call_")
    assert (calls[0].function.name, json.loads(calls[0].function.arguments)) == ("getCurrentWeather", {"city": "Oslo"})
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_unreadable_call_comes_back_as_text(scripted, scripted_model):
    scripted_model.replies.append(reply_ids(scripted.tokenizer, ("getCurrentWeather", "```python\ntool_call(city="),
                                            stop="<|observation|>"))
    answer = scripted.server.client().chat.completions.create(
        model="scripted", messages=[{"role": "user", "content": "?"}], tools=[WEATHER_TOOL], temperature=0)
    assert answer.choices[0].message.tool_calls is None
    assert answer.choices[0].message.content == "getCurrentWeather\n```python\ntool_call(city="
    assert answer.choices[0].finish_reason == "stop"


def test_openai_messages_to_chatglm3_messages():
    calls = [{"id": "a", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}},
             {"id": "b", "type": "function", "function": {"name": "g", "arguments": ""}}]
    rendered = chat_messages(
        [{"role": "developer", "content": [{"type": "text", "text": "Be"}, {"type": "text", "text": "brief"}]},
         {"role": "user", "content": "go"},
         {"role": "assistant", "content": None, "tool_calls": calls},
         {"role": "tool", "tool_call_id": "b", "content": "G"},
         {"role": "tool", "tool_call_id": "a", "content": "F"},
         {"role": "assistant", "content": "done"}],
        tools=[WEATHER_TOOL])
    assert rendered == [
        Message("system", "", tools_system_prompt([WEATHER_TOOL["function"]]), False),
        Message("system", "", "Be\nbrief", False),
        Message("user", "", "go", False),
        Message("assistant", "f", "```python\ntool_call(x=1)\n```", False),
        Message("observation", "", "F", False),
        Message("assistant", "g", "```python\ntool_call()\n```", False),
        Message("observation", "", "G", False),
        Message("assistant", "", "done", False),
    ]
    assert chat_messages([{"role": "user", "content": "hi"}], tools=[WEATHER_TOOL], tool_choice="none") == [
        Message("user", "", "hi", False)]


@pytest.mark.parametrize("messages", [
    ["\nHello there,  friend.\n\n"],
    ["\nThought one.\n"],
    ["\nThought.", "getCurrentWeather\n```python\ntool_call(city='Paris')\n```"],
    ["Sure!\nnot a tool name"],
    ["no newline at all"],
    ["\nA.", "\nB."],
    ["get_weather\n```python\ntool_call(city="],
])
def test_streamed_deltas_add_up_to_the_whole_reply(messages):
    # one character per token, None for <|assistant|> (decoding drops it, as it drops special tokens)
    token_ids = [token for i, message in enumerate(messages) for token in ([None] if i else []) + list(message)]

    def decode(ids):
        return "".join(token for token in ids if token is not None)

    text = decode(token_ids)
    reply, deltas = StreamedReply(), []
    for end in range(1, len(token_ids) + 1):
        shown = decode(token_ids[:end])[:-1]  # streaming holds the last character back
        deltas += reply.update(split_reply(token_ids[:end], shown, None, decode))
    segments = split_reply(token_ids, text, None, decode)
    assert segments == messages
    deltas += reply.update(segments, final=True)
    content, calls = assistant_message(segments)
    assert "".join(d.get("content", "") for d in deltas) == content
    streamed_calls = [c["function"] for d in deltas for c in d.get("tool_calls", [])]
    assert [(c["name"], json.loads(c["arguments"])) for c in streamed_calls] == [(c.name, c.parameters) for c in calls]


# ---- errors ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("body,param,fragment", [
    (b"{not json", None, "not valid JSON"),
    (b"\xff\xfe", None, "not valid JSON"),
    ([1, 2], None, "JSON object"),
    ({"model": "m"}, "messages", "'messages' is required"),
    ({"messages": []}, "messages", "at least 1 item"),
    ({"messages": [{"role": "sytem", "content": "x"}]}, "messages[0].role",
     "'sytem' is not one of system, developer, user, assistant, tool; did you mean 'system'?"),
    ({"messages": [{"role": "User", "content": "x"}]}, "messages[0].role", "did you mean 'user'?"),
    ({"messages": [{"role": 7, "content": "x"}]}, "messages[0].role", "should be 'system', 'developer', 'user'"),
    ({"messages": ["hi"]}, "messages[0]", "must be an object"),
    ({"messages": [{"role": "user"}]}, "messages[0]", "needs 'content'"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content[0].type", "should be 'text'"),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, "temperature", "valid number"),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": 3}, "temperature", "less than or equal to 2"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 2.5}, "max_tokens", "integer"),
    ({"messages": [{"role": "user", "content": "x"}], "stream": "yes"}, "stream", "valid boolean"),
    ({"messages": [{"role": "user", "content": "x"}], "n": 2}, "n", "n=1"),
    ({"messages": [{"role": "user", "content": "x"}], "stop": [1]}, "stop[0]", "valid string"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "web"}]}, "tools[0].type", "'function'"),
    ({"messages": [{"role": "user", "content": "x"}], "tool_choice": "required"}, "tool_choice", "'auto' or 'none'"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{x"}}]}]},
     "messages[0].tool_calls[0].function.arguments", "not valid JSON"),
])
def test_malformed_requests_get_openai_errors(tiny_server, body, param, fragment):
    status, payload = post(tiny_server, "/v1/chat/completions", body)
    assert status == 400
    assert set(payload["error"]) == {"message", "type", "param", "code"}
    assert payload["error"]["type"] == "invalid_request_error"
    assert payload["error"]["param"] == param
    assert fragment in payload["error"]["message"]


def test_prompt_longer_than_the_context_is_refused(tiny_server, tiny_chat):
    context = tiny_chat.model.config.max_position_embeddings
    long_text = "Hello! " * context
    with pytest.raises(openai.BadRequestError) as refused:
        tiny_server.client().chat.completions.create(model="tiny-chatglm3",
                                                     messages=[{"role": "user", "content": long_text}])
    assert refused.value.status_code == 400
    assert refused.value.body["code"] == "context_length_exceeded"
    assert f"maximum context length is {context} tokens" in refused.value.body["message"]


def test_max_context_option_and_unknown_paths(tiny_chat):
    with ServerThread(create_app(tiny_chat, "small", max_context=12)) as server:
        status, payload = post(server, "/v1/chat/completions",
                               {"messages": [{"role": "user", "content": "a fairly long question here"}]})
        assert status == 400 and payload["error"]["code"] == "context_length_exceeded"
        fits = server.client().chat.completions.create(model="small", messages=[{"role": "user", "content": "Hi"}],
                                                       temperature=0, max_tokens=100)
        prompt_tokens = fits.usage.prompt_tokens
        assert fits.usage.completion_tokens <= 12 - prompt_tokens  # max_tokens is cut to the room left
        status, payload = post(server, "/v1/completions", {"prompt": "x"})
        assert status == 404 and payload["error"]["code"] == "not_found"
        assert "/v1/chat/completions" in payload["error"]["message"]
        status, payload = post(server, "/v1/chat/completions", None, method="GET")
        assert status == 405 and payload["error"]["code"] == "method_not_allowed"
        status, payload = post(server, "/v1/models/other", None, method="GET")
        assert status == 404 and payload["error"]["code"] == "model_not_found"


# ---- serving: disconnects, concurrency ---------------------------------------------------------------

@pytest.mark.parametrize("metadata", ["", "getCurrentWeather"], ids=["answer", "tool-call"])
def test_client_leaving_mid_stream_stops_the_generation(scripted, scripted_model, metadata):
    """Whether text is streaming or a tool call is being held until it ends, the generation stops."""
    tok = scripted.tokenizer
    scripted_model.replies.append(tok.encode_text(metadata + "\n") + tok.encode_text("Going on"))  # then filler
    scripted_model.delay = 0.01  # 2000 tokens would take 20 s
    conn = http.client.HTTPConnection("127.0.0.1", scripted.server.port, timeout=30)
    conn.request("POST", "/v1/chat/completions", body=json.dumps(
        {"messages": [{"role": "user", "content": "go on forever"}], "max_tokens": 2000, "stream": True}))
    response = conn.getresponse()
    for _ in range(4):  # the role chunk, then content chunks or keep-alive comments
        response.readline()
        response.readline()
    response.close()
    conn.close()
    assert wait_until_idle(scripted.server), "the generation went on after the client left"
    assert scripted_model.generated[max(scripted_model.generated)] < 1000
    scripted_model.delay = 0.0
    scripted_model.replies.append(reply_ids(tok, ("", "Next one.")))
    answer = scripted.server.client().chat.completions.create(
        model="scripted", messages=[{"role": "user", "content": "again"}], temperature=0)
    assert answer.choices[0].message.content == "Next one."


def test_request_whose_client_left_while_queued_is_skipped(tiny_tokenizer):
    model, server = scripted_server(tiny_tokenizer, max_batch_size=1)  # one at a time: the second one waits
    release = threading.Event()
    model.pause_at = (1, release)
    model.replies += [reply_ids(tiny_tokenizer, ("", "First.")), reply_ids(tiny_tokenizer, ("", "Third."))]
    with server, ThreadPoolExecutor(1) as pool:
        client = server.client()
        first = pool.submit(client.chat.completions.create, model="scripted",
                            messages=[{"role": "user", "content": "1"}])
        while not model.prompts:  # the first request holds the model
            time.sleep(0.01)
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        conn.request("POST", "/v1/chat/completions", body=json.dumps({"messages": [{"role": "user", "content": "2"}]}))
        time.sleep(0.3)  # let the server read it and queue it
        conn.close()
        time.sleep(0.5)  # its disconnect is noticed within DISCONNECT_POLL_S
        release.set()
        assert first.result().choices[0].message.content == "First."
        third = client.chat.completions.create(model="scripted", messages=[{"role": "user", "content": "3"}])
        assert third.choices[0].message.content == "Third."
    tok = tiny_tokenizer
    user_texts = [tok.decode(p[p.index(tok.role_token_id("user")) + 1:-1]).strip() for p in model.prompts]
    assert user_texts == ["1", "3"]


def test_concurrent_clients_each_get_their_own_answer(tiny_server):
    """8 clients at once (half streaming) get exactly the answer their request gets alone."""
    def ask(i: int, stream: bool) -> tuple[str, str]:
        client = tiny_server.client()
        request = dict(model="tiny-chatglm3", messages=[{"role": "user", "content": f"Question {i}: what is {i} + {i}?"}],
                       max_tokens=12 + i, temperature=0)
        if not stream:
            choice = client.chat.completions.create(**request).choices[0]
            return choice.message.content, choice.finish_reason
        chunks = list(client.chat.completions.create(**request, stream=True))
        text = "".join(c.choices[0].delta.content or "" for c in chunks)
        return text, chunks[-1].choices[0].finish_reason

    alone = [ask(i, stream=False) for i in range(8)]
    assert len(set(alone)) > 1, "the prompts should get different answers for this test to mean something"
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda i: ask(i, stream=i % 2 == 1), range(8)))
    assert together == alone


# ---- limits, faults, the API key ---------------------------------------------------------------------

def raw_request(server: ServerThread, body: bytes, headers: dict | None = None) -> socket.socket:
    """A POST sent over a plain socket (for bodies and readers the http clients would not allow)."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    head = {"Content-Type": "application/json", "Content-Length": str(len(body)), **(headers or {})}
    lines = "".join(f"{name}: {value}\r\n" for name, value in head.items())
    sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n{lines}\r\n".encode() + body)
    return sock


def test_full_queue_gets_429_with_retry_after(tiny_tokenizer):
    model, server = scripted_server(tiny_tokenizer, max_batch_size=1, max_queue=1)
    release = threading.Event()
    model.pause_at = (1, release)
    ask = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    with server, ThreadPoolExecutor(2) as pool:
        running = pool.submit(post, server, "/v1/chat/completions", ask)
        while not model.prompts:
            time.sleep(0.01)
        waiting = pool.submit(post, server, "/v1/chat/completions", ask)
        while server.app.state.chat_server.decoder.load != (1, 1):
            time.sleep(0.01)
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        conn.request("POST", "/v1/chat/completions", body=json.dumps(ask))
        refused = conn.getresponse()
        body = json.loads(refused.read())
        assert refused.status == 429 and int(refused.getheader("Retry-After")) >= 1
        assert body["error"]["code"] == "rate_limit_exceeded" and "busy" in body["error"]["message"]
        release.set()
        assert running.result()[0] == 200 and waiting.result()[0] == 200


def test_api_key_is_required_on_v1_when_set(tiny_tokenizer):
    model = ScriptedModel(filler_id=tiny_tokenizer.encode_text("ok")[-1], vocab_size=len(tiny_tokenizer))
    app = create_app(ChatModel(model, tiny_tokenizer), "scripted", api_key="s3cret")
    ask = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    with ServerThread(app) as server:
        for headers, fragment in (({}, "No API key provided"), ({"Authorization": "Bearer wrong"}, "Incorrect API key"),
                                  ({"Authorization": "s3cret"}, "Incorrect API key")):
            for path, method in (("/v1/chat/completions", "POST"), ("/v1/models", "GET")):
                status, body = post(server, path, ask, headers, method=method)
                assert status == 401 and body["error"]["code"] == "invalid_api_key", (headers, path)
                assert fragment in body["error"]["message"]
        with pytest.raises(openai.AuthenticationError):
            server.client().models.list()
        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="s3cret", max_retries=0, timeout=30)
        assert client.chat.completions.create(model="scripted", **ask).usage.completion_tokens == 2
        page = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        page.request("GET", "/")
        assert page.getresponse().status == 200  # the page itself asks for the key


def test_limit_flags_reach_the_server():
    args = parse_args(["--model", "m", "--max-batch-size", "1", "--max-queue", "0", "--max-tokens-limit", "10",
                       "--max-body-bytes", "100", "--body-timeout", "2.5", "--send-timeout", "3"], {})
    assert server_limits(args) == ServerLimits(1, 0, 10, 100, 2.5, 3.0)
    assert server_limits(parse_args(["--model", "m"], {})) == ServerLimits()
    for flag in ("--max-batch-size", "--max-tokens-limit", "--send-timeout"):
        with pytest.raises(SystemExit):
            parse_args(["--model", "m", flag, "0"], {})


def test_api_key_option_and_environment():
    assert parse_args(["--model", "m"], {"API_KEY": "k"}).api_key == "k"
    assert parse_args(["--model", "m", "--api-key", "flag"], {"API_KEY": "k"}).api_key == "flag"
    assert parse_args(["--model", "m"], {}).api_key is None
    with pytest.raises(SystemExit):
        parse_args(["--model", "m"], {"API_KEY": " "})


def test_oversized_slow_and_over_limit_requests_are_refused(tiny_tokenizer):
    model, server = scripted_server(tiny_tokenizer, max_body_bytes=2000, body_timeout_s=0.5, max_tokens=50)
    with server:
        big = json.dumps({"messages": [{"role": "user", "content": "x" * 5000}]})
        status, body = post(server, "/v1/chat/completions", big)
        assert status == 413 and body["error"]["code"] == "request_too_large"
        sock = raw_request(server, b"")  # chunked, no Content-Length: counted as it arrives
        sock.close()
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(5):
            sock.sendall(b"3e8\r\n" + b"x" * 1000 + b"\r\n")
        assert b" 413 " in sock.recv(4096).split(b"\r\n")[0] + b" "
        sock.close()
        sock = raw_request(server, b'{"messages": [', {"Content-Length": "100"})  # never sends the rest
        assert sock.recv(4096).startswith(b"HTTP/1.1 408")
        sock.close()
        status, body = post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                                             "max_tokens": 1_000_000_000})
        assert status == 400 and body["error"]["param"] == "max_tokens" and "limit of 50" in body["error"]["message"]


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("body,param,literal", [
    ({"temperature": NAN}, "temperature", "NaN"),
    ({"temperature": INF}, "temperature", "Infinity"),
    ({"top_p": NAN}, "top_p", "NaN"),
    ({"top_p": -INF}, "top_p", "-Infinity"),
    ({"presence_penalty": NAN}, "presence_penalty", "NaN"),  # ignored by this server, but not valid JSON
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"default": NAN}}}]},
     "tools[0].function.parameters.default", "NaN"),
    ({"stream": True, "temperature": NAN}, "temperature", "NaN"),
])
def test_non_finite_numbers_get_a_400_that_names_the_parameter(scripted, scripted_model, body, param, literal):
    """Python's json reads NaN and Infinity, and the range checks then said "less than or equal to 2"
    for a temperature of NaN."""
    body = {"messages": [{"role": "user", "content": "x"}], **body}
    status, payload = post(scripted.server, "/v1/chat/completions", body)
    assert status == 400 and payload["error"]["param"] == param
    assert payload["error"]["message"].startswith(f"{param}: {literal} is not a JSON number")
    assert payload["error"]["type"] == "invalid_request_error" and not scripted_model.prompts


def test_numbers_beyond_the_float_range_and_repeated_keys_are_400(scripted, scripted_model):
    status, payload = post(scripted.server, "/v1/chat/completions",
                           b'{"messages": [{"role": "user", "content": "x"}], "temperature": 1e999}')
    assert status == 400 and payload["error"]["param"] == "temperature"
    assert payload["error"]["message"] == ("temperature: 1e999 is beyond the range of a float (it would be read as "
                                           "infinity); write a smaller number")
    status, payload = post(scripted.server, "/v1/chat/completions",
                           b'{"messages": [{"role": "user", "content": "x", "content": "y"}]}')
    assert status == 400 and payload["error"]["param"] == "messages[0].content"
    assert "the key 'content' appears twice" in payload["error"]["message"]
    assert not scripted_model.prompts


def test_a_request_for_another_model_gets_404_model_not_found(scripted, scripted_model):
    """As OpenAI answers it (404, type invalid_request_error, code model_not_found), naming the
    model this server does serve; a request without a model is served by it."""
    client = scripted.server.client()
    for stream in (False, True):
        with pytest.raises(openai.NotFoundError) as refused:
            client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}], stream=stream)
        error = refused.value.body
        assert refused.value.status_code == 404 and error["code"] == "model_not_found"
        assert error["type"] == "invalid_request_error" and error["param"] == "model"
        assert error["message"].startswith("The model `gpt-4o` does not exist: this server serves `scripted`")
    status, payload = post(scripted.server, "/v1/models/gpt-4o", None, method="GET")
    assert status == 404 and payload["error"]["code"] == "model_not_found"
    assert not scripted_model.prompts
    scripted_model.replies.append(reply_ids(scripted.tokenizer, ("", "Hi.")))
    status, payload = post(scripted.server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]})
    assert status == 200 and payload["model"] == "scripted"


@pytest.mark.parametrize("body,param", [
    (b"[" * 100_000 + b"]" * 100_000, None),
    (b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": ' + b"9" * 5000 + b"}", None),
    ({"messages": [{"role": "user", "content": "x"}], "seed": 2**64}, "seed"),
    ({"messages": [{"role": "user", "content": "x"}], "seed": 2**64, "stream": True}, "seed"),
    ({"messages": [{"role": "user", "content": "x"}], "seed": -2**63 - 1}, "seed"),
], ids=["deep-json", "5000-digits", "seed-2**64", "seed-2**64-stream", "seed-below-range"])
def test_former_server_errors_are_400(scripted, scripted_model, body, param):
    status, payload = post(scripted.server, "/v1/chat/completions", body)
    assert status == 400 and payload["error"]["param"] == param


def test_extreme_sampling_settings_are_served(tiny_server):
    client = tiny_server.client()
    for settings in ({"temperature": 1e-300}, {"seed": 2**64 - 1, "temperature": 1.5}, {"seed": -2**63},
                     {"top_p": 1e-300, "temperature": 2}):
        answer = client.chat.completions.create(model="tiny-chatglm3", messages=[{"role": "user", "content": "Hi"}],
                                                max_tokens=4, **settings)
        assert answer.usage.completion_tokens >= 1
    greedy = client.chat.completions.create(model="tiny-chatglm3", messages=[{"role": "user", "content": "Hi"}],
                                            max_tokens=8, temperature=0)
    tiny = client.chat.completions.create(model="tiny-chatglm3", messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=8, temperature=1e-300)
    assert tiny.choices[0].message.content == greedy.choices[0].message.content


def test_failure_after_the_stream_started_ends_with_an_error_event(scripted, scripted_model):
    scripted_model.replies.append(reply_ids(scripted.tokenizer, ("", "Some words that go on and on")))
    scripted_model.fail_at = 4
    conn = http.client.HTTPConnection("127.0.0.1", scripted.server.port, timeout=30)
    conn.request("POST", "/v1/chat/completions", body=json.dumps(
        {"messages": [{"role": "user", "content": "fail"}], "stream": True, "max_tokens": 50}))
    response = conn.getresponse()
    assert response.status == 200
    events = [line[6:] for line in response.read().decode().splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["type"] == "server_error" and "injected failure" in error["message"]
    scripted_model.fail_at = None
    status, body = post(scripted.server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "again"}],
                                                                  "max_tokens": 3})
    assert status == 200  # the server goes on


def test_failure_without_streaming_is_a_logged_500_and_the_server_goes_on(scripted, scripted_model, caplog):
    scripted_model.fail_at = 2
    status, body = post(scripted.server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]})
    assert status == 500 and body["error"]["type"] == "server_error" and "injected failure" in body["error"]["message"]
    assert any("a bug in the server" in record.getMessage() for record in caplog.records)
    scripted_model.fail_at = None
    assert post(scripted.server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "y"}],
                                                          "max_tokens": 2})[0] == 200


def test_a_model_without_a_cache_argument_is_refused_at_start(tiny_tokenizer):
    class RemoteCodeStyle(ScriptedModel):
        def forward(self, input_ids, attention_mask=None, past_key_values=None):
            raise AssertionError("never called")

    model = RemoteCodeStyle(filler_id=0, vocab_size=len(tiny_tokenizer))
    with pytest.raises(ValueError, match="native transformers model"):
        create_app(ChatModel(model, tiny_tokenizer))


def test_non_streaming_client_that_leaves_stops_its_generation(scripted, scripted_model):
    scripted_model.delay = 0.01  # 3000 tokens would take 30 s
    row = len(scripted_model.scripts)
    sock = raw_request(scripted.server, json.dumps({"messages": [{"role": "user", "content": "long"}],
                                                    "max_tokens": 3000}).encode())
    while scripted_model.generated.get(row, 0) < 5:
        time.sleep(0.01)
    sock.close()
    assert wait_until_idle(scripted.server, timeout=10), "the generation went on after the client left"
    assert scripted_model.generated[row] < 1500


def test_stalled_reader_is_dropped_after_the_send_timeout(tiny_tokenizer):
    model, server = scripted_server(tiny_tokenizer, send_timeout_s=0.5, max_tokens=200_000)
    server.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # accepted sockets inherit it
    model.replies.append(tiny_tokenizer.encode_text("\n") + tiny_tokenizer.encode_text("Plain text"))  # streams
    with server:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", server.port))
        body = json.dumps({"messages": [{"role": "user", "content": "talk"}], "stream": True,
                           "max_tokens": 200_000}).encode()
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        # ...and never reads: the server's buffers fill, its sends block, the send timeout drops it
        while model.generated.get(0, 0) < 10:
            time.sleep(0.01)
        assert wait_until_idle(server, timeout=60), "a client that stopped reading kept its generation"
        assert model.generated[0] < 5000
        assert post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "next"}],
                                                     "max_tokens": 3})[0] == 200
        sock.close()


# ---- command line ------------------------------------------------------------------------------------

def test_paths_come_from_the_environment_or_flags():
    args = parse_args([], {"MODEL_PATH": "models/base", "TOKENIZER_PATH": "tok", "PT_PATH": "output/pt-run"})
    assert (args.model, args.tokenizer, args.pt_checkpoint, args.lora) == ("models/base", "tok", "output/pt-run", None)
    assert (args.host, args.port) == ("127.0.0.1", 8000)
    assert served_model_name(args) == "chatglm3"  # what the docs' examples send; --model-name changes it
    args = parse_args(["--model", "full", "--lora", "adapter", "--host", "0.0.0.0", "--port", "9000",
                       "--max-context", "2048"], {"MODEL_PATH": "ignored", "LORA_PATH": "ignored"})
    assert (args.model, args.lora, args.host, args.port, args.max_context) == ("full", "adapter", "0.0.0.0", 9000, 2048)


def test_command_line_says_what_to_do_without_a_model(capsys):
    with pytest.raises(SystemExit):
        parse_args([], {})
    assert "--model or MODEL_PATH" in capsys.readouterr().err


@pytest.mark.slow
def test_command_line_serves_the_model_from_model_path(tiny_model_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MODEL_PATH": tiny_model_dir}
    process = subprocess.Popen([sys.executable, str(ROOT / "api_server.py"), "--port", str(port), "--device", "cpu",
                                "--model-name", "cli-tiny", "--threads", "1"], env=env, cwd=str(ROOT),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=30)
        deadline = time.monotonic() + 90
        while True:
            assert process.poll() is None, process.stdout.read().decode()[-3000:]
            try:
                assert [m.id for m in client.models.list().data] == ["cli-tiny"]
                break
            except openai.APIConnectionError:
                assert time.monotonic() < deadline, "the server did not come up"
                time.sleep(0.3)
        answer = client.chat.completions.create(model="cli-tiny", messages=[{"role": "user", "content": "Hi"}],
                                                max_tokens=3, temperature=0)
        assert answer.usage.completion_tokens <= 3
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_command_line_reports_a_missing_model_folder(tmp_path, capsys):
    assert main(["--model", str(tmp_path / "missing"), "--device", "cpu"]) == 2
    assert f"{tmp_path / 'missing'}: no such folder" in capsys.readouterr().err
