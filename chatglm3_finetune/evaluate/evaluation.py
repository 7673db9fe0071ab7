"""Generation-based evaluation: prompts from records, generated ids to text, scores.

Shared by `inference.py --input/--output` and by training with `--predict_with_generate`.

- Prompt/response records give one item each: `[gMASK] sop` + encode(prompt), capped at
  `max_source_length` (training's input-output rendering), scored against `response`.
- Conversation records give one item per assistant, tool and interpreter turn, prompted with the
  conversation before that turn (tools system prompt included) + `<|assistant|>`.
  Plain assistant turns are scored with ROUGE/BLEU (on the parsed reply's content); tool turns
  and plain turns together with the tool-call metrics (a tool call expected, or none);
  interpreter turns by whether the reply is interpreter code and whether that code is exact.
- Generation stops at `<|assistant|>` too (`evaluation_stop_token_ids`): each item scores one
  message, the first the model writes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..format.chat_parsing import ToolCall, parse_assistant_reply
from .metrics import GENERATION_METRICS, generation_metrics, percent, tool_call_metrics
from ..data.formats import LoadedData, load_data, record_format_of
from ..data.records import AUTO, MULTI_TURN, record_format, write_jsonl
from ..data.encoding import IGNORE_INDEX
from ..format.chat_format import build_chat_input, conversation_messages, prefix_ids
from ..data.training_data import read_and_validate

PROMPT_RESPONSE = "response"  # the role of a prompt/response item
GENERATED_TURN_ROLES = ("assistant", "tool", "interpreter")


@dataclass
class EvalItem:
    record_index: int
    turn_index: int | None  # index in "conversations"; None for a prompt/response record
    role: str  # "response", or the turn's role: assistant, tool, interpreter
    prompt_ids: list[int]
    reference: str  # the expected text: response, assistant content, tool call or code
    expected_call: ToolCall | None = None


# ---- records -> items ---------------------------------------------------------------------------

def read_eval_records(path: str, split: str | None = None) -> LoadedData:
    """The validated records of a data file or dataset folder in any format (recognised from the
    first record), as this project's records; raises DataError naming file:line:field."""
    return load_data(path, AUTO, split)


def prompt_response_item(tokenizer, record: dict, index: int, max_source_length: int | None = None) -> EvalItem:
    prompt_ids = prefix_ids(tokenizer) + tokenizer.encode_text(record["prompt"])
    if max_source_length is not None:
        prompt_ids = prompt_ids[:max_source_length]
    return EvalItem(index, None, PROMPT_RESPONSE, prompt_ids, record["response"])


def conversation_items(tokenizer, record: dict, index: int) -> list[EvalItem]:
    items = []
    turns = record["conversations"]
    for turn_index, turn in enumerate(turns):
        role = turn["role"]
        if role not in GENERATED_TURN_ROLES:
            continue
        history = conversation_messages({"tools": record.get("tools"), "conversations": turns[:turn_index]})
        prompt_ids = build_chat_input(tokenizer, history)
        # conversation_messages renders the turn itself as its first (assistant) message
        expected_message = conversation_messages({"conversations": [turn]})[0]
        expected_call = ToolCall(turn["name"], turn["parameters"]) if role == "tool" else None
        reference = turn["content"] if role in ("assistant", "interpreter") else expected_message.text
        items.append(EvalItem(index, turn_index, role, prompt_ids, reference, expected_call))
    return items


def build_eval_items(tokenizer, records: list[dict], train_format: str,
                     max_source_length: int | None = None) -> list[EvalItem]:
    if train_format == MULTI_TURN:
        return [item for i, record in enumerate(records) for item in conversation_items(tokenizer, record, i)]
    return [prompt_response_item(tokenizer, record, i, max_source_length) for i, record in enumerate(records)]


# ---- generated ids -> text ----------------------------------------------------------------------

def evaluation_stop_token_ids(tokenizer) -> list[int]:
    """The chat stop tokens (eos, `<|user|>`, `<|observation|>`) and `<|assistant|>`.

    An item stands for ONE turn, prompted with the true conversation before it. A model trained on
    ToolAlpaca-style data ends its thought with `<|assistant|>` and goes on with the tool call as a
    second message; that call is the next item, prompted with the reference thought. Decoding drops
    special tokens, so without this stop the two messages would be scored and parsed as one text
    (the thought's ROUGE spoiled by the call, the call lost as "without a tool name").
    """
    return list(tokenizer.stop_token_ids) + [tokenizer.role_token_id("assistant")]


