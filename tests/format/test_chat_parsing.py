"""Rendering and parsing of ChatGLM3 assistant replies (tool calls, interpreter code, plain text)."""

import random

import pytest

from chatglm3_finetune.format.chat_parsing import AssistantReply, ToolCall, parse_assistant_reply, split_metadata

from chatglm3_finetune.format.chat_format import render_interpreter_code, render_tool_call


# --- rendering ----------------------------------------------------------------------------------

def test_render_tool_call_is_the_chatglm3_text():
    text = render_tool_call("get_weather", {"city": "Paris", "days": 3})
    assert text == "```python\ntool_call(city='Paris', days=3)\n```"


def test_render_tool_call_writes_values_as_python_literals_in_order():
    parameters = {"q": "東京", "limit": 2.5, "exact": True, "page": None,
                  "filters": {"tags": ["a", "b"], "nested": {"x": False}}}
    assert render_tool_call("search", parameters) == (
        "```python\n"
        "tool_call(q='東京', limit=2.5, exact=True, page=None, "
        "filters={'tags': ['a', 'b'], 'nested': {'x': False}})\n"
        "```"
    )


def test_render_tool_call_without_parameters():
    assert render_tool_call("now", {}) == "```python\ntool_call()\n```"


def test_render_interpreter_code():
    assert render_interpreter_code("print(1)") == "```python\nprint(1)\n```"


# --- the exact text a ChatGLM3 model generates ------------------------------------------------

def _generated_reply(tokenizer, metadata: str, text: str) -> str:
    """What generation decodes to: the assistant message after `<|assistant|>`, up to the stop
    token, decoded with special tokens skipped (REFERENCE.md's message layout)."""
    ids = ([tokenizer.role_token_id("assistant")] + tokenizer.encode_text(metadata + "\n")
           + tokenizer.encode_text(text) + [tokenizer.get_command("<|observation|>")])
    return tokenizer.decode(ids[1:], skip_special_tokens=True)


def test_parses_a_tool_call_decoded_by_the_real_tokenizer(real_tokenizer):
    parameters = {"city": "東京", "days": 3, "units": {"temp": "C", "wind": None}, "alerts": True}
    decoded = _generated_reply(real_tokenizer, "get_weather", render_tool_call("get_weather", parameters))
    # SentencePiece puts the text segment's dummy-prefix space before the fence.
    assert decoded == "get_weather\n ```python\n" + \
        "tool_call(city='東京', days=3, units={'temp': 'C', 'wind': None}, alerts=True)\n```"
    reply = parse_assistant_reply(decoded)
    assert reply.error is None
    assert reply.tool_call == ToolCall("get_weather", parameters)
    assert reply.metadata == "get_weather" and reply.code is None


def test_parses_a_plain_answer_decoded_by_the_real_tokenizer(real_tokenizer):
    decoded = _generated_reply(real_tokenizer, "", "Paris is sunny.\n明天也是晴天。")
    assert decoded == "\n Paris is sunny.\n明天也是晴天。"
    reply = parse_assistant_reply(decoded)
    assert reply == AssistantReply(metadata="", content="Paris is sunny.\n明天也是晴天。")


def test_parses_interpreter_code_decoded_by_the_real_tokenizer(real_tokenizer):
    code = "import math\nfor i in range(3):\n    print(math.sqrt(i))"
    decoded = _generated_reply(real_tokenizer, "interpreter", render_interpreter_code(code))
    reply = parse_assistant_reply(decoded)
    assert (reply.metadata, reply.code, reply.tool_call, reply.error) == ("interpreter", code, None, None)


# --- round trips --------------------------------------------------------------------------------

