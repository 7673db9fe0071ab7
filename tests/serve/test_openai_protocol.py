"""openai_protocol on plain decoded JSON, as a data reader would call it: errors name the field."""

from dataclasses import replace

import pytest

from chatglm3_finetune.format.chat_format import Message, conversation_messages, tools_system_prompt
from chatglm3_finetune.data.formats import openai_record
from chatglm3_finetune.serve.openai_protocol import ProtocolError, openai_messages_to_chatglm, parse_chat_request


@pytest.mark.parametrize("messages,tools,param,fragment", [
    ([], None, "messages", "non-empty list"),
    ([{"role": "user", "content": "x"}, {"role": "bot", "content": "y"}], None, "messages[1].role",
     "'bot' is not one of system, developer, user, assistant, tool"),
    ([{"role": "assistant", "function_call": {"name": "f"}}], None, "messages[0]", "legacy"),
    ([{"role": "assistant", "tool_calls": [{"function": {"arguments": "{}"}}]}], None,
     "messages[0].tool_calls[0].function.name", "required"),
    ([{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "[1]"}}]}], None,
     "messages[0].tool_calls[0].function.arguments", "JSON object"),
    ([{"role": "tool"}], None, "messages[0]", "needs 'content'"),
    ([{"role": "user", "content": "x"}], [{"type": "function", "function": {"name": ""}}], "tools[0].function",
     "non-empty string 'name'"),
    ([{"role": "user", "content": "x"}], "tools", "tools", "valid list"),
])
def test_bad_messages_name_the_field(messages, tools, param, fragment):
    with pytest.raises(ProtocolError) as error:
        openai_messages_to_chatglm(messages, tools)
    assert error.value.param == param
    assert fragment in error.value.message


def test_results_without_ids_follow_their_calls_in_order_and_extra_results_stay():
    calls = [{"type": "function", "function": {"name": "f", "arguments": {"a": 1}}},
             {"type": "function", "function": {"name": "g"}}]
    rendered = openai_messages_to_chatglm([
        {"role": "user", "content": "go"}, {"role": "assistant", "content": "Thinking.", "tool_calls": calls},
        {"role": "tool", "content": "F"}, {"role": "tool", "content": "G"}, {"role": "tool", "content": "extra"}])
    assert rendered == [
        Message("user", "", "go", False), Message("assistant", "", "Thinking.", False),
        Message("assistant", "f", "```python\ntool_call(a=1)\n```", False), Message("observation", "", "F", False),
        Message("assistant", "g", "```python\ntool_call()\n```", False), Message("observation", "", "G", False),
        Message("observation", "", "extra", False)]


def test_a_call_may_lack_its_result_and_a_result_its_call():
    calls = [{"id": "a", "type": "function", "function": {"name": "f", "arguments": "{}"}},
             {"id": "b", "type": "function", "function": {"name": "g", "arguments": "{}"}}]
    rendered = openai_messages_to_chatglm([
        {"role": "tool", "content": "early"}, {"role": "assistant", "content": "", "tool_calls": calls},
        {"role": "tool", "tool_call_id": "zz", "content": "unknown id"}, {"role": "tool", "tool_call_id": "a",
                                                                          "content": "A"}])
    assert rendered == [
        Message("observation", "", "early", False),
        Message("assistant", "f", "```python\ntool_call()\n```", False), Message("observation", "", "A", False),
        Message("assistant", "g", "```python\ntool_call()\n```", False),
        Message("observation", "", "unknown id", False)]  # an unknown id answers the next call in order
    unanswered = [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": calls[:1]}]
    assert openai_messages_to_chatglm(unanswered) == [
        Message("user", "", "x", False), Message("assistant", "f", "```python\ntool_call()\n```", False)]


def test_arguments_nested_too_deeply_are_refused_not_a_crash():
    deep = {"type": "function", "function": {"name": "f", "arguments": "[" * 100_000 + "]" * 100_000}}
    with pytest.raises(ProtocolError) as error:
        openai_messages_to_chatglm([{"role": "assistant", "tool_calls": [deep]}])
    assert error.value.param == "messages[0].tool_calls[0].function.arguments"
    assert "nested too deeply" in error.value.message


def test_a_request_and_a_training_record_of_the_same_messages_render_alike():
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]
    messages = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Paris"}, {"type": "text", "text": "and Oslo?"}]},
        {"role": "assistant", "content": "Checking.", "tool_calls": [
            {"id": "p", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}},
            {"id": "o", "type": "function", "function": {"name": "weather", "arguments": {"city": "Oslo"}}}]},
        {"role": "tool", "tool_call_id": "o", "content": "snow"},
        {"role": "tool", "tool_call_id": "p", "content": "sun"},
        {"role": "assistant", "content": "Sun in Paris, snow in Oslo."}]
    record, _, _ = openai_record({"messages": messages, "tools": tools})
    served = openai_messages_to_chatglm(messages, tools)
    assert served == [replace(message, loss=False) for message in conversation_messages(record)]
    assert served[0] == Message("system", "", tools_system_prompt([tools[0]["function"]]), False)
    assert [m.text for m in served[4:8]] == ["```python\ntool_call(city='Paris')\n```", "sun",
                                             "```python\ntool_call(city='Oslo')\n```", "snow"]


def test_request_fields_and_defaults():
    request = parse_chat_request({"messages": [{"role": "user", "content": "x"}], "max_tokens": 5,
                                  "max_completion_tokens": 7, "stop": "END", "temperature": 0,
                                  "stream_options": {"include_usage": True}, "presence_penalty": 1})
    assert (request.requested_max_tokens, request.stop_strings, request.temperature, request.include_usage) == (
        7, ["END"], 0.0, True)
    assert parse_chat_request({"messages": [{"role": "user", "content": "x"}], "stop": ["", "a"]}).stop_strings == ["a"]
    with pytest.raises(ProtocolError) as error:
        parse_chat_request({"messages": [{"role": "user", "content": "x"}], "logprobs": True})
    assert error.value.param == "logprobs"


@pytest.mark.parametrize("field", ["temperature", "top_p"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_sampling_values_are_refused_by_name(field, value):
    """Decoded JSON normally holds no NaN (the server's reader refuses it), but a caller in Python can
    pass one: it is "not a finite number", not "above the maximum"."""
    with pytest.raises(ProtocolError) as error:
        parse_chat_request({"messages": [{"role": "user", "content": "x"}], field: value})
    assert (error.value.param, error.value.message) == (field, "Input should be a finite number")


def test_a_misspelled_role_gets_a_did_you_mean():
    with pytest.raises(ProtocolError) as error:
        openai_messages_to_chatglm([{"role": "user", "content": "x"}, {"role": "assitant", "content": "y"}])
    assert error.value.param == "messages[1].role"
    assert error.value.message == ("'assitant' is not one of system, developer, user, assistant, tool; did you mean "
                                   "'assistant'?")
