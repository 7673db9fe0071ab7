"""An OpenAI-compatible chat server for a (fine-tuned) ChatGLM3 model, with a web chat page at `/`.

    MODEL_PATH=models/base PT_PATH=output/pt python api_server.py           # base + P-Tuning prefix
    python api_server.py --model output/full --tokenizer models/base --port 8000
    curl http://127.0.0.1:8000/v1/chat/completions -H "Content-Type: application/json" \\
         -d '{"model": "chatglm3", "messages": [{"role": "user", "content": "Hello"}]}'

Endpoints: `POST /v1/chat/completions` (streaming or not, with tools), `GET /v1/models`, `GET /`
(web/chat.html). Requests are generated one at a time, in arrival order.

How OpenAI messages become ChatGLM3 messages (exactly as training renders them):
- `tools` = [{"type": "function", "function": F}, ...] -> a first system message
  `tools_system_prompt([F, ...])`: the function specs (name, description, parameters), the shape
  a `tools` list has in the training data. `tool_choice: "none"` leaves them out.
- system / developer / user -> the same native role; text content parts are joined.
- an assistant message with `tool_calls` -> its text (if any) as a plain assistant message, then
  per call an assistant message with metadata = the function name and text =
  `render_tool_call(name, arguments)`, each followed by its `tool` result as an observation.
And back: the model may write a plain message, then `<|assistant|>` and a tool call (the layout of
ToolAlpaca training data). The plain parts become `content`, the calls `tool_calls`
(`finish_reason: "tool_calls"`); a reply that looks like a call but cannot be read is returned
as text.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException
from starlette.responses import StreamingResponse

from chatglm3_finetune.chat_engine import DEFAULT_TEMPERATURE, DEFAULT_TOP_P, ChatModel
from chatglm3_finetune.chat_parsing import ToolCall, parse_assistant_reply
from chatglm3_finetune.chat_format import render_tool_call
from chatglm3_finetune.chat_format import Message, tools_system_prompt

logger = logging.getLogger("api_server")

WEB_PAGE = Path(__file__).resolve().parent / "web" / "chat.html"
DEFAULT_MAX_TOKENS = 1024
MAX_STOP_STRINGS = 4
HEARTBEAT_S = 0.5  # while a tool call is being written (nothing to send), a comment line this often
SYSTEM_ROLES = ("system", "developer")
KNOWN_ROLES = (*SYSTEM_ROLES, "user", "assistant", "tool")


# ---- errors -------------------------------------------------------------------------------------

class RequestError(Exception):
    """A request the server refuses; becomes an OpenAI-style error body with this status."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None, status: int = 400,
                 error_type: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.code, self.status, self.error_type = message, param, code, status, error_type

    def body(self) -> dict:
        return error_body(self.message, self.error_type, self.param, self.code)