ROUND_TRIP_PARAMETERS = [
    {"city": "Paris", "days": 3},
    {},
    {"nested": {"a": [1, 2, {"b": None}], "c": {"d": {"e": [True, False]}}}},
    {"none": None, "yes": True, "no": False, "zero": 0, "negative": -7, "big": 2**70},
    {"pi": 3.14159, "tiny": 1e-05, "huge": 1.5e300, "negative": -2.5, "whole": 3.0},
    {"unicode": "東京 café 😀", "quotes": "it's \"quoted\"", "newline": "a\nb\tc\\d", "empty": ""},
    {"list_of_objects": [{"name": "x", "tags": []}, {"name": "y", "tags": ["z"]}]},
    {"from": "USD", "to": "EUR", "amount": 10},  # `from` is a Python keyword (real ToolAlpaca key)
]


@pytest.mark.parametrize("parameters", ROUND_TRIP_PARAMETERS)
@pytest.mark.parametrize("prefix", ["", " "])
def test_tool_call_round_trip(parameters, prefix):
    reply = parse_assistant_reply("lookup\n" + prefix + render_tool_call("lookup", parameters))
    assert reply.error is None
    assert reply.tool_call == ToolCall("lookup", parameters)
    for key, value in parameters.items():  # same types, not just equal values (True vs 1, 3.0 vs 3)
        assert type(reply.tool_call.parameters[key]) is type(value)


@pytest.mark.parametrize("code", [
    "print('hello')",
    "import numpy as np\n\ndef f(x):\n    return x * 2\n\nprint(f(np.arange(3)))",
    "    indented = True\n",
    "s = '```'  # a fence inside the code\nprint(s)",
    "",
])
def test_interpreter_round_trip(code):
    reply = parse_assistant_reply("interpreter\n" + render_interpreter_code(code))
    assert (reply.code, reply.tool_call, reply.error) == (code, None, None)


def test_json_literals_are_accepted_at_any_depth():
    reply = parse_assistant_reply(
        "api\n```python\ntool_call(flag=true, missing=null, data={'a': [false, null, 1]})\n```")
    assert reply.error is None
    assert reply.tool_call.parameters == {"flag": True, "missing": None, "data": {"a": [False, None, 1]}}


def test_code_block_tagged_py_or_untagged_is_accepted():
    for opening in ("```py\n", "```\n", "``` python \n"):
        reply = parse_assistant_reply("api\n" + opening + "tool_call(a=1)\n```")
        assert reply.tool_call == ToolCall("api", {"a": 1}), opening


# --- metadata and plain answers -----------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("\nHello", ("", "Hello")),
    ("\n Hello\nworld", ("", "Hello\nworld")),
    (" \n 你好", ("", "你好")),
    ("Hello", ("", "Hello")),
    ("", ("", "")),
    ("\n", ("", "")),
    # plain answers whose leading newline was stripped
    ("Sure!\nHere it is.", ("", "Sure!\nHere it is.")),
    ("Hello\nworld", ("", "Hello\nworld")),
    ("你好，我是助手。\n有什么可以帮你？", ("", "你好，我是助手。\n有什么可以帮你？")),
    ("The answer:\n42", ("", "The answer:\n42")),
    # metadata: followed by a code block, or reads like a function name
    ("get_weather\n ```python\ntool_call()\n```", ("get_weather", "```python\ntool_call()\n```")),
    ("天气\n```python\ntool_call()\n```", ("天气", "```python\ntool_call()\n```")),
    ("[Optional]updateUserProfile\nno code", ("[Optional]updateUserProfile", "no code")),
    ("searchBooks\nno code", ("searchBooks", "no code")),
    ("text-to-speech\nno code", ("text-to-speech", "no code")),
    ("interpreter\nno code", ("interpreter", "no code")),
])
def test_split_metadata(text, expected):
    assert split_metadata(text) == expected


def test_plain_answer_has_no_call_and_no_error():
    reply = parse_assistant_reply("\n 北京今天晴，气温 25 度。")
    assert reply == AssistantReply(metadata="", content="北京今天晴，气温 25 度。")
    assert not reply.looks_like_call


# --- malformed calls: never raise, keep the text, say why ---------------------------------------

