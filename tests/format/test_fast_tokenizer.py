"""The fast tokenizer.json twin gives exactly ChatGLM3's SentencePiece ids, decodes the same, and its
chat template renders the ChatGLM3 message rule; saved folders load with AutoTokenizer (no remote code)."""

import json
import random

import pytest
from transformers import AutoTokenizer, TokenizersBackend

from chatglm3_finetune.format.chat_format import Message, build_chat_input, tools_system_prompt
from chatglm3_finetune.format.tokenizer import ChatGLM3Tokenizer, load_tokenizer
from conftest import shared_path
from chatglm3_finetune.format.chat_format import TOOLS_SYSTEM_PROMPT as TOOLS_PROMPT
from chatglm3_finetune.format.fast_tokenizer import build_fast_tokenizer
from chatglm3_finetune.model.tiny_model import train_tiny_sentencepiece

GMASK, SOP, SYSTEM, USER, ASSISTANT = 64790, 64792, 64794, 64795, 64796


def random_texts(count: int, seed: int = 0) -> list[str]:
    """Strings mixing ASCII, runs of spaces, newlines, tabs, digits, Chinese, emoji and rare bytes."""
    alphabet = (list("abcdefghijklmnopqrstuvwxyzABCXYZ0123456789.,:;!?'\"()[]{}<>#*-_/\\|=+")
                + [" "] * 12 + ["\n"] * 4 + ["\t", "\r", "\u3000", "\xa0"]
                + list("你好世界的是了我不在人有这中大为上个国年到说们") + list("😀🎉👍🏻🚀") + ["\x00", "\x7f", "é", "ß", "€"])
    rng = random.Random(seed)
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))) for _ in range(count)]


def toolalpaca_texts() -> list[str]:
    def strings(value):
        if isinstance(value, str):
            yield value
        elif isinstance(value, dict):
            for item in value.values():
                yield from strings(item)
        elif isinstance(value, list):
            for item in value:
                yield from strings(item)

    with open(shared_path("toolalpaca", "train_sample.json"), encoding="utf-8") as f:
        return list(strings(json.load(f)))


