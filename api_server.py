"""An OpenAI-compatible chat server for a (fine-tuned) ChatGLM3 model, with a web chat page at `/`.

    MODEL_PATH=models/base PT_PATH=output/pt python api_server.py           # base + P-Tuning prefix
    python api_server.py --model output/full --tokenizer models/base --port 8000 --api-key "$KEY"
    curl http://127.0.0.1:8000/v1/chat/completions -H "Content-Type: application/json" \\
         -H "Authorization: Bearer $KEY" \\
         -d '{"model": "chatglm3", "messages": [{"role": "user", "content": "Hello"}]}'

Endpoints: `POST /v1/chat/completions` (streaming or not, with tools), `GET /v1/models`, `GET /`
(web/chat.html). Concurrent requests are decoded together (`batched_decoding`); the OpenAI
protocol and its translation to ChatGLM3 messages live in `chatglm3_finetune.serve.openai_protocol`.
This file is the app (limits, errors, the API key, streaming) and the command line.

Every wait is bounded: the body must arrive within --body-timeout and fit --max-body-bytes (413),
at most --max-queue requests wait for a batch slot (429 + Retry-After), max_tokens is capped by
--max-tokens-limit, a client that stops reading a stream for --send-timeout is dropped, and a
client that leaves (streaming or not) frees its batch slot at the next token.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import logging
import os
import sys
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator

import anyio
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException
from starlette.responses import StreamingResponse

from chatglm3_finetune.data import strict_json
from chatglm3_finetune.serve.batched_decoding import BatchedDecoder, GenerationJob, Progress, QueueFull, Sampling
from chatglm3_finetune.serve.chat_engine import DEFAULT_TEMPERATURE, DEFAULT_TOP_P, ChatModel
from chatglm3_finetune.serve.openai_protocol import (ChatCompletionRequest, ProtocolError, StreamedReply, completion_id,
                                               completion_message, error_body, parse_chat_request, usage)

logger = logging.getLogger("api_server")

WEB_PAGE = Path(__file__).resolve().parent / "web" / "chat.html"
DEFAULT_MAX_TOKENS = 1024
DEFAULT_MODEL_NAME = "chatglm3"  # what the docs' examples and the web page send
HEARTBEAT_S = 0.5  # while nothing can be sent (a tool call is being written), a comment line this often
DISCONNECT_POLL_S = 0.25  # how often a non-streaming request checks that its client is still there


@dataclass(frozen=True)
class ServerLimits:
    max_batch_size: int = 16  # requests decoded together; 1 turns batching off
    max_queue: int = 64  # requests waiting for a batch slot before 429
    max_tokens: int = 4096  # the largest max_tokens a request may ask for
    max_body_bytes: int = 4 * 1024 * 1024
    body_timeout_s: float = 30.0  # to receive the whole request body
    send_timeout_s: float = 30.0  # for a client to take the next piece of a stream


class RequestError(Exception):
    """A request the server refuses; becomes an OpenAI-style error body with this status."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None, status: int = 400,
                 error_type: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.message, self.param, self.code, self.status, self.error_type = message, param, code, status, error_type
        self.headers = headers

    def response(self) -> JSONResponse:
        return JSONResponse(error_body(self.message, self.error_type, self.param, self.code), status_code=self.status,
                            headers=self.headers)


def decode_json(raw: bytes):
    """The decoded body; RequestError for bytes that are not JSON, too deep, or numbers too long, and
    for what Python's json would let through: NaN, Infinity (e.g. `"temperature": NaN`) and a key
    given twice, each named by its parameter."""
    try:
        return strict_json.loads(raw)
    except strict_json.StrictJsonError as e:
        raise RequestError(str(e), strict_json.field_path(e.location) or None) from None
    except RecursionError:
        raise RequestError("the request body is nested too deeply to read") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, integers past Python's digit limit
        raise RequestError(f"the request body is not valid JSON ({e}); send a JSON object with 'messages'") from None


# ---- the server ---------------------------------------------------------------------------------

