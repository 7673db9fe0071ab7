"""One chat engine for inference.py, evaluation and the API server: a loaded model + tokenizer
that turns ChatGLM3 messages into prompt ids, generates (batched, streamed) and parses replies.

    chat = load_chat_model("models/base", pt_checkpoint="output/pt")     # or lora=..., or a full model
    ids = chat.chat_input_ids([Message("user", "", "Hello", False)])
    reply = chat.reply([Message("user", "", "Hello", False)])            # ChatReply
    reply.segments                                   # its assistant messages, parsed (AssistantReply)
    reply.tool_call                                  # the last one's call, if it is one
    for piece in chat.stream(ids, max_new_tokens=64):                     # text as it is generated
        print(piece, end="")

Generation stops on eos, `<|user|>` and `<|observation|>` (the stop token is not returned).
Generated text is the raw assistant message: its metadata line first (empty for a plain answer,
so plain text starts with "\\n"), then the content; `parse_assistant_reply` reads it, and
`MetadataSplitter` separates the two while streaming.

One reply may hold several assistant messages: `<|assistant|>` is not a stop token, and a model
trained on ToolAlpaca-style data writes a thought, then `<|assistant|>` and the tool call as a
second message (metadata = the tool name). Decoding drops special tokens, so the messages are
cut apart by where `<|assistant|>` stands in the token ids (`split_reply`) and parsed one by one.
Records in the data format become messages with
`chat_format.conversation_messages({"tools": ..., "conversations": [...]})`.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Iterator

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from ..format.chat_parsing import AssistantReply, ToolCall, parse_assistant_reply
from ..data.collation import left_pad
from ..model.inference_loading import load_for_inference
from ..format.chat_format import Message, build_chat_input


DEFAULT_MAX_NEW_TOKENS = 256
DEFAULT_TEMPERATURE = 0.8
DEFAULT_TOP_P = 0.8


@dataclass
class Completion:
    """One generated row: new token ids (no stop token), its text and why it ended.

    finish_reason is "stop" (a stop token or stop string) or "length" (max_new_tokens reached).
    With a stop string, `text` ends before it and `token_ids` end with the token that completed it.
    """

    token_ids: list[int]
    text: str
    finish_reason: str


@dataclass
class ChatReply:
    """The assistant messages of one generated reply, parsed, in order (never empty; blank ones
    are left out), and why generation ended ("stop" or "length").

    The last message says what comes next: a tool call or interpreter code waits for an
    observation. In ToolAlpaca-style replies the first message is the thought before the call.
    """

    segments: list[AssistantReply]
    finish_reason: str

    @classmethod
    def from_texts(cls, texts: list[str], finish_reason: str) -> "ChatReply":
        replies = [parse_assistant_reply(text) for text in texts if text.strip()]
        return cls(replies or [parse_assistant_reply("")], finish_reason)

    @property
    def last(self) -> AssistantReply:
        return self.segments[-1]

    @property
    def tool_call(self) -> ToolCall | None:
        return self.last.tool_call

    @property
    def code(self) -> str | None:
        return self.last.code


class ChatModel:
    """A causal LM (plain, LoRA-merged, fully fine-tuned or a PrefixTuningModel) and its tokenizer."""

    def __init__(self, model, tokenizer):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.stop_token_ids = list(tokenizer.stop_token_ids)
        self.assistant_id = tokenizer.role_token_id("assistant")

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def is_prefix_tuned(self) -> bool:
        from ..model.ptuning.prefix_model import PrefixTuningModel

        return isinstance(self.model, PrefixTuningModel)

    # ---- prompts ----------------------------------------------------------------------------

    def chat_input_ids(self, messages: list[Message]) -> list[int]:
        """`[gMASK] sop` + the messages + `<|assistant|>`, exactly as training renders them."""
        return build_chat_input(self.tokenizer, messages)

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def reply_segments(self, token_ids: list[int], text: str) -> list[str]:
        """The reply's text cut into its assistant messages (see `split_reply`)."""
        return split_reply(token_ids, text, self.assistant_id, self.decode)

    # ---- generation -------------------------------------------------------------------------

    def generate(self, prompt_ids_batch: list[list[int]], max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                 do_sample: bool = False, temperature: float = DEFAULT_TEMPERATURE, top_p: float = DEFAULT_TOP_P,
                 stop_strings: list[str] | None = None, min_new_tokens: int = 0,
                 stop_token_ids: list[int] | None = None) -> list[list[int]]:
        """New token ids per prompt (left-padded batch), without the stop token."""
        return [c.token_ids for c in self.generate_completions(
            prompt_ids_batch, max_new_tokens, do_sample, temperature, top_p, stop_strings, min_new_tokens,
            stop_token_ids)]

    def generate_completions(self, prompt_ids_batch: list[list[int]], max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                             do_sample: bool = False, temperature: float = DEFAULT_TEMPERATURE,
                             top_p: float = DEFAULT_TOP_P, stop_strings: list[str] | None = None,
                             min_new_tokens: int = 0, stop_token_ids: list[int] | None = None) -> list[Completion]:
        """Like `generate`, with each row's text and finish reason. `min_new_tokens` forbids the
        stop tokens before that many new tokens (benchmarks use it to time fixed lengths);
        `stop_token_ids` replaces the chat stop tokens (evaluation adds `<|assistant|>`)."""
        if not prompt_ids_batch:
            return []
        stops = list(stop_token_ids) if stop_token_ids is not None else self.stop_token_ids
        input_ids, attention_mask = left_pad(prompt_ids_batch, self.tokenizer.pad_token_id, self.device)
        width = input_ids.shape[1]
        criteria = StoppingCriteriaList([StopOnStrings(self.tokenizer, stop_strings, width)] if stop_strings else [])
        options = self._generation_kwargs(max_new_tokens, do_sample, temperature, top_p, min_new_tokens)
        output = self.model.generate(input_ids=input_ids, attention_mask=attention_mask, stopping_criteria=criteria,
                                     **{**options, "eos_token_id": stops})
        return [self._completion(row.tolist(), max_new_tokens, stop_strings, stops) for row in output[:, width:]]

    def stream(self, prompt_ids: list[int], max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, do_sample: bool = False,
               temperature: float = DEFAULT_TEMPERATURE, top_p: float = DEFAULT_TOP_P,
               stop_strings: list[str] | None = None, min_new_tokens: int = 0) -> "TextStream":
        """Decoded text pieces of one prompt's reply as they are generated (see TextStream)."""
        options = self._generation_kwargs(max_new_tokens, do_sample, temperature, top_p, min_new_tokens)
        return TextStream(self, prompt_ids, options, stop_strings or [])

    def reply(self, messages: list[Message], max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, do_sample: bool = False,
              temperature: float = DEFAULT_TEMPERATURE, top_p: float = DEFAULT_TOP_P) -> ChatReply:
        """The assistant's next messages, parsed (plain answers, a tool call, interpreter code)."""
        completion = self.generate_completions([self.chat_input_ids(messages)], max_new_tokens, do_sample,
                                               temperature, top_p)[0]
        segments = self.reply_segments(completion.token_ids, completion.text)
        return ChatReply.from_texts(segments, completion.finish_reason)

    def _generation_kwargs(self, max_new_tokens, do_sample, temperature, top_p, min_new_tokens) -> dict:
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        kwargs = {"max_new_tokens": max_new_tokens, "do_sample": do_sample, "eos_token_id": self.stop_token_ids,
                  "pad_token_id": self.tokenizer.pad_token_id, "num_beams": 1}
        if do_sample:
            if temperature <= 0:
                raise ValueError(f"temperature must be positive when sampling, got {temperature}")
            kwargs.update(temperature=temperature, top_p=top_p, top_k=0)
        if min_new_tokens:
            kwargs["min_new_tokens"] = min_new_tokens
        return kwargs

    def _completion(self, new_ids: list[int], max_new_tokens: int, stop_strings: list[str] | None,
                    stop_token_ids: list[int]) -> Completion:
        ids, finish = cut_at_stop_token(new_ids, stop_token_ids)
        if finish is None:
            finish = "length" if len(ids) >= max_new_tokens else "stop"
        text = self.decode(ids)
        position = first_stop_string(text, stop_strings or [])
        if position is not None:
            text, finish = text[:position[0]], "stop"
            ids = ids[:shortest_prefix_containing(ids, position[1], self.decode)]
        return Completion(ids, text, finish)


