"""batched_decoding: requests decoded together give what each gets alone (greedy, on the plain tiny
model and with a P-Tuning prefix), with their own stops, lengths, seeds; cancelled jobs leave;
a full queue refuses."""

import threading
import time

import pytest
import torch

from chatglm3_finetune.serve.batched_decoding import BatchedDecoder, GenerationJob, QueueFull, Sampling, sample_token
from chatglm3_finetune.serve.chat_engine import ChatModel, load_chat_model
from chatglm3_finetune.format.chat_format import Message
from chatglm3_finetune.model.ptuning.prefix_model import PrefixTuningModel


@pytest.fixture(scope="module")
def tiny_chat(tiny_model_dir):
    return load_chat_model(tiny_model_dir, device="cpu")


@pytest.fixture(scope="module")
def prefix_chat(tiny_model_dir):
    chat = load_chat_model(tiny_model_dir, device="cpu")
    torch.manual_seed(0)
    model = PrefixTuningModel(chat.model, pre_seq_len=4, prefix_dropout=0.0).eval()
    for parameter in model.prefix_encoder.parameters():  # a prefix strong enough to change the answers
        torch.nn.init.normal_(parameter, std=1.0)
    return ChatModel(model, chat.tokenizer)


def prompts(chat, count):
    return [chat.chat_input_ids([Message("user", "", f"Question {i}: what is {'x' * i} {i} + {i}?", False)])
            for i in range(count)]


class Collector:
    """Submits jobs (optionally staggered, so later ones join a running batch) and waits for them."""

    def __init__(self, decoder: BatchedDecoder):
        self.decoder, self.final, self.updates, self.events = decoder, {}, {}, {}

    def submit(self, key, prompt_ids, max_new_tokens, sampling=Sampling(), stop_strings=()):
        self.events[key], self.updates[key] = threading.Event(), 0

        def on_progress(progress):
            self.updates[key] += 1
            if progress.done:
                self.final[key] = progress
                self.events[key].set()

        job = GenerationJob(list(prompt_ids), max_new_tokens, sampling, list(stop_strings), on_progress)
        self.decoder.submit(job)
        return job

    def wait(self, key, timeout=120):
        assert self.events[key].wait(timeout), f"job {key} did not finish"
        return self.final[key]


@pytest.mark.parametrize("model", ["plain", "p-tuning"])
def test_greedy_answers_batched_equal_each_alone(tiny_chat, prefix_chat, model):
    chat = tiny_chat if model == "plain" else prefix_chat
    asked = prompts(chat, 6)
    lengths = [8 + 3 * i for i in range(6)]
    alone = [chat.generate_completions([p], n)[0] for p, n in zip(asked, lengths)]
    assert len({tuple(c.token_ids) for c in alone}) > 1, "the prompts should get different answers"
    decoder = BatchedDecoder(chat, max_batch_size=4)  # 6 jobs: some wait for a slot, later ones join mid-way
    try:
        jobs = Collector(decoder)
        for i, (prompt, length) in enumerate(zip(asked, lengths)):
            jobs.submit(i, prompt, length)
            time.sleep(0.01 * (i % 3))
        together = [jobs.wait(i) for i in range(6)]
    finally:
        decoder.close()
    assert [p.token_ids for p in together] == [c.token_ids for c in alone]
    assert [p.text for p in together] == [c.text for c in alone]
    assert [p.finish_reason for p in together] == [c.finish_reason for c in alone]
    assert decoder.load == (0, 0)