class ProgressRelay:
    """Hands Progress from the model's thread to the requests' queues on the event loop, waking the
    loop once for everything that piled up meanwhile (one step of a batch of 32 is one wake-up, not 32)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.lock, self.pending, self.scheduled = loop, threading.Lock(), [], False

    def put(self, queue: asyncio.Queue, progress: Progress) -> bool:
        """False when the event loop has closed: nobody is waiting any more."""
        with self.lock:
            self.pending.append((queue, progress))
            if self.scheduled:
                return True
            self.scheduled = True
        try:
            self.loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:
            return False
        return True

    def _deliver(self) -> None:
        with self.lock:
            pending, self.pending, self.scheduled = self.pending, [], False
        for queue, progress in pending:
            queue.put_nowait(progress)


async def next_update(updates: asyncio.Queue, timeout: float) -> Progress | None:
    """The next Progress, or None after `timeout` s (no timer when one is already waiting)."""
    if not updates.empty():
        return updates.get_nowait()
    try:
        return await asyncio.wait_for(updates.get(), timeout)
    except TimeoutError:
        return None


@dataclass
class PreparedRequest:
    request: ChatCompletionRequest
    prompt_ids: list[int]
    max_new_tokens: int


class ChatServer:
    """The model behind the endpoints: requests become jobs of one BatchedDecoder."""

    def __init__(self, chat: ChatModel, model_name: str, max_context: int | None = None,
                 default_max_tokens: int = DEFAULT_MAX_TOKENS, limits: ServerLimits = ServerLimits()):
        self.chat, self.model_name, self.limits = chat, model_name, limits
        self.default_max_tokens = min(default_max_tokens, limits.max_tokens)
        self.max_context = max_context or getattr(getattr(chat.model, "config", None), "max_position_embeddings", None)
        self.decoder = BatchedDecoder(chat, limits.max_batch_size, limits.max_queue)
        self.relay: ProgressRelay | None = None
        self.created = int(time.time())

    def prepare(self, raw: bytes) -> PreparedRequest:
        """Body bytes -> validated request, prompt ids, answer length (CPU work: run it in a thread)."""
        try:
            request = parse_chat_request(decode_json(raw))
            messages = request.chatglm_messages()
        except ProtocolError as e:
            raise RequestError(e.message, e.param, e.code) from None
        if request.model is not None and request.model != self.model_name:
            raise self.unknown_model(request.model)
        prompt_ids = self.chat.chat_input_ids(messages)
        wanted = request.requested_max_tokens or self.default_max_tokens
        if wanted > self.limits.max_tokens:
            raise RequestError(f"max_tokens {wanted} is above this server's limit of {self.limits.max_tokens}; ask "
                               f"for fewer (the operator sets the limit with --max-tokens-limit)", "max_tokens")
        if self.max_context is None:
            return PreparedRequest(request, prompt_ids, wanted)
        room = self.max_context - len(prompt_ids)
        if room < 1:
            raise RequestError(f"This model's maximum context length is {self.max_context} tokens, but the messages "
                               f"hold {len(prompt_ids)} tokens. Shorten the conversation (drop old turns or long "
                               f"tool results).", "messages", "context_length_exceeded")
        return PreparedRequest(request, prompt_ids, min(wanted, room))

    def unknown_model(self, name: str) -> RequestError:
        """OpenAI's answer to a model it does not have: 404, code model_not_found."""
        return RequestError(f"The model `{name}` does not exist: this server serves `{self.model_name}` (GET "
                            f"/v1/models lists it); send that as 'model', or leave 'model' out", "model",
                            "model_not_found", status=404)

    def models(self) -> dict:
        return {"object": "list", "data": [self.model_card()]}

    def model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "local"}

    def submit(self, prepared: PreparedRequest) -> tuple[GenerationJob, asyncio.Queue]:
        """Queues the generation; its Progress snapshots arrive on the returned queue. 429 when full."""
        if self.relay is None:
            self.relay = ProgressRelay(asyncio.get_running_loop())
        updates: asyncio.Queue = asyncio.Queue()

        def on_progress(progress: Progress) -> None:
            if not self.relay.put(updates, progress):
                job.cancel()

        request = prepared.request
        temperature = DEFAULT_TEMPERATURE if request.temperature is None else request.temperature
        sampling = Sampling(temperature, DEFAULT_TOP_P if request.top_p is None else request.top_p, request.seed)
        job = GenerationJob(prepared.prompt_ids, prepared.max_new_tokens, sampling, request.stop_strings, on_progress)
        try:
            self.decoder.submit(job)
        except QueueFull as e:
            raise RequestError(f"the server is busy ({e}); retry in {e.retry_after} s", None, "rate_limit_exceeded",
                               429, "requests", {"Retry-After": str(e.retry_after)}) from None
        return job, updates

    async def complete(self, prepared: PreparedRequest, is_disconnected) -> dict | None:
        """The chat.completion object, or None when the client left (its generation is stopped)."""
        started = time.perf_counter()
        job, updates = self.submit(prepared)
        try:
            progress, checked = None, time.monotonic()
            while progress is None or not progress.done:
                if time.monotonic() - checked > DISCONNECT_POLL_S:
                    if await is_disconnected():
                        return None
                    checked = time.monotonic()
                progress = await next_update(updates, DISCONNECT_POLL_S) or progress
        finally:
            job.cancel()
        if progress.error is not None:
            raise progress.error
        message, finish_reason = await anyio.to_thread.run_sync(
            lambda: completion_message(self.chat.reply_segments(progress.token_ids, progress.text),
                                       progress.finish_reason))
        _log_request(len(prepared.prompt_ids), len(progress.token_ids), finish_reason, started)
        return {"id": completion_id(), "object": "chat.completion", "created": int(time.time()),
                "model": self.model_name,
                "choices": [{"index": 0, "message": message, "finish_reason": finish_reason, "logprobs": None}],
                "usage": usage(len(prepared.prompt_ids), len(progress.token_ids))}

    async def stream_events(self, prepared: PreparedRequest, job: GenerationJob,
                            updates: asyncio.Queue) -> AsyncIterator[str]:
        """Server-sent events: a role chunk, content / tool-call chunks, the finish chunk, `[DONE]`;
        a failure after the headers went out is an error event. Closing the iteration stops the job."""
        stream_id, created, started = completion_id(), int(time.time()), time.perf_counter()

        def chunk(delta: dict, finish_reason: str | None = None) -> str:
            return _sse({"id": stream_id, "object": "chat.completion.chunk", "created": created,
                         "model": self.model_name,
                         "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]})

        try:
            yield chunk({"role": "assistant", "content": ""})
            reply, shown, progress, last_sent = StreamedReply(), "", None, time.monotonic()
            while progress is None or not progress.done:
                if time.monotonic() - last_sent > HEARTBEAT_S:  # writing is how a server notices a client left
                    yield ": generating\n\n"
                    last_sent = time.monotonic()
                update = await next_update(updates, HEARTBEAT_S)
                if update is None:
                    continue
                progress = update
                shown += progress.piece
                while not progress.done and not updates.empty():  # catch up on what queued meanwhile
                    progress = updates.get_nowait()
                    shown += progress.piece
                if progress.error is not None:
                    raise progress.error
                deltas = await self._deltas(reply, progress, shown)
                for delta in deltas:
                    yield chunk(delta)
                    last_sent = time.monotonic()
            finish_reason = "tool_calls" if reply.calls else progress.finish_reason
            yield chunk({}, finish_reason)
            if prepared.request.include_usage:
                yield _sse({"id": stream_id, "object": "chat.completion.chunk", "created": created,
                            "model": self.model_name, "choices": [],
                            "usage": usage(len(prepared.prompt_ids), len(progress.token_ids))})
            _log_request(len(prepared.prompt_ids), len(progress.token_ids), finish_reason, started)
        except Exception as e:  # the headers are sent: report it in the stream
            logger.exception("generation failed")
            yield _sse(error_body(f"generation failed: {e}", "server_error"))
        finally:
            job.cancel()
        yield "data: [DONE]\n\n"


    async def _deltas(self, reply: StreamedReply, progress: Progress, shown: str) -> list[dict]:
        """The stream's next deltas. While the reply is one open message (no `<|assistant|>` yet) this
        is string slicing, done here; reading a finished message (a tool call: `ast`) goes to a thread."""
        def deltas() -> list[dict]:
            text = progress.text if progress.done else shown
            return reply.update(self.chat.reply_segments(progress.token_ids, text), final=progress.done)

        if not progress.done and self.chat.assistant_id not in progress.token_ids:
            return deltas()
        return await anyio.to_thread.run_sync(deltas)


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def _log_request(prompt_tokens: int, completion_tokens: int, finish_reason: str, started: float) -> None:
    logger.info("%d prompt + %d new tokens in %.2f s (%s)", prompt_tokens, completion_tokens,
                time.perf_counter() - started, finish_reason)


class EventStreamResponse(StreamingResponse):
    """Server-sent events that end however the client goes: leaving closes the event generator
    at once (which stops the generation), and a client that takes no data for `send_timeout_s`
    is dropped instead of holding its slot."""

    def __init__(self, events: AsyncIterator[str], job: GenerationJob, send_timeout_s: float):
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.job, self.send_timeout_s = job, send_timeout_s

    async def stream_response(self, send) -> None:
        async def send_in_time(message) -> None:
            with anyio.fail_after(self.send_timeout_s):
                await send(message)

        try:
            await super().stream_response(send_in_time)
        except TimeoutError:
            logger.warning("a client stopped reading its stream for %.0f s: dropped", self.send_timeout_s)
        finally:
            self.job.cancel()  # also when the events never started
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()


async def read_body(request: Request, limits: ServerLimits) -> bytes:
    """The request body, refused with 413 beyond `max_body_bytes` and 408 if it takes too long."""
    too_large = RequestError(f"the request body is larger than this server's limit of {limits.max_body_bytes} "
                             f"bytes; send a shorter conversation", code="request_too_large", status=413)
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limits.max_body_bytes:
        raise too_large
    chunks, size = [], 0
    try:
        with anyio.fail_after(limits.body_timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limits.max_body_bytes:
                    raise too_large
                chunks.append(chunk)
    except TimeoutError:
        raise RequestError(f"the request body did not arrive within {limits.body_timeout_s:.0f} s",
                           code="request_timeout", status=408) from None
    return b"".join(chunks)


def api_key_check(api_key: str | None):
    """A FastAPI dependency: 401 unless `Authorization: Bearer <api_key>` (no check without a key)."""
    async def check(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), api_key.encode()):
            message = ("Incorrect API key provided." if request.headers.get("authorization") else
                       "No API key provided: send the header 'Authorization: Bearer YOUR_KEY'.")
            raise RequestError(message, code="invalid_api_key", status=401, headers={"WWW-Authenticate": "Bearer"})
    return check


def create_app(chat: ChatModel, model_name: str = DEFAULT_MODEL_NAME, max_context: int | None = None,
               default_max_tokens: int = DEFAULT_MAX_TOKENS, cors_origins: list[str] | None = None,
               limits: ServerLimits = ServerLimits(), api_key: str | None = None):
    """The FastAPI app serving `chat`; `max_context` defaults to the model's max_position_embeddings;
    with `api_key`, every /v1 endpoint needs `Authorization: Bearer <api_key>`."""
    server = ChatServer(chat, model_name, max_context, default_max_tokens, limits)

    @asynccontextmanager
    async def lifespan(app):
        yield
        await anyio.to_thread.run_sync(server.decoder.close)

    app = FastAPI(title="ChatGLM3 chat API", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.chat_server = server
    if cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=cors_origins, allow_methods=["*"], allow_headers=["*"])

    @app.exception_handler(RequestError)
    async def request_error(request: Request, error: RequestError):
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError):
        first = error.errors()[0] if error.errors() else {}
        param = ".".join(str(part) for part in first.get("loc", ())[1:]) or None
        return RequestError(first.get("msg", "invalid request"), param).response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException):
        if error.status_code == 404:
            message = (f"no such endpoint: {request.method} {request.url.path}. This server has POST "
                       f"/v1/chat/completions, GET /v1/models and the chat page at /")
            return RequestError(message, code="not_found", status=404).response()
        if error.status_code == 405:
            return RequestError(f"{request.method} is not allowed on {request.url.path}",
                                code="method_not_allowed", status=405).response()
        return RequestError(str(error.detail), status=error.status_code).response()

    @app.exception_handler(Exception)
    async def server_error(request: Request, error: Exception):
        logger.exception("request failed: a bug in the server")
        return JSONResponse(error_body(f"the server failed: {error}", "server_error"), status_code=500)

    api = APIRouter(prefix="/v1", dependencies=[Depends(api_key_check(api_key))])

    @api.get("/models")
    async def list_models():
        return server.models()

    @api.get("/models/{model_id:path}")
    async def get_model(model_id: str):
        if model_id != server.model_name:
            raise server.unknown_model(model_id)
        return server.model_card()

    @api.post("/chat/completions")
    async def chat_completions(request: Request):
        raw = await read_body(request, limits)
        prepared = await anyio.to_thread.run_sync(server.prepare, raw)
        if prepared.request.stream:
            job, updates = server.submit(prepared)
            return EventStreamResponse(server.stream_events(prepared, job, updates), job, limits.send_timeout_s)
        answer = await server.complete(prepared, request.is_disconnected)
        return answer if answer is not None else Response(status_code=499)  # nobody is there to read it

    app.include_router(api)

    @app.get("/", response_class=HTMLResponse)
    async def chat_page():
        if not WEB_PAGE.is_file():
            raise RequestError(f"the chat page {WEB_PAGE} is missing from this install", code="not_found", status=404)
        return HTMLResponse(WEB_PAGE.read_text(encoding="utf-8"))

    return app