def error_body(message: str, error_type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


# ---- requests: OpenAI JSON -> ChatGLM3 messages and generation options --------------------------

@dataclass
class ChatRequest:
    messages: list[Message]
    max_tokens: int | None = None
    temperature: float = DEFAULT_TEMPERATURE
    top_p: float = DEFAULT_TOP_P
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    seed: int | None = None

    def sampling(self) -> dict:
        """chat_engine options: temperature 0 means greedy decoding."""
        return {"do_sample": self.temperature > 0, "temperature": self.temperature, "top_p": self.top_p}


def parse_chat_request(body: Any) -> ChatRequest:
    """A validated ChatRequest from a decoded JSON body; RequestError (400) says what is wrong."""
    if not isinstance(body, dict):
        raise RequestError(f"the request body must be a JSON object, found {_json_type(body)}")
    _optional(body, "model", str)
    if body.get("functions") is not None or body.get("function_call") is not None:
        raise RequestError("'functions' and 'function_call' are the legacy API: send 'tools' instead", "functions")
    n = _optional(body, "n", int)
    if n not in (None, 1):
        raise RequestError("only n=1 is supported", "n")
    if _optional(body, "logprobs", bool):
        raise RequestError("logprobs are not supported", "logprobs")
    max_tokens = _optional(body, "max_tokens", int)
    max_completion_tokens = _optional(body, "max_completion_tokens", int)
    max_tokens = max_completion_tokens if max_completion_tokens is not None else max_tokens
    if max_tokens is not None and max_tokens < 1:
        raise RequestError(f"max_tokens must be at least 1, got {max_tokens}", "max_tokens")
    temperature = _optional(body, "temperature", float)
    if temperature is not None and not 0 <= temperature <= 2:
        raise RequestError(f"temperature must be between 0 and 2, got {temperature}", "temperature")
    top_p = _optional(body, "top_p", float)
    if top_p is not None and not 0 < top_p <= 1:
        raise RequestError(f"top_p must be above 0 and at most 1, got {top_p}", "top_p")
    stream_options = _optional(body, "stream_options", dict) or {}
    return ChatRequest(
        messages=chat_messages(body.get("messages"), body.get("tools"), body.get("tool_choice")),
        max_tokens=max_tokens,
        temperature=DEFAULT_TEMPERATURE if temperature is None else float(temperature),
        top_p=DEFAULT_TOP_P if top_p is None else float(top_p),
        stop=_stop_strings(body.get("stop")),
        stream=bool(_optional(body, "stream", bool)),
        include_usage=bool(stream_options.get("include_usage")),
        seed=_optional(body, "seed", int),
    )


def chat_messages(messages: Any, tools: Any = None, tool_choice: Any = None) -> list[Message]:
    """The ChatGLM3 messages of an OpenAI `messages` list (+ `tools`), in training's layout."""
    if messages is None:
        raise RequestError("'messages' is required: a list of {role, content} objects", "messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list of {role, content} objects", "messages")
    specs = tool_specs(tools)
    if tool_choice not in (None, "auto", "none"):
        raise RequestError("tool_choice must be 'auto' or 'none': the model cannot be forced to call a tool",
                           "tool_choice")
    rendered = [Message("system", "", tools_system_prompt(specs), False)] if specs and tool_choice != "none" else []
    index = 0
    while index < len(messages):
        message, param = messages[index], f"messages[{index}]"
        role = _role(message, param)
        if role in SYSTEM_ROLES:
            rendered.append(Message("system", "", message_text(message, param), False))
        elif role == "user":
            rendered.append(Message("user", "", message_text(message, param), False))
        elif role == "tool":
            rendered.append(Message("observation", "", message_text(message, param), False))
        else:
            text = message_text(message, param, required=False)
            calls = _tool_calls(message.get("tool_calls"), f"{param}.tool_calls")
            if text.strip() or not calls:
                rendered.append(Message("assistant", "", text, False))
            if calls:
                end = index + 1
                while end < len(messages) and isinstance(messages[end], dict) and messages[end].get("role") == "tool":
                    end += 1
                results = [(messages[i], f"messages[{i}]") for i in range(index + 1, end)]
                rendered += _calls_with_results(calls, results)
                index = end
                continue
        index += 1
    return rendered


def tool_specs(tools: Any) -> list:
    """The function objects of an OpenAI `tools` list, as rendered into the tools system prompt."""
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise RequestError("'tools' must be a list of {type: 'function', function: {...}} objects", "tools")
    specs = []
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(function, dict):
            raise RequestError("each tool must be {type: 'function', function: {name, description, parameters}}",
                               f"tools[{i}]")
        if not isinstance(function.get("name"), str) or not function["name"]:
            raise RequestError("a function needs a non-empty string 'name'", f"tools[{i}].function.name")
        specs.append(function)
    return specs


def message_text(message: dict, param: str, required: bool = True) -> str:
    """A message's content as text: a string, or the joined text of its content parts."""
    content = message.get("content")
    if content is None:
        if required:
            raise RequestError(f"a {message['role']} message needs 'content'", f"{param}.content")
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for i, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise RequestError("only text content parts ({type: 'text', text: ...}) are supported",
                                   f"{param}.content[{i}]")
            texts.append(part["text"])
        return "\n".join(texts)
    raise RequestError(f"content must be a string or a list of text parts, found {_json_type(content)}",
                       f"{param}.content")


@dataclass
class RequestedCall:
    id: str | None
    name: str
    arguments: dict


def _role(message: Any, param: str) -> str:
    if not isinstance(message, dict):
        raise RequestError(f"each message must be an object with 'role' and 'content', found {_json_type(message)}",
                           param)
    role = message.get("role")
    if role not in KNOWN_ROLES:
        raise RequestError(f"role {role!r} is not one of {', '.join(KNOWN_ROLES)}", f"{param}.role")
    if message.get("function_call") is not None:
        raise RequestError("'function_call' is the legacy API: send 'tool_calls' instead", f"{param}.function_call")
    return role


def _tool_calls(calls: Any, param: str) -> list[RequestedCall]:
    if calls is None:
        return []
    if not isinstance(calls, list):
        raise RequestError("tool_calls must be a list", param)
    parsed = []
    for i, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise RequestError("a tool call needs function.name", f"{param}[{i}].function")
        arguments = function.get("arguments")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError as e:
                raise RequestError(f"function.arguments is not valid JSON ({e.msg})",
                                   f"{param}[{i}].function.arguments") from None
        if not isinstance(arguments, dict):
            raise RequestError("function.arguments must be a JSON object (as a string)",
                               f"{param}[{i}].function.arguments")
        parsed.append(RequestedCall(call.get("id"), function["name"], arguments))
    return parsed


def _calls_with_results(calls: list[RequestedCall], results: list[tuple[dict, str]]) -> list[Message]:
    """Each call followed by its result (matched by tool_call_id, else in order), as ChatGLM3 has it."""
    unused = list(results)
    call_ids = {call.id for call in calls if call.id}
    rendered = []
    for call in calls:
        match = next((r for r in unused if call.id and r[0].get("tool_call_id") == call.id), None)
        if match is None:
            match = next((r for r in unused if r[0].get("tool_call_id") not in call_ids), None)
        rendered.append(Message("assistant", call.name, render_tool_call(call.name, call.arguments), False))
        if match is not None:
            unused.remove(match)
            rendered.append(Message("observation", "", message_text(*match), False))
    rendered += [Message("observation", "", message_text(*result), False) for result in unused]
    return rendered


def _stop_strings(stop: Any) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise RequestError("stop must be a string or a list of strings", "stop")
    if len(stops) > MAX_STOP_STRINGS:
        raise RequestError(f"at most {MAX_STOP_STRINGS} stop strings are allowed", "stop")
    return [s for s in stops if s]


def _optional(body: dict, name: str, kind: type):
    """body[name] when present and not null, checked to be of kind (an int passes as a float)."""
    value = body.get(name)
    if value is None:
        return None
    numeric = kind in (int, float) and not isinstance(value, bool)
    if numeric and (isinstance(value, int) or (kind is float and isinstance(value, float))):
        return value
    if not numeric and isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "an object"}
    raise RequestError(f"{name} must be {names[kind]}, found {_json_type(value)}", name)


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
             float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