def test_stop_strings_lengths_and_seeds_are_per_request(tiny_chat):
    prompt = prompts(tiny_chat, 1)[0]
    full = tiny_chat.generate_completions([prompt], 30)[0]
    stop = full.text[8:11]
    expected_stop = tiny_chat.generate_completions([prompt], 30, stop_strings=[stop])[0]
    assert expected_stop.finish_reason == "stop" and len(expected_stop.text) < len(full.text)
    seeded = Sampling(temperature=1.0, top_p=0.9, seed=1234)
    decoder = BatchedDecoder(tiny_chat, max_batch_size=8)
    try:
        alone = Collector(decoder)
        alone.submit("seeded", prompt, 20, seeded)
        seeded_alone = alone.wait("seeded")
        jobs = Collector(decoder)
        jobs.submit("full", prompt, 30)
        jobs.submit("stop", prompt, 30, stop_strings=[stop])
        jobs.submit("short", prompt, 3)
        jobs.submit("seeded", prompt, 20, seeded)
        jobs.submit("other seed", prompt, 20, Sampling(temperature=1.0, top_p=0.9, seed=99))
        jobs.submit("tiny temperature", prompt, 30, Sampling(temperature=1e-300))
        results = {key: jobs.wait(key) for key in jobs.events}
    finally:
        decoder.close()
    assert results["full"].token_ids == full.token_ids
    assert (results["stop"].text, results["stop"].finish_reason) == (expected_stop.text, "stop")
    assert len(results["short"].token_ids) == 3 and results["short"].finish_reason == "length"
    assert results["seeded"].token_ids == seeded_alone.token_ids  # its own generator, whatever runs beside it
    assert results["other seed"].token_ids != seeded_alone.token_ids
    assert results["tiny temperature"].token_ids == full.token_ids  # as greedy as it sounds, and no NaN
    assert results["full"].text == full.text


def test_cancelled_job_leaves_the_batch_and_the_rest_go_on(tiny_chat):
    asked = prompts(tiny_chat, 2)
    expected = tiny_chat.generate_completions([asked[1]], 40)[0]
    decoder = BatchedDecoder(tiny_chat, max_batch_size=4)
    try:
        jobs = Collector(decoder)
        long_job = jobs.submit("long", asked[0], 100_000, Sampling(temperature=1.0, seed=0))
        jobs.submit("other", asked[1], 40)
        while jobs.updates["long"] < 3:
            time.sleep(0.01)
        long_job.cancel()
        assert jobs.wait("other").token_ids == expected.token_ids
        deadline = time.monotonic() + 10
        while decoder.load != (0, 0):
            assert time.monotonic() < deadline, "the cancelled job stayed in the batch"
            time.sleep(0.01)
        assert "long" not in jobs.final  # no more progress once cancelled
    finally:
        decoder.close()


def test_full_queue_is_refused_with_a_retry_time(tiny_chat):
    decoder = BatchedDecoder(tiny_chat, max_batch_size=1, max_waiting=1)
    try:
        jobs = Collector(decoder)
        running = jobs.submit("running", prompts(tiny_chat, 1)[0], 100_000, Sampling(temperature=1.0))
        while jobs.updates["running"] < 1:
            time.sleep(0.01)
        waiting = jobs.submit("waiting", prompts(tiny_chat, 1)[0], 5)
        with pytest.raises(QueueFull) as refused:
            jobs.submit("refused", prompts(tiny_chat, 1)[0], 5)
        assert refused.value.retry_after >= 1
        running.cancel()
        assert jobs.wait("waiting").finish_reason in ("stop", "length")
        assert waiting.cancelled.is_set() is False
    finally:
        decoder.close()


def test_a_failing_forward_fails_its_jobs_and_the_decoder_keeps_serving(tiny_chat):
    decoder = BatchedDecoder(tiny_chat, max_batch_size=4)
    real_forward, calls = decoder._forward, []

    def failing_once(*args):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("injected failure")
        return real_forward(*args)

    decoder._forward = failing_once
    try:
        jobs = Collector(decoder)
        jobs.submit("failed", prompts(tiny_chat, 1)[0], 20)
        failed = jobs.wait("failed")
        assert isinstance(failed.error, RuntimeError) and failed.finish_reason is None
        jobs.submit("after", prompts(tiny_chat, 1)[0], 20)
        assert jobs.wait("after").token_ids == tiny_chat.generate_completions([prompts(tiny_chat, 1)[0]], 20)[0].token_ids
    finally:
        decoder.close()


def test_sample_token_keeps_to_the_nucleus_and_survives_extreme_temperatures():
    logits = torch.tensor([0.0, 5.0, 4.9, -3.0])
    generator = torch.Generator().manual_seed(0)
    assert {sample_token(logits, Sampling(1.0, 0.01), generator) for _ in range(50)} == {1}
    assert {sample_token(logits, Sampling(1.0, 0.6), generator) for _ in range(200)} == {1, 2}
    assert sample_token(logits, Sampling(1e-300, 1.0), generator) == 1
    assert sample_token(logits, Sampling(2.0, 1.0), torch.Generator().manual_seed(5)) == \
        sample_token(logits, Sampling(2.0, 1.0), torch.Generator().manual_seed(5))