def decode_generated(tokenizer, token_ids) -> str:
    """Text of generated ids: cut at the first evaluation stop token (`<|assistant|>` included),
    -100 padding and special tokens dropped."""
    text_ids = []
    stops = set(evaluation_stop_token_ids(tokenizer))
    for token in token_ids:
        token = int(token)
        if token in stops:
            break
        if token != IGNORE_INDEX:
            text_ids.append(token)
    return tokenizer.decode(text_ids, skip_special_tokens=True)


# ---- scoring ------------------------------------------------------------------------------------

def score_items(items: list[EvalItem], texts: list[str]) -> dict:
    """Metrics of generated texts (one per item): ROUGE-1/2/L and BLEU-4 always; for conversations
    also the tool-call metrics, interpreter metrics and counts."""
    if len(items) != len(texts):
        raise ValueError(f"{len(texts)} generated texts for {len(items)} items")
    if all(item.role == PROMPT_RESPONSE for item in items):
        metrics = generation_metrics(texts, [item.reference for item in items])
        return {**metrics, "num_predictions": len(items)}
    replies = [parse_assistant_reply(text) for text in texts]
    plain = [(reply.content, item.reference) for reply, item in zip(replies, items) if item.role == "assistant"]
    metrics = generation_metrics([p for p, _ in plain], [r for _, r in plain])
    calls = [(reply, item.expected_call) for reply, item in zip(replies, items) if item.role != "interpreter"]
    metrics.update(tool_call_metrics([reply for reply, _ in calls], [call for _, call in calls]))
    code = [(reply.code, item.reference) for reply, item in zip(replies, items) if item.role == "interpreter"]
    metrics.update(
        interpreter_accuracy=percent(sum(c is not None for c, _ in code), len(code)),
        interpreter_code_exact_match=percent(sum(c is not None and c.strip() == r.strip() for c, r in code),
                                              len(code)),
        num_plain_turns=len(plain), num_interpreter_turns=len(code), num_items=len(items))
    return metrics


def prediction_rows(records: list[dict], items: list[EvalItem], texts: list[str]) -> list[dict]:
    """Each record with `prediction` added: the generated text for a prompt/response record; for a
    conversation a list, one entry per generated turn: {"turn": index in conversations, "role":
    the expected role, "text": the raw reply, "content", "tool_call": {"name", "parameters"} or
    null, "code", "error"} as parsed from the text."""
    rows = [dict(record, prediction=[]) if record_format(record) == MULTI_TURN else dict(record)
            for record in records]
    for item, text in zip(items, texts):
        row = rows[item.record_index]
        if item.role == PROMPT_RESPONSE:
            row["prediction"] = text
            continue
        reply = parse_assistant_reply(text)
        call = {"name": reply.tool_call.name, "parameters": reply.tool_call.parameters} if reply.tool_call else None
        row["prediction"].append({
            "turn": item.turn_index, "role": item.role, "text": text, "content": reply.content,
            "tool_call": call, "code": reply.code, "error": reply.error})
    return rows


# ---- training: prompt-only datasets and compute_metrics ----------------------------------------

DEFAULT_EVAL_MAX_NEW_TOKENS = 128


def needs_synced_gpus() -> bool:
    """ZeRO-3 with several processes: every rank must keep stepping until all rows everywhere end
    (each forward gathers parameter shards from all ranks)."""
    import torch.distributed as dist
    from transformers.integrations import is_deepspeed_zero3_enabled

    return is_deepspeed_zero3_enabled() and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def generate_new_tokens(model, inputs: dict, tokenizer, generate_kwargs: dict):
    """The new tokens [batch, new] of a left-padded prompt batch (works for a PrefixTuningModel,
    which builds its own prefix cache, and for plain or peft models); stops on the evaluation stop
    tokens (`<|assistant|>` included)."""
    options = {key: value for key, value in generate_kwargs.items() if value is not None}
    if "max_new_tokens" not in options and "max_length" not in options:
        options["max_new_tokens"] = DEFAULT_EVAL_MAX_NEW_TOKENS
    options.setdefault("eos_token_id", evaluation_stop_token_ids(tokenizer))
    options.setdefault("pad_token_id", tokenizer.pad_token_id)
    options.setdefault("do_sample", False)
    options.setdefault("synced_gpus", needs_synced_gpus())
    input_ids = inputs["input_ids"]
    output = model.generate(input_ids=input_ids, attention_mask=inputs.get("attention_mask"), **options)
    return output[:, input_ids.shape[1]:]