# ---- command line ---------------------------------------------------------------------------------

LIMIT_FLAGS = (  # flag, ServerLimits field, type, help
    ("--max-batch-size", "max_batch_size", int, "requests decoded together (1 turns batching off)"),
    ("--max-queue", "max_queue", int, "requests that may wait for a batch slot; beyond that: 429 with Retry-After"),
    ("--max-tokens-limit", "max_tokens", int, "the largest max_tokens a request may ask for (larger: 400)"),
    ("--max-body-bytes", "max_body_bytes", int, "largest request body (larger: 413)"),
    ("--body-timeout", "body_timeout_s", float, "seconds for a client to send its whole request body (then 408)"),
    ("--send-timeout", "send_timeout_s", float, "seconds a streaming client may stop reading before it is dropped"),
)


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
    parser.add_argument("--model-name", default=DEFAULT_MODEL_NAME,
                        help=f"the model id clients see in /v1/models and must send as 'model' (another one gets "
                             f"404 model_not_found; default: {DEFAULT_MODEL_NAME})")
    parser.add_argument("--max-context", type=int, default=None,
                        help="longest prompt + answer in tokens (default: the model's max_position_embeddings)")
    parser.add_argument("--default-max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                        help="answer length when a request gives no max_tokens")
    parser.add_argument("--cors-origin", action="append", default=[],
                        help="a web origin allowed to call the API from a browser (repeatable; the page at / "
                             "needs none)")
    parser.add_argument("--api-key", default=env.get("API_KEY"),
                        help="require 'Authorization: Bearer KEY' on /v1 (env API_KEY; the web page asks for it)")
    defaults = ServerLimits()
    for flag, name, kind, text in LIMIT_FLAGS:
        parser.add_argument(flag, dest=name, type=kind, default=getattr(defaults, name), help=text)
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: torch's choice; 1 is often fastest for small "
                             "models on a busy machine)")
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    if not args.model:
        parser.error("give the model folder with --model or MODEL_PATH")
    positive = {f"--{name.replace('_', '-')}": name for name in ("port", "max_context", "default_max_tokens", "threads")}
    positive.update({flag: name for flag, name, _, _ in LIMIT_FLAGS if name != "max_queue"})
    for flag, name in positive.items():
        value = getattr(args, name)
        if value is not None and value <= 0:
            parser.error(f"{flag} must be positive, got {value}")
    if args.max_queue < 0:
        parser.error(f"--max-queue must be 0 or more, got {args.max_queue}")
    if args.api_key is not None and not args.api_key.strip():
        parser.error("--api-key (or API_KEY) is empty: give a key, or unset it to serve without one")
    return args


def server_limits(args: argparse.Namespace) -> ServerLimits:
    return ServerLimits(**{name: getattr(args, name) for _, name, _, _ in LIMIT_FLAGS})


def served_model_name(args: argparse.Namespace) -> str:
    return args.model_name


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    from chatglm3_finetune.serve.chat_engine import load_chat_model
    from chatglm3_finetune.model.loading import ModelLoadError

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
    try:
        app = create_app(chat, served_model_name(args), args.max_context, args.default_max_tokens, args.cors_origin,
                         server_limits(args), args.api_key)
    except ValueError as e:  # a model the batched decoder cannot drive
        print(f"error: {e}", file=sys.stderr)
        return 2
    logger.info("serving %s on http://%s:%d (chat page at /)%s", served_model_name(args), args.host, args.port,
                "" if args.api_key else "; no API key: anyone who can reach the port can use the model")
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level.lower())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