# ---- helpers for batches, stops and replies ---------------------------------------------------------

def split_reply(token_ids: list[int], text: str, assistant_id: int, decode) -> list[str]:
    """The text of a generated reply cut into the assistant messages it holds.

    `token_ids` are the new tokens, `text` their decoded text (special tokens skipped) or a prefix
    of it: a stop string ended it, or streaming holds its tail back. Each `<|assistant|>` at index
    i starts a new message at character len(decode(token_ids[:i])); cuts past the end of `text`
    are not reached yet. A cut that is reached always yields a segment, empty if nothing follows
    yet, so every segment but the last is complete.
    """
    if assistant_id not in token_ids:
        return [text]
    cuts = [0] + [len(decode(token_ids[:i])) for i, token in enumerate(token_ids) if token == assistant_id]
    cuts = [cut for cut in cuts if cut <= len(text)]
    return [text[start:end] for start, end in zip(cuts, cuts[1:] + [len(text)])]


def cut_at_stop_token(ids: list[int], stop_token_ids: list[int]) -> tuple[list[int], str | None]:
    """The ids before the first stop token, and "stop" if there was one."""
    for i, token in enumerate(ids):
        if token in stop_token_ids:
            return ids[:i], "stop"
    return ids, None


def first_stop_string(text: str, stop_strings: list[str]) -> tuple[int, str] | None:
    """(position, stop string) of the earliest stop string in text, or None."""
    found = [(text.find(s), s) for s in stop_strings if s and s in text]
    return min(found) if found else None