class GenerationEval:
    """The prompt-only splits of `--predict_with_generate`, their items and `compute_metrics`.

    Each split's dataset has `input_ids` (the prompt) and `labels` ([global item index]); the
    Trainer gathers those indices with the predictions, so metrics and prediction files stay
    right whatever the batch order or padding across processes.
    """

    def __init__(self, tokenizer, train_format: str, max_source_length: int | None = None):
        self.tokenizer, self.train_format, self.max_source_length = tokenizer, train_format, max_source_length
        self.items: list[EvalItem] = []
        self.records: dict[str, list[dict]] = {}
        self.item_ranges: dict[str, range] = {}
        self.datasets: dict = {}

    @classmethod
    def from_args(cls, tokenizer, data_args, training_args, records: dict | None = None) -> "GenerationEval":
        """Reads --validation_file (with --do_eval) and --test_file (with --do_predict), or takes
        `records` already read: {"eval" | "test": [(location, record), ...]} (e.g. held out by --val_size)."""
        generation = cls(tokenizer, None, data_args.max_source_length)
        if records is None:
            records = {}
            splits = (("eval", training_args.do_eval, data_args.validation_file, data_args.max_eval_samples,
                       data_args.validation_split, "--validation_split"),
                      ("test", training_args.do_predict, data_args.test_file, data_args.max_predict_samples,
                       data_args.test_split, "--test_split"))
            for name, wanted, path, max_samples, split, split_flag in splits:
                if wanted:
                    records[name] = read_and_validate(path, data_args, max_samples, split, split_flag)
        for name in ("eval", "test"):
            if name in records:
                generation.train_format = record_format_of(data_args)
                generation.add_split(name, [record for _, record in records[name]])
        return generation

    def add_split(self, name: str, records: list[dict]):
        import datasets

        offset = len(self.items)
        items = build_eval_items(self.tokenizer, records, self.train_format, self.max_source_length)
        self.items += items
        self.records[name] = records
        self.item_ranges[name] = range(offset, len(self.items))
        self.datasets[name] = datasets.Dataset.from_dict({
            "input_ids": [item.prompt_ids for item in items],
            "labels": [[offset + i] for i in range(len(items))]})
        return self.datasets[name]

    def texts_by_item(self, predictions, label_ids) -> dict[int, str]:
        """{global item index: generated text}; rows repeated by distributed padding are dropped."""
        texts = {}
        for row, label in zip(np.asarray(predictions), np.asarray(label_ids)):
            index = int(np.asarray(label).reshape(-1)[0])
            if index >= 0 and index not in texts:
                texts[index] = decode_generated(self.tokenizer, row)
        return texts

    def compute_metrics(self, eval_prediction) -> dict:
        texts = self.texts_by_item(eval_prediction.predictions, eval_prediction.label_ids)
        indices = sorted(texts)
        return score_items([self.items[i] for i in indices], [texts[i] for i in indices])

    def write_predictions(self, name: str, predictions, label_ids, path: str) -> str:
        """`<path>`: the split's records with their `prediction` (see prediction_rows)."""
        texts = self.texts_by_item(predictions, label_ids)
        indices = [i for i in self.item_ranges[name] if i in texts]
        write_jsonl(prediction_rows(self.records[name], [self.items[i] for i in indices],
                                    [texts[i] for i in indices]), path)
        return path


__all__ = ["EvalItem", "GENERATION_METRICS", "build_eval_items", "read_eval_records", "evaluation_stop_token_ids",
           "decode_generated", "score_items", "prediction_rows", "write_jsonl", "GenerationEval",
           "generate_new_tokens", "needs_synced_gpus"]
