"""The OpenAI chat protocol: pydantic models of a chat-completion request, its messages + tools as
ChatGLM3 `Message`s, and a generated reply as an OpenAI assistant message (whole, or as deltas).

The request's messages are checked here (shapes, types: errors in OpenAI's form), then
translated by `formats.openai_record`, the one OpenAI -> ChatGLM3 translation that training
data uses too, in its lenient mode, and rendered by `chat_format.conversation_messages`, exactly
as training renders its records:
- `tools` = [{"type": "function", "function": F}, ...] -> a first system message listing the
  function specs F (the shape a `tools` list has in the training data); `tool_choice: "none"`
  leaves them out.
- system / developer / user -> the same native role; text content parts are joined by "\\n".
- an assistant message with `tool_calls` -> its text (if any), then per call the call message
  followed by its `tool` result as an observation (matched by `tool_call_id`, else in order).
  Unlike training data, a call may lack its result, and a result with no call is an observation.
And back: the model may write a plain message, then `<|assistant|>` and a tool call (the layout of
ToolAlpaca training data). The plain parts become `content`, the calls `tool_calls`
(`finish_reason: "tool_calls"`); a reply that looks like a call but cannot be read is returned
as text.

`openai_messages_to_chatglm(messages, tools)` takes plain decoded JSON (or the models below) and
raises `ProtocolError(message, param)`, param being a path such as `messages[2].content`.
"""

from __future__ import annotations

import json
import logging
import uuid
from typing import Any, Literal

from pydantic import (BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, TypeAdapter,
                      ValidationError, field_validator, model_validator)

from ..format.chat_format import Message, conversation_messages
from ..format.chat_parsing import ToolCall, parse_assistant_reply
from ..data.formats import OPENAI_ROLES, FormatProblem, openai_record
from ..did_you_mean import did_you_mean
from ..data.records import json_type

logger = logging.getLogger(__name__)

MAX_STOP_STRINGS = 4
SEED_RANGE = (-2**63, 2**64 - 1)  # what torch.Generator.manual_seed accepts