def shortest_prefix_containing(ids: list[int], stop_string: str, decode) -> int:
    for end in range(1, len(ids) + 1):
        if stop_string in decode(ids[:end]):
            return end
    return len(ids)


def held_back_length(text: str, stop_strings: list[str]) -> int:
    """How many trailing characters to keep back while streaming: an incomplete UTF-8 character
    (decoded as U+FFFD) or the start of a stop string."""
    hold = 0
    if text.endswith("\ufffd"):
        hold = len(text) - len(text.rstrip("\ufffd"))
    for stop in stop_strings:
        for size in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:size]):
                hold = max(hold, size)
                break
    return hold


class StopOnStrings(StoppingCriteria):
    """Ends a row once its new text (special tokens skipped) contains one of the stop strings."""

    def __init__(self, tokenizer, stop_strings: list[str], prompt_width: int):
        self.tokenizer, self.stop_strings, self.prompt_width = tokenizer, list(stop_strings), prompt_width

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.BoolTensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_width:], skip_special_tokens=True)
        done = [any(stop in text for stop in self.stop_strings) for text in texts]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class _Cancelled(StoppingCriteria):
    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class _TokenQueue(BaseStreamer):
    """Receives each new token from `generate` (the first `put` is the prompt, skipped)."""

    def __init__(self):
        self.queue: queue.Queue = queue.Queue()
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.queue.put(value.reshape(-1).tolist())

    def end(self) -> None:
        pass


_FINISHED = object()


class ReplyText:
    """A reply's text as its tokens arrive: it ends at a stop token, a stop string or
    `max_new_tokens`, and `add` hands out only what can no longer change (not an incomplete UTF-8
    character, not the start of a stop string); the pieces add up to `text`."""

    def __init__(self, decode, stop_token_ids: list[int], stop_strings: list[str], max_new_tokens: int):
        self.decode, self.stop_token_ids, self.stop_strings = decode, stop_token_ids, list(stop_strings)
        self.max_new_tokens = max_new_tokens
        self.token_ids: list[int] = []
        self.text = ""
        self.finish_reason: str | None = None
        self._emitted = ""

    def add(self, tokens: list[int]) -> str:
        """Takes new tokens (the stop token included, which ends the reply); returns the new text to show."""
        for token in tokens:
            if token in self.stop_token_ids:
                self.finish_reason = "stop"
                break
            self.token_ids.append(token)
        text = self.decode(self.token_ids)
        found = first_stop_string(text, self.stop_strings)
        if found is not None:
            text, self.finish_reason = text[:found[0]], "stop"
        self.text = text
        if self.finish_reason is None and len(self.token_ids) >= self.max_new_tokens:
            self.finish_reason = "length"
        return self._ready()

    def end(self) -> str:
        """Generation ended on its own (a stop or the length limit); returns the text still held."""
        if self.finish_reason is None:
            self.finish_reason = "length" if len(self.token_ids) >= self.max_new_tokens else "stop"
        return self._ready()

    def _ready(self) -> str:
        held = 0 if self.finish_reason else held_back_length(self.text, self.stop_strings)
        ready = self.text[:len(self.text) - held]
        if not (ready.startswith(self._emitted) and len(ready) > len(self._emitted)):
            return ""
        piece, self._emitted = ready[len(self._emitted):], ready
        return piece