def advertisegen_texts() -> list[str]:
    with open(shared_path("advertisegen", "dev.json"), encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    return [text for record in records for text in (record["content"], record["summary"])]


@pytest.fixture(scope="module")
def real_fast(real_tokenizer):
    return build_fast_tokenizer(real_tokenizer.vocab_file)


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    model_file = train_tiny_sentencepiece(str(tmp_path_factory.mktemp("tiny-spm")))
    return load_tokenizer(model_file), build_fast_tokenizer(model_file)


def assert_same_ids(slow, fast, texts):
    expected = slow.sp.encode(texts)
    got = fast(texts, add_special_tokens=False)["input_ids"]
    mismatches = [(t, e, g) for t, e, g in zip(texts, expected, got) if e != g]
    assert not mismatches, f"{len(mismatches)} of {len(texts)} differ, first: {mismatches[0]}"


def test_known_ids(real_fast):
    encode = lambda text: real_fast.encode(text, add_special_tokens=False)  # noqa: E731
    assert encode("Answer") == [20115]
    assert encode("\n") == [30910, 13]
    assert encode("你好") == [36474, 54591]
    assert encode("") == []
    # the literal words "sop"/"eop" are text, never the special tokens
    assert 64792 not in encode("people sop eop") and 64793 not in encode("people sop eop")
    assert [real_fast.convert_ids_to_tokens(i) for i in range(64789, 64798)] == [
        "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>", "<|assistant|>",
        "<|observation|>"]


def test_same_ids_as_sentencepiece_on_shared_data(real_tokenizer, real_fast):
    assert_same_ids(real_tokenizer, real_fast, advertisegen_texts())
    assert_same_ids(real_tokenizer, real_fast, toolalpaca_texts())


def test_same_ids_on_random_strings(real_tokenizer, real_fast, tiny_pair):
    texts = random_texts(1500) + [" lead", "  two", "\nnewline first", " \n ", "   ", "a  b   c    "]
    assert_same_ids(real_tokenizer, real_fast, texts)
    assert_same_ids(*tiny_pair, texts)


def test_decode_matches_slow(real_tokenizer, real_fast, tiny_pair):
    texts = random_texts(300, seed=1) + advertisegen_texts()[:50]
    for slow, fast in ((real_tokenizer, real_fast), tiny_pair):
        for text in texts:
            ids = slow.encode_text(text)
            assert fast.decode(ids) == slow.decode(ids), repr(text)


def test_plain_call_adds_gmask_sop_like_slow(real_tokenizer, real_fast):
    assert real_fast("hi there")["input_ids"] == real_tokenizer("hi there")["input_ids"] == [GMASK, SOP, 14980, 627]
    assert real_fast("a", "b")["input_ids"] == real_tokenizer("a", "b")["input_ids"]


def chat_start(slow):
    return [slow.get_command("[gMASK]"), slow.get_command("sop")]


def message_ids(slow, role, content, metadata=""):
    """REFERENCE.md's rule: role token + encode(metadata + "\\n") + encode(content)."""
    return [slow.role_token_id(role)] + slow.encode_text(metadata + "\n") + slow.encode_text(content)


@pytest.mark.parametrize("which", ["real", "tiny"])
def test_chat_template_equals_message_rule(which, real_tokenizer, real_fast, tiny_pair):
    slow, fast = (real_tokenizer, real_fast) if which == "real" else tiny_pair
    contents = random_texts(200, seed=2) + advertisegen_texts()[:40]
    rng = random.Random(3)
    for i in range(0, len(contents) - 1, 2):
        system, user = contents[i], contents[i + 1]
        chat = [{"role": "system", "content": system}, {"role": "user", "content": user}]
        expected = chat_start(slow) + message_ids(slow, "system", system) + message_ids(slow, "user", user)
        got = fast.apply_chat_template(chat, return_dict=False)
        assert got == expected, (system, user)
        if rng.random() < 0.3:
            reply, metadata = contents[rng.randrange(len(contents))], rng.choice(["", "get_weather"])
            chat.append({"role": "assistant", "metadata": metadata, "content": reply})
            expected += message_ids(slow, "assistant", reply, metadata)
            got = fast.apply_chat_template(chat, return_dict=False, add_generation_prompt=True)
            assert got == expected + [slow.role_token_id("assistant")]


def test_chat_template_golden_layout(real_fast):
    chat = [{"role": "system", "content": "You are nice."}, {"role": "user", "content": "你好"}]
    assert real_fast.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == (
        "[gMASK]<sop><|system|>\n You are nice.<|user|>\n 你好<|assistant|>")
    assert real_fast.apply_chat_template(chat, return_dict=False, add_generation_prompt=True) == [
        GMASK, SOP, SYSTEM, 30910, 13, 809, 383, 3528, 30930, USER, 30910, 13, 36474, 54591, ASSISTANT]


def test_chat_template_tools_system_prompt(real_tokenizer, real_fast):
    tools = [{"name": "get_weather", "description": "查询天气", "parameters": {"city": {"type": "string"}}},
             {"name": "add", "parameters": {"a": 1, "b": [1, 2]}}]
    chat = [{"role": "user", "content": "北京天气?"}]
    tools_text = TOOLS_PROMPT + json.dumps(tools, indent=4, ensure_ascii=False)
    assert tools_text.startswith("Answer the following questions as best as you can. "
                                 "You have access to the following tools:\n[\n    {\n        \"name\"")
    rendered = real_fast.apply_chat_template(chat, tools=tools, tokenize=False)
    assert rendered == "[gMASK]<sop><|system|>\n " + tools_text + "<|user|>\n 北京天气?"
    expected = [GMASK, SOP] + message_ids(real_tokenizer, "system", tools_text) + message_ids(
        real_tokenizer, "user", "北京天气?")
    assert real_fast.apply_chat_template(chat, tools=tools, return_dict=False) == expected


def test_chat_template_unwraps_openai_tools_as_vllm_passes_them(real_tokenizer, real_fast):
    weather = {"name": "get_weather", "description": "查询天气",
               "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
    bare = {"name": "add", "parameters": {"a": 1}}  # a bare spec, as our data sets write them, stays as it is
    chat = [{"role": "user", "content": "北京天气?"}]
    expected = build_chat_input(real_tokenizer, [Message("system", "", tools_system_prompt([weather, bare]), False),
                                                 Message("user", "", "北京天气?", False)])
    wrapped = [{"type": "function", "function": weather}, bare]
    assert real_fast.apply_chat_template(chat, tools=wrapped, add_generation_prompt=True, return_dict=False) == expected
    assert real_fast.apply_chat_template(chat, tools=[], add_generation_prompt=True, return_dict=False) == (
        build_chat_input(real_tokenizer, [Message("user", "", "北京天气?", False)]))


def test_chat_template_tool_result_is_an_observation(real_tokenizer, real_fast):
    chat = [{"role": "user", "content": "x"}, {"role": "tool", "content": '{"ok": true}'}]
    expected = [GMASK, SOP] + message_ids(real_tokenizer, "user", "x") + message_ids(
        real_tokenizer, "observation", '{"ok": true}')
    assert real_fast.apply_chat_template(chat, return_dict=False) == expected
    with pytest.raises(Exception, match="no role"):
        real_fast.apply_chat_template([{"role": "wizard", "content": "x"}], tokenize=False)


def test_saved_folder_loads_as_fast_and_as_slow(tiny_pair, tmp_path):
    slow, _ = tiny_pair
    slow.save_pretrained(str(tmp_path))
    fast = AutoTokenizer.from_pretrained(str(tmp_path))
    assert isinstance(fast, TokenizersBackend)
    assert isinstance(load_tokenizer(str(tmp_path)), ChatGLM3Tokenizer)
    assert (fast.eos_token_id, fast.pad_token_id, fast.padding_side) == (2, 0, "left")
    assert len(fast) == len(slow)
    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": " hello\nworld"}]
    expected = chat_start(slow) + message_ids(slow, "system", "be brief") + message_ids(
        slow, "user", " hello\nworld") + [slow.role_token_id("assistant")]
    assert fast.apply_chat_template(chat, return_dict=False, add_generation_prompt=True) == expected