class ProtocolError(ValueError):
    """A request that does not follow the protocol; `param` is the path of the offending field."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.code = message, param, code


def error_body(message: str, error_type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    """The OpenAI error object."""
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def protocol_error(error: ValidationError, prefix: tuple = ()) -> ProtocolError:
    """The problem pydantic found, as a ProtocolError whose param reads `messages[0].role`; of the
    errors a union gives (one per member), the deepest says most."""
    first = max(error.errors(), key=lambda e: len(e["loc"]))
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "missing":
        message = f"'{first['loc'][-1]}' is required"
    elif first["type"] == "extra_forbidden":
        message = f"'{first['loc'][-1]}' is not a field here"
    return ProtocolError(message, param_path((*prefix, *first["loc"])) or None)


_UNION_MEMBERS = {"str", "int", "float", "bool", "dict", "list", "none"}


def param_path(loc: tuple) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part in _UNION_MEMBERS or "[" in part:
            continue  # pydantic names the union member it tried; the user did not write it
        else:
            path += f".{part}" if path else str(part)
    return path


# ---- the request --------------------------------------------------------------------------------

class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextPart(_Model):
    type: Literal["text"]
    text: StrictStr


class FunctionCall(_Model):
    name: StrictStr = Field(min_length=1)
    arguments: StrictStr | dict = "{}"  # read by formats.openai_record, which says what is wrong


class RequestedToolCall(_Model):
    id: StrictStr | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


Content = StrictStr | list[TextPart] | None


class ChatMessage(_Model):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Content = None
    tool_calls: list[RequestedToolCall] | None = None
    tool_call_id: StrictStr | None = None
    name: StrictStr | None = None

    @field_validator("role", mode="before")
    @classmethod
    def _known_role(cls, role):
        if isinstance(role, str) and role not in OPENAI_ROLES:
            raise ValueError(f"{role!r} is not one of {', '.join(OPENAI_ROLES)}{did_you_mean(role, OPENAI_ROLES)}")
        return role

    @model_validator(mode="before")
    @classmethod
    def _an_object(cls, message):
        if not isinstance(message, dict):
            raise ValueError(f"each message must be an object with 'role' and 'content', found {json_type(message)}")
        if message.get("function_call") is not None:
            raise ValueError("'function_call' is the legacy API: send 'tool_calls' instead")
        return message

    @model_validator(mode="after")
    def _content_where_needed(self):
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs 'content'")
        return self


class Tool(_Model):
    type: Literal["function"]
    function: dict[str, Any]  # kept as given: its key order is the order the tools prompt shows

    @field_validator("function")
    @classmethod
    def _named(cls, function: dict) -> dict:
        if not isinstance(function.get("name"), str) or not function["name"]:
            raise ValueError("a function needs a non-empty string 'name'")
        return function


class StreamOptions(_Model):
    include_usage: StrictBool = False


class ChatCompletionRequest(_Model):
    """The fields of POST /v1/chat/completions this server reads (others are ignored)."""

    model: StrictStr | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[Tool] | None = None
    tool_choice: Literal["auto", "none"] | None = None
    max_tokens: StrictInt | None = Field(None, ge=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    temperature: StrictFloat | None = Field(None, ge=0, le=2, allow_inf_nan=False)
    top_p: StrictFloat | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    stop: StrictStr | list[StrictStr] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    seed: StrictInt | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    n: Literal[1] | None = None  # the rest of what is refused (n > 1, logprobs, the legacy functions) is
    logprobs: Literal[False] | None = None  # refused in _an_object, with a message saying what to send instead

    @model_validator(mode="before")
    @classmethod
    def _an_object(cls, body):
        if not isinstance(body, dict):
            raise ValueError(f"the request body must be a JSON object, found {json_type(body)}")
        for legacy in ("functions", "function_call"):
            if body.get(legacy) is not None:
                raise ProtocolError("'functions' and 'function_call' are the legacy API: send 'tools' instead", legacy)
        if body.get("n") not in (None, 1):
            raise ProtocolError("only n=1 is supported", "n")
        if body.get("logprobs"):
            raise ProtocolError("logprobs are not supported", "logprobs")
        if body.get("tool_choice") not in (None, "auto", "none"):
            raise ProtocolError("tool_choice must be 'auto' or 'none': the model cannot be forced to call a tool",
                                "tool_choice")
        return body

    @field_validator("stop")
    @classmethod
    def _few_stops(cls, stop):
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings are allowed")
        return stops

    @property
    def stop_strings(self) -> list[str]:
        return [s for s in self.stop or [] if s]

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def chatglm_messages(self) -> list[Message]:
        return openai_messages_to_chatglm(self.messages, self.tools, self.tool_choice)


def parse_chat_request(body: Any) -> ChatCompletionRequest:
    """A validated request from decoded JSON; ProtocolError says what is wrong and where."""
    try:
        return ChatCompletionRequest.model_validate(body)
    except ValidationError as e:
        return _raise_cause_or(e)


def _raise_cause_or(error: ValidationError, prefix: tuple = ()):
    # ProtocolErrors raised inside validators arrive wrapped; they already carry their param.
    for problem in error.errors():
        cause = problem.get("ctx", {}).get("error")
        if isinstance(cause, ProtocolError):
            raise cause from None
    raise protocol_error(error, prefix) from None


_MESSAGES = TypeAdapter(list[ChatMessage])
_TOOLS = TypeAdapter(list[Tool] | None)


def openai_messages_to_chatglm(messages: list, tools: list | None = None,
                               tool_choice: str | None = None) -> list[Message]:
    """The ChatGLM3 messages of an OpenAI `messages` list (+ `tools`), in training's layout: the
    request is checked here, then translated by `formats.openai_record` (leniently) and
    rendered as training renders records.

    Takes decoded JSON or ChatMessage/Tool models; ProtocolError names the offending field."""
    if not isinstance(messages, list) or not messages:
        raise ProtocolError("'messages' must be a non-empty list of {role, content} objects", "messages")
    try:
        messages = _MESSAGES.validate_python(messages)
    except ValidationError as e:
        _raise_cause_or(e, ("messages",))
    try:
        tools = _TOOLS.validate_python(tools)
    except ValidationError as e:
        _raise_cause_or(e, ("tools",))
    request = {"messages": [message.model_dump(exclude_none=True) for message in messages]}
    if tools and tool_choice != "none":
        request["tools"] = [tool.model_dump() for tool in tools]
    try:
        record, _, _ = openai_record(request, lenient=True)
    except FormatProblem as e:
        raise ProtocolError(e.problem, e.field) from None
    return [Message(m.role, m.metadata, m.text, False) for m in conversation_messages(record)]  # trains nothing


# ---- the reply: generated text -> OpenAI message ------------------------------------------------

def read_segment(text: str) -> tuple[str, ToolCall | None]:
    """(text to show, tool call) of one generated assistant message."""
    reply = parse_assistant_reply(text)
    if reply.tool_call is not None:
        return "", reply.tool_call
    if reply.metadata:  # interpreter code, or a call that could not be read: keep all of it
        if reply.error:
            logger.warning("the reply looks like a tool call but cannot be read: %s", reply.error)
        return f"{reply.metadata}\n{reply.content}", None
    return reply.content, None


def assistant_message(segments: list[str]) -> tuple[str, list[ToolCall]]:
    """(content, tool calls) of a whole reply: its plain messages joined by blank lines, its calls."""
    texts, calls = [], []
    for segment in segments:
        text, call = read_segment(segment)
        if call is not None:
            calls.append(call)
        elif text:
            texts.append(text)
    return "\n\n".join(texts), calls


def tool_call_json(call: ToolCall) -> dict:
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": call.name, "arguments": json.dumps(call.parameters, ensure_ascii=False)}}


def completion_message(segments: list[str], finish_reason: str) -> tuple[dict, str]:
    """(the OpenAI assistant message, its finish_reason) of a whole generated reply."""
    content, calls = assistant_message(segments)
    message = {"role": "assistant", "content": content if content or not calls else None}
    if calls:
        message["tool_calls"] = [tool_call_json(call) for call in calls]
    return message, "tool_calls" if calls else finish_reason


class StreamedReply:
    """Turns the growing reply (its segments, see `chat_engine.split_reply`) into OpenAI deltas that
    add up to `assistant_message`'s result.

    A plain message (empty metadata line) streams as it comes, its trailing blanks held back
    until more text follows; any other message (a tool call) is read whole once it has ended.
    """

    def __init__(self):
        self.done = 0  # segments fully handled
        self.sent = ""  # content of the current plain segment already sent
        self.text_sent = False
        self.calls: list[ToolCall] = []

    def update(self, segments: list[str], final: bool = False) -> list[dict]:
        deltas = []
        for index in range(self.done, len(segments)):
            complete = final or index < len(segments) - 1
            deltas += self._segment_deltas(segments[index], complete)
            if not complete:
                break
            self.done, self.sent = index + 1, ""
        return deltas

    def _segment_deltas(self, segment: str, complete: bool) -> list[dict]:
        head, newline, rest = segment.partition("\n")
        if newline and not head.strip():
            content = rest.strip() if complete else rest.lstrip().rstrip()
            return self._content(content)
        if not complete:
            return []
        text, call = read_segment(segment)
        if call is not None:
            self.calls.append(call)
            return [{"tool_calls": [{"index": len(self.calls) - 1, **tool_call_json(call)}]}]
        return self._content(text)

    def _content(self, content: str) -> list[dict]:
        if len(content) <= len(self.sent):
            return []
        new = content[len(self.sent):]
        if not self.sent and self.text_sent:
            new = "\n\n" + new
        self.sent, self.text_sent = content, True
        return [{"content": new}]


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


__all__ = ["ChatCompletionRequest", "ChatMessage", "ProtocolError", "StreamedReply", "assistant_message",
           "completion_message", "error_body", "openai_messages_to_chatglm", "parse_chat_request", "usage"]