class TextStream:
    """Iterator over the text pieces of one reply, generated in a background thread.

    `close()` (or leaving a `with` block, or dropping the iterator) stops the generation at the
    next token. After the iteration ends, `finish_reason` ("stop" or "length"), `token_ids` and
    `text` describe the whole reply; "".join(pieces) == text.
    """

    def __init__(self, chat: ChatModel, prompt_ids: list[int], generate_kwargs: dict, stop_strings: list[str]):
        self.chat, self.prompt_ids, self.generate_kwargs = chat, list(prompt_ids), generate_kwargs
        self.reply = ReplyText(chat.decode, chat.stop_token_ids, stop_strings, generate_kwargs["max_new_tokens"])
        self._pieces = self._run()

    @property
    def token_ids(self) -> list[int]:
        return self.reply.token_ids

    @property
    def text(self) -> str:
        return self.reply.text

    @property
    def finish_reason(self) -> str | None:
        return self.reply.finish_reason

    def __iter__(self) -> "TextStream":
        return self

    def __next__(self) -> str:
        return next(self._pieces)

    def close(self) -> None:
        self._pieces.close()

    def __enter__(self) -> "TextStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _run(self) -> Iterator[str]:
        streamer, cancel = _TokenQueue(), threading.Event()
        failure: list[BaseException] = []
        thread = threading.Thread(target=self._generate, args=(streamer, cancel, failure), daemon=True)
        thread.start()
        try:
            while self.reply.finish_reason is None:
                item = streamer.queue.get()
                if item is _FINISHED and failure:
                    raise failure[0]
                piece = self.reply.end() if item is _FINISHED else self.reply.add(item)
                if piece:
                    yield piece
        finally:
            cancel.set()
            thread.join()

    def _generate(self, streamer: _TokenQueue, cancel: threading.Event, failure: list) -> None:
        try:
            input_ids, attention_mask = left_pad([self.prompt_ids], self.chat.tokenizer.pad_token_id, self.chat.device)
            self.chat.model.generate(input_ids=input_ids, attention_mask=attention_mask, streamer=streamer,
                                     stopping_criteria=StoppingCriteriaList([_Cancelled(cancel)]),
                                     **self.generate_kwargs)
        except BaseException as e:  # handed to the consumer, which raises it
            failure.append(e)
        finally:
            streamer.queue.put(_FINISHED)


class MetadataSplitter:
    """Splits a streamed reply into its metadata line and its content, piece by piece.

    `feed(piece)` returns the content text that can be shown now (nothing until the metadata
    line has ended; leading blanks of the content are dropped); `metadata` is None until then.
    `finish()` returns what is still held (all of the text when no line break ever came).
    """

    def __init__(self):
        self.metadata: str | None = None
        self._buffer = ""
        self._content_started = False

    def feed(self, piece: str) -> str:
        if self.metadata is None:
            self._buffer += piece
            head, newline, rest = self._buffer.partition("\n")
            if not newline:
                return ""
            self.metadata, self._buffer = head.strip(), ""
            piece = rest
        if not self._content_started:
            piece = piece.lstrip()
            self._content_started = bool(piece)
        return piece

    def finish(self) -> str:
        held, self._buffer = self._buffer, ""
        return held.strip() if self.metadata is None else ""


def load_chat_model(model: str | None, tokenizer: str | None = None, pt_checkpoint: str | None = None,
                    pt_pre_seq_len: int | None = None, lora: str | None = None, device: str = "auto",
                    dtype: str = "auto", trust_remote_code: bool = False) -> ChatModel:
    """A ChatModel from folders (`model.inference_loading.load_for_inference` says which)."""
    return ChatModel(*load_for_inference(model, tokenizer, pt_checkpoint, pt_pre_seq_len, lora, device, dtype,
                                         trust_remote_code))


__all__ = ["ChatModel", "ChatReply", "Completion", "ReplyText", "TextStream", "MetadataSplitter", "load_chat_model",
           "split_reply", "DEFAULT_MAX_NEW_TOKENS"]
