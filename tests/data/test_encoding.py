"""Golden ChatGLM3 token layouts (id by id against the real tokenizer), labels, truncation and the sanity check."""

import json

from chatglm3_finetune.data.encoding import encode_multi_turn, encode_prompt_response, sanity_check_lines
from chatglm3_finetune.format.chat_format import build_chat_input, conversation_messages

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