MALFORMED = [
    ("syntax error", "api\n```python\ntool_call(city='Paris'\n```", "was never closed"),
    ("positional argument", "api\n```python\ntool_call('Paris', days=3)\n```", "positional"),
    ("non-literal value", "api\n```python\ntool_call(city=__import__('os').getcwd())\n```",
     "'city' is not a literal"),
    ("name as value", "api\n```python\ntool_call(city=Paris)\n```", "'city' is not a literal"),
    ("nan is not a literal", "api\n```python\ntool_call(x=float('nan'))\n```", "not a literal"),
    ("missing closing fence", "api\n```python\ntool_call(city='Paris')", "no closing"),
    ("cut mid-fence", "api\n```python\ntool_call(city='Paris')\n``", "no closing"),
    ("text after the fence", "api\n```python\ntool_call(a=1)\n```\nand more", "text follows"),
    ("metadata without code block", "get_weather\nIt will be sunny.", "no ```python code block"),
    ("fence without newline", "api\n```python tool_call(a=1)```", "not followed by a new line"),
    ("other language", "api\n```json\n{\"a\": 1}\n```", "'json', not python"),
    ("keyword unpacking", "api\n```python\ntool_call(**{'a': 1})\n```", "unpacks"),
    ("repeated keyword", "api\n```python\ntool_call(a=1, a=2)\n```", "repeats the keyword 'a'"),
    ("another function", "api\n```python\nget_weather(a=1)\n```", "calls 'get_weather'"),
    ("method call", "api\n```python\ntools.tool_call(a=1)\n```", "calls 'tools.tool_call'"),
    ("not a call", "api\n```python\nx = 1\n```", "not a valid tool_call"),
    ("two statements", "api\n```python\ntool_call(a=1)\ntool_call(b=2)\n```", "not a valid tool_call"),
    ("empty code", "api\n```python\n\n```", "not a valid tool_call"),
    ("no tool name", "\n```python\ntool_call(city='Paris')\n```", "without a tool name"),
    ("no tool name, no newline", "tool_call(city='Paris')", "without a tool name"),
    ("too deep", "api\n```python\ntool_call(a=" + "[" * 300 + "]" * 300 + ")\n```", "not a valid"),
]


@pytest.mark.parametrize("kind, text, why", MALFORMED, ids=[case[0] for case in MALFORMED])
def test_malformed_call_sets_error_and_keeps_text(kind, text, why):
    reply = parse_assistant_reply(text)
    assert reply.tool_call is None and reply.code is None
    assert reply.error is not None and why in reply.error, reply.error
    assert reply.content == split_metadata(text)[1]
    assert reply.looks_like_call


def test_malformed_interpreter_turn_sets_error():
    reply = parse_assistant_reply("interpreter\n```python\nprint(1)")
    assert reply.code is None and "no closing" in reply.error


def test_parsing_never_executes_code(tmp_path):
    marker = tmp_path / "executed"
    text = f"api\n```python\ntool_call(x=open({str(marker)!r}, 'w').write('x'))\n```"
    reply = parse_assistant_reply(text)
    assert reply.tool_call is None and "not a literal" in reply.error
    assert not marker.exists()


def test_every_truncation_of_a_reply_parses_or_explains():
    text = "get_weather\n ```python\n" + \
        "tool_call(city='東京', days=3, opts={'a': [1, None, true]}, from='x')\n```"
    for end in range(len(text) + 1):
        reply = parse_assistant_reply(text[:end])
        assert (reply.tool_call is None) == (end < len(text))
        assert reply.tool_call is not None or reply.error is not None or not reply.looks_like_call


def test_random_garbage_never_raises():
    rng = random.Random(0)
    alphabet = "tool_call(=)[]{},'\"\n` ab1.\\:#*-天"
    for _ in range(2000):
        body = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        for text in (body, "api\n```python\n" + body + "\n```", "api\n```python\ntool_call(" + body):
            reply = parse_assistant_reply(text)
            assert isinstance(reply, AssistantReply)
            if reply.looks_like_call and reply.tool_call is None and reply.code is None:
                assert reply.error
