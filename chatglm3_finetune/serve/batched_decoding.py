"""Continuous batching for the server: concurrent requests share one forward pass per token.

A request joins the running batch at a token boundary, after a prefill of its prompt (newcomers
are prefilled together), and leaves it when it ends, each with its own sampling settings, stop
tokens and strings, `max_new_tokens` and cancellation. One thread runs the model; callers hand
in `GenerationJob`s and get `Progress` snapshots through a callback after each token.

transformers' own continuous batching (`generate_batch`, `ContinuousBatchingManager`) runs on a
paged KV cache that a P-Tuning prefix (per-layer keys and values placed before the prompt) does
not fit, so this module keeps a left-padded `DynamicCache` for the whole batch instead: a
newcomer's keys are left-padded to the batch's width (or the batch to the newcomer's) and
stacked; a leaver's row is dropped, and columns that are padding in every row are cut off.
Positions are counted per row (from 0 at the first prompt token, as in training), so the
P-Tuning prefix is just the first `pre_seq_len` cached columns of its rows.
"""

from __future__ import annotations

import collections
import inspect
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from .chat_engine import ChatModel, ReplyText
from ..data.collation import left_pad
from ..model.ptuning.prefix_model import real_token_positions

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None


@dataclass(frozen=True)
class Progress:
    """A job's state after a token: all its token ids and text, the text new since the last
    snapshot, and once it has ended, why (`finish_reason`) or what failed (`error`)."""

    token_ids: list[int]
    text: str
    piece: str
    finish_reason: str | None = None
    error: BaseException | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None or self.error is not None


class QueueFull(Exception):
    """Every batch slot and waiting place is taken; `retry_after` (seconds) is a fair guess."""

    def __init__(self, waiting: int, retry_after: int):
        super().__init__(f"{waiting} requests are already waiting for the model")
        self.retry_after = retry_after


@dataclass(eq=False)
class GenerationJob:
    """One request: prompt ids, limits, sampling; `on_progress` is called from the model's thread."""

    prompt_ids: list[int]
    max_new_tokens: int
    sampling: Sampling
    stop_strings: list[str]
    on_progress: Callable[[Progress], None]
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        """Leave the batch (or the queue) at the next token boundary; no more progress is reported."""
        self.cancelled.set()


class _Row:
    """A job in the batch: its reply so far, the token to feed next, that token's position."""

    def __init__(self, job: GenerationJob, reply: ReplyText, position: int, device):
        self.job, self.reply, self.next_position = job, reply, position
        self.last_token: int | None = None
        self.started = time.perf_counter()
        self.generator = None
        if job.sampling.temperature > 0 and job.sampling.seed is not None:
            self.generator = torch.Generator(device=device).manual_seed(job.sampling.seed)

    @property
    def done(self) -> bool:
        return self.reply.finish_reason is not None or self.job.cancelled.is_set()