# ---- replies: generated text -> OpenAI message --------------------------------------------------

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


# ---- the server ---------------------------------------------------------------------------------

class ChatServer:
    """The model behind the endpoints: one generation at a time, in arrival order."""

    def __init__(self, chat: ChatModel, model_name: str, max_context: int | None = None,
                 default_max_tokens: int = DEFAULT_MAX_TOKENS):
        self.chat, self.model_name, self.default_max_tokens = chat, model_name, default_max_tokens
        self.max_context = max_context or getattr(getattr(chat.model, "config", None), "max_position_embeddings", None)
        self.lock = anyio.Lock()
        self.created = int(time.time())

    def prompt(self, request: ChatRequest) -> tuple[list[int], int]:
        """(prompt ids, max new tokens); RequestError when the prompt leaves no room to answer."""
        prompt_ids = self.chat.chat_input_ids(request.messages)
        wanted = request.max_tokens or self.default_max_tokens
        if self.max_context is None:
            return prompt_ids, wanted
        room = self.max_context - len(prompt_ids)
        if room < 1:
            raise RequestError(f"This model's maximum context length is {self.max_context} tokens, but the messages "
                               f"hold {len(prompt_ids)} tokens. Shorten the conversation (drop old turns or long "
                               f"tool results).", "messages", "context_length_exceeded")
        return prompt_ids, min(wanted, room)

    def models(self) -> dict:
        return {"object": "list", "data": [self.model_card()]}

    def model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "local"}

    async def complete(self, request: ChatRequest, prompt_ids: list[int], max_new_tokens: int,
                       is_disconnected=None) -> dict | None:
        """The chat.completion object, or None when the client left while the request waited its turn."""
        started = time.perf_counter()
        async with self.lock:
            if is_disconnected is not None and await is_disconnected():
                return None
            _seed(request.seed)
            completion = await anyio.to_thread.run_sync(lambda: self.chat.generate_completions(
                [prompt_ids], max_new_tokens, stop_strings=request.stop, **request.sampling())[0])
        content, calls = assistant_message(self.chat.reply_segments(completion.token_ids, completion.text))
        message = {"role": "assistant", "content": content if content or not calls else None}
        if calls:
            message["tool_calls"] = [tool_call_json(call) for call in calls]
        finish_reason = "tool_calls" if calls else completion.finish_reason
        _log_request(len(prompt_ids), len(completion.token_ids), finish_reason, started)
        return {"id": _completion_id(), "object": "chat.completion", "created": int(time.time()),
                "model": self.model_name,
                "choices": [{"index": 0, "message": message, "finish_reason": finish_reason, "logprobs": None}],
                "usage": _usage(len(prompt_ids), len(completion.token_ids))}

    async def stream_events(self, request: ChatRequest, prompt_ids: list[int], max_new_tokens: int,
                            is_disconnected) -> AsyncIterator[str]:
        """Server-sent events: a role chunk, content / tool-call chunks, the finish chunk, `[DONE]`.

        Leaving the iteration early (the client went away) stops the generation."""
        completion_id, created = _completion_id(), int(time.time())

        def chunk(delta: dict, finish_reason: str | None = None) -> str:
            return _sse({"id": completion_id, "object": "chat.completion.chunk", "created": created,
                         "model": self.model_name,
                         "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]})

        started = time.perf_counter()
        async with self.lock:
            if await is_disconnected():
                return
            _seed(request.seed)
            stream = self.chat.stream(prompt_ids, max_new_tokens, stop_strings=request.stop, **request.sampling())
            reply, text = StreamedReply(), ""
            try:
                yield chunk({"role": "assistant", "content": ""})
                last_sent = time.monotonic()
                while (piece := await anyio.to_thread.run_sync(next, stream, None)) is not None:
                    text += piece
                    deltas = reply.update(self.chat.reply_segments(stream.token_ids, text))
                    for delta in deltas:
                        yield chunk(delta)
                    if deltas or time.monotonic() - last_sent > HEARTBEAT_S:
                        if not deltas:  # a write is how a server notices that the client has gone
                            yield ": generating\n\n"
                        last_sent = time.monotonic()
                for delta in reply.update(self.chat.reply_segments(stream.token_ids, stream.text), final=True):
                    yield chunk(delta)
                finish_reason = "tool_calls" if reply.calls else stream.finish_reason
                yield chunk({}, finish_reason)
                if request.include_usage:
                    yield _sse({"id": completion_id, "object": "chat.completion.chunk", "created": created,
                                "model": self.model_name, "choices": [],
                                "usage": _usage(len(prompt_ids), len(stream.token_ids))})
                _log_request(len(prompt_ids), len(stream.token_ids), finish_reason, started)
            except Exception as e:  # the headers are sent: report it in the stream
                logger.exception("generation failed")
                yield _sse(error_body(f"generation failed: {e}", "server_error"))
            finally:
                with anyio.CancelScope(shield=True):  # stop the generation thread before the next request
                    await anyio.to_thread.run_sync(stream.close)
        yield "data: [DONE]\n\n"


def _seed(seed: int | None) -> None:
    if seed is not None:
        import torch

        torch.manual_seed(seed)


def _completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def _log_request(prompt_tokens: int, completion_tokens: int, finish_reason: str, started: float) -> None:
    logger.info("%d prompt + %d new tokens in %.2f s (%s)", prompt_tokens, completion_tokens,
                time.perf_counter() - started, finish_reason)


class ClosingStreamingResponse(StreamingResponse):
    """Closes the event generator however the response ends, so a client that leaves stops the
    generation at once (not when the generator is garbage-collected)."""

    async def stream_response(self, send) -> None:
        try:
            await super().stream_response(send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()


def create_app(chat: ChatModel, model_name: str = "chatglm3", max_context: int | None = None,
               default_max_tokens: int = DEFAULT_MAX_TOKENS, cors_origins: list[str] | None = None):
    """The FastAPI app serving `chat`; `max_context` defaults to the model's max_position_embeddings."""
    server = ChatServer(chat, model_name, max_context, default_max_tokens)
    app = FastAPI(title="ChatGLM3 chat API", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.chat_server = server
    if cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=cors_origins, allow_methods=["*"], allow_headers=["*"])

    def error_response(error: RequestError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(RequestError)
    async def request_error(request: Request, error: RequestError):
        return error_response(error)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError):
        first = error.errors()[0] if error.errors() else {}
        param = ".".join(str(part) for part in first.get("loc", ())[1:]) or None
        return error_response(RequestError(first.get("msg", "invalid request"), param))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException):
        if error.status_code == 404:
            message = (f"no such endpoint: {request.method} {request.url.path}. This server has POST "
                       f"/v1/chat/completions, GET /v1/models and the chat page at /")
            return error_response(RequestError(message, code="not_found", status=404))
        if error.status_code == 405:
            return error_response(RequestError(f"{request.method} is not allowed on {request.url.path}",
                                               code="method_not_allowed", status=405))
        return error_response(RequestError(str(error.detail), status=error.status_code))

    @app.exception_handler(Exception)
    async def server_error(request: Request, error: Exception):
        logger.exception("request failed")
        return JSONResponse(error_body(f"the server failed: {error}", "server_error"), status_code=500)

    @app.get("/v1/models")
    async def list_models():
        return server.models()

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str):
        if model_id != server.model_name:
            raise RequestError(f"model {model_id!r} is not served here; this server serves {server.model_name!r}",
                               "model", "model_not_found", status=404)
        return server.model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RequestError(f"the request body is not valid JSON ({e}); send a JSON object with 'messages'") from None
        chat_request = parse_chat_request(body)
        prompt_ids, max_new_tokens = server.prompt(chat_request)
        if chat_request.stream:
            events = server.stream_events(chat_request, prompt_ids, max_new_tokens, request.is_disconnected)
            return ClosingStreamingResponse(events, media_type="text/event-stream",
                                            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        answer = await server.complete(chat_request, prompt_ids, max_new_tokens, request.is_disconnected)
        return answer if answer is not None else Response(status_code=499)  # nobody is there to read it

    @app.get("/", response_class=HTMLResponse)
    async def chat_page():
        if not WEB_PAGE.is_file():
            raise RequestError(f"the chat page {WEB_PAGE} is missing from this install", code="not_found", status=404)
        return HTMLResponse(WEB_PAGE.read_text(encoding="utf-8"))

    return app


# ---- command line ---------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None, environ: dict | None = None) -> argparse.Namespace:
    """Flags, with MODEL_PATH, TOKENIZER_PATH, PT_PATH and LORA_PATH from the environment as defaults."""
    env = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(description="Serve a ChatGLM3 model with an OpenAI-compatible chat API.")
    parser.add_argument("--model", default=env.get("MODEL_PATH"),
                        help="base or fully fine-tuned model folder (env MODEL_PATH)")
    parser.add_argument("--tokenizer", default=env.get("TOKENIZER_PATH"),
                        help="tokenizer folder, when the model folder has none (env TOKENIZER_PATH)")
    parser.add_argument("--pt-checkpoint", default=env.get("PT_PATH"),
                        help="P-Tuning v2 checkpoint folder on top of --model (env PT_PATH)")
    parser.add_argument("--pt-pre-seq-len", type=int, default=None,
                        help="prefix length, only for an original-format checkpoint that does not store it")
    parser.add_argument("--lora", default=env.get("LORA_PATH"), help="LoRA adapter folder (env LORA_PATH)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow the model folder's own code")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 exposes it to the network)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--model-name", default=None,
                        help="the model id clients see in /v1/models (default: the checkpoint's folder name)")
    parser.add_argument("--max-context", type=int, default=None,
                        help="longest prompt + answer in tokens (default: the model's max_position_embeddings)")
    parser.add_argument("--default-max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                        help="answer length when a request gives no max_tokens")
    parser.add_argument("--cors-origin", action="append", default=[],
                        help="a web origin allowed to call the API from a browser (repeatable; the page at / "
                             "needs none)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: torch's choice; 1 is often fastest for small "
                             "models on a busy machine)")
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    if not args.model:
        parser.error("give the model folder with --model or MODEL_PATH")
    for name in ("port", "max_context", "default_max_tokens", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {value}")
    return args


def served_model_name(args: argparse.Namespace) -> str:
    return args.model_name or Path(args.pt_checkpoint or args.lora or args.model).resolve().name


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    from chatglm3_finetune.chat_engine import load_chat_model
    from chatglm3_finetune.model_loading import ModelLoadError

    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        chat = load_chat_model(args.model, tokenizer=args.tokenizer, pt_checkpoint=args.pt_checkpoint,
                               pt_pre_seq_len=args.pt_pre_seq_len, lora=args.lora, device=args.device,
                               dtype=args.dtype, trust_remote_code=args.trust_remote_code)
    except ModelLoadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    app = create_app(chat, served_model_name(args), args.max_context, args.default_max_tokens, args.cors_origin)
    logger.info("serving %s on http://%s:%d (chat page at /)", served_model_name(args), args.host, args.port)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level.lower())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