class BatchedDecoder:
    """Runs the jobs handed to `submit` in one thread, up to `max_batch_size` at a time (1 turns
    batching off); at most `max_waiting` wait for a slot, beyond that `submit` raises QueueFull."""

    def __init__(self, chat: ChatModel, max_batch_size: int = 16, max_waiting: int = 64):
        self.chat, self.max_batch_size, self.max_waiting = chat, max_batch_size, max_waiting
        self.prefix_model = chat.model if chat.is_prefix_tuned else None
        self.decoder = chat.model.base_model if self.prefix_model is not None else chat.model
        parameters = inspect.signature(self.decoder.forward).parameters
        if "cache" not in parameters:
            raise ValueError(f"{type(self.decoder).__name__} takes no `cache` argument: batched serving needs a "
                             f"native transformers model (convert a remote-code checkpoint first, see "
                             f"docs/conversion.md)")
        self._logits_to_keep = {"logits_to_keep": 1} if "logits_to_keep" in parameters else {}
        self._waiting: collections.deque[GenerationJob] = collections.deque()
        self._condition = threading.Condition()
        self._closed = False
        self._rows: list[_Row] = []
        self._joining = 0
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None
        self._seconds_per_job = 1.0
        self._thread = threading.Thread(target=self._run, name="batched-decoder", daemon=True)
        self._thread.start()

    # ---- the callers' side -------------------------------------------------------------------

    def submit(self, job: GenerationJob) -> None:
        with self._condition:
            if self._closed:
                raise RuntimeError("the decoder is closed")
            if len(self._waiting) >= self.max_waiting:
                rounds = (len(self._waiting) + len(self._rows)) / self.max_batch_size
                raise QueueFull(len(self._waiting), max(1, math.ceil(rounds * self._seconds_per_job)))
            self._waiting.append(job)
            self._condition.notify()

    @property
    def load(self) -> tuple[int, int]:
        """(jobs in the batch or joining it, jobs waiting)."""
        with self._condition:
            return len(self._rows) + self._joining, len(self._waiting)

    def close(self) -> None:
        with self._condition:
            self._closed = True
            self._condition.notify()
        self._thread.join(timeout=60)

    # ---- the model's thread ------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._condition:
                while not self._rows and not self._waiting and not self._closed:
                    self._condition.wait()
                if self._closed:
                    return
                newcomers = []
                while self._waiting and len(self._rows) + len(newcomers) < self.max_batch_size:
                    job = self._waiting.popleft()
                    if not job.cancelled.is_set():
                        newcomers.append(job)
                self._joining = len(newcomers)
            try:
                with torch.inference_mode():
                    if newcomers:
                        self._join(newcomers)
                        self._joining = 0
                    if self._rows:
                        self._step()
            except Exception as error:  # a bug or out of memory: fail this batch, keep serving
                logger.exception("batched decoding failed")
                failed = [row.job for row in self._rows] + [job for job in newcomers if job not in self._jobs()]
                for job in failed:
                    job.on_progress(Progress([], "", "", error=error))
                self._rows, self._cache, self._mask = [], None, None
            finally:
                self._joining = 0

    def _jobs(self) -> list[GenerationJob]:
        return [row.job for row in self._rows]

    def _join(self, jobs: list[GenerationJob]) -> None:
        """Prefills the newcomers' prompts together, picks their first tokens, adds them to the batch."""
        input_ids, prompt_mask = left_pad([job.prompt_ids for job in jobs], self.chat.tokenizer.pad_token_id,
                                          self.chat.device)
        cache, mask = DynamicCache(), prompt_mask
        if self.prefix_model is not None:
            for layer, (key, value) in enumerate(self.prefix_model.prefix_key_values(len(jobs), dropout=False)):
                cache.update(key.contiguous(), value.contiguous(), layer)
            mask = torch.cat([prompt_mask.new_ones((len(jobs), self.prefix_model.pre_seq_len)), prompt_mask], dim=1)
        logits = self._forward(input_ids, mask, real_token_positions(prompt_mask), cache)
        rows = [_Row(job, ReplyText(self.chat.decode, self.chat.stop_token_ids, job.stop_strings, job.max_new_tokens),
                     len(job.prompt_ids), self.chat.device) for job in jobs]
        self._add_rows(rows, cache, mask)
        self._advance(rows, logits)

    def _step(self) -> None:
        """One token for every row: feed each its last token, pick the next."""
        rows = self._rows
        input_ids = torch.tensor([[row.last_token] for row in rows], device=self.chat.device)
        positions = torch.tensor([[row.next_position] for row in rows], device=self.chat.device)
        self._mask = torch.cat([self._mask, self._mask.new_ones((len(rows), 1))], dim=1)
        logits = self._forward(input_ids, self._mask, positions, self._cache)
        for row in rows:
            row.next_position += 1
        self._advance(rows, logits)

    def _forward(self, input_ids, attention_mask, position_ids, cache) -> torch.Tensor:
        output = self.decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              cache=cache, use_cache=True, return_dict=True, **self._logits_to_keep)
        return output.logits[:, -1]

    def _advance(self, rows: list[_Row], logits: torch.Tensor) -> None:
        """Picks each row's next token, reports progress, and lets finished rows leave."""
        greedy = logits.argmax(dim=-1).tolist()
        for i, row in enumerate(rows):
            if row.job.cancelled.is_set():
                continue
            sampling = row.job.sampling
            token = greedy[i] if sampling.temperature == 0 else sample_token(logits[i], sampling, row.generator)
            row.last_token = token
            piece = row.reply.add([token])
            row.job.on_progress(Progress(list(row.reply.token_ids), row.reply.text, piece, row.reply.finish_reason))
        self._drop_finished()

    def _add_rows(self, rows: list[_Row], cache: DynamicCache, mask: torch.Tensor) -> None:
        if not self._rows:
            self._rows, self._cache, self._mask = rows, cache, mask
            return
        width = max(self._mask.shape[1], mask.shape[1])
        layers = [(torch.cat([_left_pad_keys(old_k, width), _left_pad_keys(new_k, width)]),
                   torch.cat([_left_pad_keys(old_v, width), _left_pad_keys(new_v, width)]))
                  for (old_k, old_v), (new_k, new_v) in zip(_layers(self._cache), _layers(cache))]
        self._cache = _cache_of(layers)
        self._mask = torch.cat([F.pad(self._mask, (width - self._mask.shape[1], 0)), F.pad(mask, (width - mask.shape[1], 0))])
        self._rows = self._rows + rows

    def _drop_finished(self) -> None:
        keep = [i for i, row in enumerate(self._rows) if not row.done]
        if len(keep) == len(self._rows):
            return
        now = time.perf_counter()
        for row in self._rows:
            if row.done:
                self._seconds_per_job = 0.8 * self._seconds_per_job + 0.2 * (now - row.started)
        if not keep:
            self._rows, self._cache, self._mask = [], None, None
            return
        index = torch.tensor(keep, device=self._mask.device)
        self._rows = [self._rows[i] for i in keep]
        mask = self._mask[index]
        first_used = int(mask.any(dim=0).long().argmax())  # columns before it are padding in every row
        self._mask = mask[:, first_used:]
        self._cache = _cache_of([(keys[index, :, first_used:], values[index, :, first_used:])
                                 for keys, values in _layers(self._cache)])


def sample_token(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> int:
    """A token drawn from softmax(logits / temperature), within the top_p nucleus. In float64 and
    from the maximum down, so that a temperature of 1e-300 is as greedy as it sounds, not NaN."""
    scores = (logits.double() - logits.max().double()) / sampling.temperature
    probs = torch.softmax(scores, dim=-1)
    if sampling.top_p < 1:
        probs, order = probs.sort(descending=True)
        probs[(probs.cumsum(-1) - probs) >= sampling.top_p] = 0  # keeps the first, always
        return int(order[torch.multinomial(probs, 1, generator=generator)])
    return int(torch.multinomial(probs, 1, generator=generator))


def _left_pad_keys(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """[batch, heads, length, head_dim] -> zero columns on the left up to `width`."""
    return F.pad(tensor, (0, 0, width - tensor.shape[-2], 0))


def _layers(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


def _cache_of(layers: list[tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache:
    cache = DynamicCache()
    for index, (keys, values) in enumerate(layers):
        cache.update(keys.contiguous(), values.contiguous(), index)
    return cache


__all__ = ["BatchedDecoder", "GenerationJob", "Progress", "QueueFull", "Sampling", "sample_token"]
