"""Data in, tokens out: read and validate records, render ChatGLM3 conversations and
prompt/response pairs into `input_ids`/`labels`, print the sanity check, pad batches.

No model and no training here. Preview one record's tokens with:

    python preprocess_utils.py --tokenizer DIR --train_format multi-turn --data FILE [--index N]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
from dataclasses import dataclass

from chat_parsing import render_interpreter_code, render_tool_call

logger = logging.getLogger(__name__)

MULTI_TURN = "multi-turn"
INPUT_OUTPUT = "input-output"
TRAIN_FORMATS = (MULTI_TURN, INPUT_OUTPUT)
ROLES = ("system", "user", "assistant", "tool", "interpreter", "observation")
NEVER_SUPERVISED_ROLES = ("system", "user")
TOOLS_SYSTEM_PROMPT = (
    "Answer the following questions as best as you can. You have access to the following tools:\n"
)
IGNORE_INDEX = -100
TRUNCATION_POLICIES = ("keep", "drop", "error")


class DataError(ValueError):
    """A problem with the user's data, reported as one line naming file, record and field."""


# --- reading files -------------------------------------------------------------------------

def read_records(path: str) -> list[tuple[str, object]]:
    """(location, record) pairs from a `.jsonl` (one object a line) or `.json` (a list) file.

    The location is `file:LINE` for JSON lines and `file[INDEX]` for a JSON list.
    """
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such data file")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    records = _read_json_list(path, text) if _looks_like_json_list(path, text) else _read_json_lines(path, text)
    if not records:
        raise DataError(f"{path}: the file holds no records")
    return records


def _looks_like_json_list(path: str, text: str) -> bool:
    if path.endswith(".jsonl"):
        return False
    return text.lstrip().startswith("[") or path.endswith(".json") and not _is_json_lines(text)


def _is_json_lines(text: str) -> bool:
    first = next((line for line in text.splitlines() if line.strip()), "")
    try:
        return isinstance(json.loads(first), dict)
    except json.JSONDecodeError:
        return False


def _read_json_list(path: str, text: str) -> list[tuple[str, object]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: a .json data file must hold a list of records, found {_json_type(data)}")
    return [(f"{path}[{i}]", record) for i, record in enumerate(data)]


def _read_json_lines(path: str, text: str) -> list[tuple[str, object]]:
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append((f"{path}:{number}", json.loads(line)))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{number}: invalid JSON: {e.msg} (column {e.colno})") from None
    return records


def write_jsonl(rows: list[dict], path: str) -> None:
    """Rows as JSON lines (UTF-8, not escaped), creating the folder; non-JSON values as repr."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, default=repr) + "\n")


# --- validation ----------------------------------------------------------------------------

def record_format(record: dict) -> str | None:
    if "conversations" in record:
        return MULTI_TURN
    if "prompt" in record or "response" in record:
        return INPUT_OUTPUT
    return None


def validate_records(records: list[tuple[str, object]], train_format: str) -> None:
    """Checks every record before any work; raises DataError on the first bad one."""
    if train_format not in TRAIN_FORMATS:
        raise DataError(f"train_format {train_format!r} is not one of {', '.join(TRAIN_FORMATS)}")
    first_format = None
    for where, record in records:
        if not isinstance(record, dict):
            raise DataError(f"{where}: a record must be a JSON object, found {_json_type(record)}")
        fmt = record_format(record)
        if fmt is not None and first_format is None:
            first_format = (fmt, where)
        elif fmt is not None and fmt != first_format[0]:
            raise DataError(
                f"{where}: this record is {fmt} but {first_format[1]} is {first_format[0]}: "
                f"a file must hold records of one format"
            )
        if fmt is not None and fmt != train_format:
            other = "'conversations'" if fmt == MULTI_TURN else "'prompt'/'response'"
            raise DataError(
                f"{where}: the record has {other} ({fmt} format) but train_format is {train_format}; "
                f"pass --train_format {fmt} or convert the data"
            )
        problem = (validate_conversation_record if train_format == MULTI_TURN else validate_prompt_response)(record)
        if problem:
            raise DataError(f"{where}: {problem}")


def _json_type(value) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null",
             int: "a number", float: "a number"}
    return names.get(type(value), type(value).__name__)


def validate_prompt_response(record: dict) -> str | None:
    for field in ("prompt", "response"):
        if field not in record:
            return f"{field}: missing (an input-output record needs 'prompt' and 'response' strings)"
        if not isinstance(record[field], str):
            return f"{field}: must be a string, found {_json_type(record[field])}"
    return None


def validate_conversation_record(record: dict) -> str | None:
    if "conversations" not in record:
        return "conversations: missing (a multi-turn record needs a 'conversations' list)"
    turns = record["conversations"]
    if not isinstance(turns, list):
        return f"conversations: must be a list of turns, found {_json_type(turns)}"
    if not turns:
        return "conversations: the list is empty"
    if "tools" in record and not isinstance(record["tools"], list):
        return f"tools: must be a list, found {_json_type(record['tools'])}"
    seen_system = seen_user = trained = False
    for i, turn in enumerate(turns):
        field = f"conversations[{i}]"
        if not isinstance(turn, dict):
            return f"{field}: a turn must be an object, found {_json_type(turn)}"
        role = turn.get("role")
        if role is None:
            return f"{field}.role: missing"
        if role not in ROLES:
            return f"{field}.role: {role!r} is not one of {', '.join(ROLES)}"
        if "loss" in turn and not isinstance(turn["loss"], bool):
            return f"{field}.loss: must be true or false, found {json.dumps(turn['loss'])}"
        if role == "system":
            if seen_system:
                return f"{field}.role: a second 'system' turn (at most one per record)"
            if seen_user:
                return f"{field}.role: 'system' must come before any 'user' turn"
            seen_system = True
        seen_user = seen_user or role == "user"
        problem = _validate_turn_fields(turn, role, field)
        if problem:
            return problem
        trained = trained or (role not in NEVER_SUPERVISED_ROLES and turn.get("loss", True))
    if not trained:
        return ("conversations: no turn is trained (only system/user turns, or every other turn has "
                "\"loss\": false); add an assistant turn")
    return None


def _validate_turn_fields(turn: dict, role: str, field: str) -> str | None:
    if role == "tool":
        for key in ("name", "parameters", "observation"):
            if key not in turn:
                return f"{field}.{key}: missing (a 'tool' turn needs name, parameters and observation)"
        if not isinstance(turn["name"], str) or not turn["name"]:
            return f"{field}.name: must be a non-empty string, found {json.dumps(turn['name'], ensure_ascii=False)}"
        if not isinstance(turn["parameters"], dict):
            return f"{field}.parameters: must be an object, found {_json_type(turn['parameters'])}"
        return None
    if "content" not in turn:
        return f"{field}.content: missing"
    if not isinstance(turn["content"], str):
        return f"{field}.content: must be a string, found {_json_type(turn['content'])}"
    if role == "interpreter" and "observation" not in turn:
        return f"{field}.observation: missing (an 'interpreter' turn needs the code's output)"
    return None


# --- rendering conversations to messages --------------------------------------------------

@dataclass(frozen=True)
class Message:
    role: str  # system, user, assistant or observation: ChatGLM3's native roles
    metadata: str
    text: str
    loss: bool


def tools_system_prompt(tools: list) -> str:
    return TOOLS_SYSTEM_PROMPT + json.dumps(tools, indent=4, ensure_ascii=False)


def observation_text(observation) -> str:
    return observation if isinstance(observation, str) else json.dumps(observation, ensure_ascii=False)


def conversation_messages(record: dict) -> list[Message]:
    """The native ChatGLM3 messages of a (validated) multi-turn record."""
    messages = []
    if record.get("tools"):
        messages.append(Message("system", "", tools_system_prompt(record["tools"]), False))
    for turn in record["conversations"]:
        role = turn["role"]
        loss = False if role in NEVER_SUPERVISED_ROLES else turn.get("loss", True)
        if role == "tool":
            messages.append(Message("assistant", turn["name"], render_tool_call(turn["name"], turn["parameters"]), loss))
            messages.append(Message("observation", "", observation_text(turn["observation"]), False))
        elif role == "interpreter":
            messages.append(Message("assistant", "interpreter", render_interpreter_code(turn["content"]), loss))
            messages.append(Message("observation", "", observation_text(turn["observation"]), False))
        else:
            messages.append(Message(role, "", turn["content"], loss))
    return messages


def encode_message(tokenizer, role: str, metadata: str, text: str) -> list[int]:
    """`<|role|>` + encode(metadata + "\\n") + encode(text), each segment with its own dummy prefix."""
    return [tokenizer.role_token_id(role)] + tokenizer.encode_text(metadata + "\n") + tokenizer.encode_text(text)


def prefix_ids(tokenizer) -> list[int]:
    return [tokenizer.get_command("[gMASK]"), tokenizer.get_command("sop")]


def build_chat_input(tokenizer, messages: list[Message]) -> list[int]:
    """Prompt ids for generation: `[gMASK] sop`, the messages, then `<|assistant|>`."""
    ids = prefix_ids(tokenizer)
    for message in messages:
        ids += encode_message(tokenizer, message.role, message.metadata, message.text)
    return ids + [tokenizer.role_token_id("assistant")]


# --- encoding records to input_ids / labels ----------------------------------------------

@dataclass
class EncodedRecord:
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False  # a length cap cut the record
    lost_targets: bool = False  # the cut removed supervised targets
    lost_stop: bool = False  # the cut removed the final stop target (the eos)

    def as_dict(self) -> dict:
        return {"input_ids": self.input_ids, "labels": self.labels, "truncated": self.truncated,
                "lost_targets": self.lost_targets, "lost_stop": self.lost_stop,
                "num_targets": sum(label != IGNORE_INDEX for label in self.labels)}


def shift_mask_to_labels(input_ids: list[int], loss_mask: list[bool]) -> list[int]:
    # The mask says whether the prediction made AT a position is trained, and that prediction is
    # the NEXT token: so token i is a target when position i-1 is masked in. This is why the token
    # after an assistant message (`<|user|>`, `<|observation|>` or the eos) is learned: it is how
    # the model learns to stop.
    return [IGNORE_INDEX] + [tok if trained else IGNORE_INDEX for tok, trained in zip(input_ids[1:], loss_mask[:-1])]


def encode_multi_turn(tokenizer, record: dict, max_seq_length: int | None = None) -> EncodedRecord:
    ids = prefix_ids(tokenizer)
    mask = [False] * len(ids)
    for message in conversation_messages(record):
        message_ids = encode_message(tokenizer, message.role, message.metadata, message.text)
        ids += message_ids
        mask += [message.loss] * len(message_ids)
    ids.append(tokenizer.eos_token_id)
    mask.append(False)
    labels = shift_mask_to_labels(ids, mask)
    encoded = EncodedRecord(ids, labels)
    if max_seq_length is not None and len(ids) > max_seq_length:
        cut = labels[max_seq_length:]
        encoded = EncodedRecord(
            ids[:max_seq_length], labels[:max_seq_length], truncated=True,
            lost_targets=any(label != IGNORE_INDEX for label in cut),
            lost_stop=labels[-1] != IGNORE_INDEX,
        )
    return encoded


def encode_prompt_response(tokenizer, record: dict, max_source_length: int | None = None,
                           max_target_length: int | None = None) -> EncodedRecord:
    source = prefix_ids(tokenizer) + tokenizer.encode_text(record["prompt"])
    target = tokenizer.encode_text(record["response"])
    truncated = lost_targets = False
    if max_source_length is not None and len(source) > max_source_length:
        source, truncated = source[:max_source_length], True
    if max_target_length is not None and len(target) > max_target_length:
        target, truncated, lost_targets = target[:max_target_length], True, True
    target = target + [tokenizer.eos_token_id]
    return EncodedRecord(source + target, [IGNORE_INDEX] * len(source) + target, truncated, lost_targets)


@dataclass(frozen=True)
class LengthLimits:
    max_seq_length: int | None = None  # multi-turn
    max_source_length: int | None = None  # input-output
    max_target_length: int | None = None  # input-output


def encode_record(tokenizer, record: dict, train_format: str, limits: LengthLimits) -> EncodedRecord:
    if train_format == MULTI_TURN:
        return encode_multi_turn(tokenizer, record, limits.max_seq_length)
    return encode_prompt_response(tokenizer, record, limits.max_source_length, limits.max_target_length)


# --- the sanity check ------------------------------------------------------------------------

def sanity_check_lines(tokenizer, input_ids: list[int], labels: list[int]) -> list[str]:
    lines = ["Sanity Check >>>>>>>>>>>>>"]
    for token_id, label in zip(input_ids, labels):
        lines.append(f"{tokenizer.token_text(token_id)!r}: {token_id:6d} -> {label:6d}")
    lines.append("<<<<<<<<<<<<< Sanity Check")
    return lines


def print_sanity_check(tokenizer, input_ids: list[int], labels: list[int]) -> None:
    print("\n".join(sanity_check_lines(tokenizer, input_ids, labels)), flush=True)


# --- datasets: parallel, cached tokenization ---------------------------------------------

@dataclass
class TruncationReport:
    records: int = 0
    tokens: int = 0
    targets: int = 0
    truncated: int = 0
    lost_targets: int = 0
    lost_stop: int = 0
    no_targets_left: int = 0  # records whose every target a cap removed (always left out)
    dropped: int = 0

    @property
    def kept(self) -> int:
        return self.records - (self.dropped or self.no_targets_left)

    def summary(self) -> str:
        text = (f"{self.records} records, {self.tokens} tokens, {self.targets} supervised tokens, "
                f"{self.truncated} truncated records ({self.lost_targets} lost supervised targets, "
                f"{self.lost_stop} lost the final stop target)")
        if self.dropped:
            text += f", {self.dropped} dropped by --truncation_policy drop"
        elif self.no_targets_left:
            text += f", {self.no_targets_left} left out because no supervised target was left"
        return text


class RecordEncoder:
    """Picklable map function for `datasets`: JSON-string records in, token columns out."""

    def __init__(self, tokenizer, train_format: str, limits: LengthLimits):
        self.tokenizer, self.train_format, self.limits = tokenizer, train_format, limits

    def __call__(self, batch: dict) -> dict:
        rows = [encode_record(self.tokenizer, json.loads(r), self.train_format, self.limits).as_dict()
                for r in batch["record"]]
        return {key: [row[key] for row in rows] for key in rows[0]}


def _cache_key(tokenizer, records_json: list[str], train_format: str, limits: LengthLimits) -> str:
    digest = hashlib.sha256()
    with open(tokenizer.vocab_file, "rb") as f:
        digest.update(f.read())
    digest.update(repr((train_format, limits, _code_fingerprint())).encode())
    for record in records_json:
        digest.update(record.encode("utf-8"))
    return digest.hexdigest()[:24]


def _code_fingerprint() -> str:
    with open(__file__, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def tokenize_records(tokenizer, records: list[tuple[str, dict]], train_format: str, limits: LengthLimits,
                     num_proc: int | None = None, cache_dir: str | None = None,
                     overwrite_cache: bool = False, truncation_policy: str = "keep"):
    """Validated records -> a `datasets.Dataset` of input_ids/labels, plus a TruncationReport.

    Tokenization runs with `num_proc` workers and is cached under `cache_dir` (keyed by the data,
    the tokenizer, the format, the caps and this file's code); `overwrite_cache` recomputes it.
    """
    import datasets

    records_json = [json.dumps(record, ensure_ascii=False) for _, record in records]
    cache_path = None
    if cache_dir:
        cache_path = os.path.join(cache_dir, "tokenized-" + _cache_key(tokenizer, records_json, train_format, limits))
    if cache_path and os.path.isdir(cache_path) and not overwrite_cache:
        logger.info("Loading tokenized data from cache %s", cache_path)
        dataset = datasets.load_from_disk(cache_path)
    else:
        raw = datasets.Dataset.from_dict({"record": records_json})
        num_proc = num_proc if num_proc and num_proc > 1 and len(records_json) >= 2 * num_proc else None
        dataset = raw.map(RecordEncoder(tokenizer, train_format, limits), batched=True, batch_size=256,
                          num_proc=num_proc, remove_columns=["record"], desc="Tokenizing",
                          new_fingerprint=_cache_key(tokenizer, records_json, train_format, limits)[:16])
        if cache_path:
            dataset.save_to_disk(cache_path)
    report = _truncation_report(dataset)
    if report.lost_targets and truncation_policy == "error":
        first = dataset["lost_targets"].index(True)
        raise DataError(
            f"{records[first][0]}: truncation removed supervised targets ({report.lost_targets} records in all); "
            f"raise the length caps or use --truncation_policy keep|drop"
        )
    if report.lost_targets and truncation_policy == "drop":
        dataset = dataset.filter(lambda lost: not lost, input_columns="lost_targets")
        report.dropped = report.lost_targets
    elif report.no_targets_left:
        # Truncation took every target of these records: they would only cost compute.
        dataset = dataset.filter(lambda targets: targets > 0, input_columns="num_targets")
    return dataset, report


def _truncation_report(dataset) -> TruncationReport:
    columns = dataset.select_columns(["num_targets", "truncated", "lost_targets", "lost_stop"]).to_dict()
    lengths = [len(ids) for ids in dataset["input_ids"]]
    return TruncationReport(
        records=len(dataset), tokens=sum(lengths), targets=sum(columns["num_targets"]),
        truncated=sum(columns["truncated"]), lost_targets=sum(columns["lost_targets"]),
        lost_stop=sum(columns["lost_stop"]),
        no_targets_left=sum(targets == 0 for targets in columns["num_targets"]),
    )


# --- batching --------------------------------------------------------------------------------

class DataCollatorForChatGLM:
    """Pads a batch to its longest member (or to `max_length` when given, as the reference did).

    input_ids are padded with `pad_token_id`, labels with -100, and an attention mask marks the
    real tokens. Padding goes on the right for training.
    """

    def __init__(self, pad_token_id: int = 0, pad_to_multiple_of: int | None = None,
                 max_length: int | None = None):
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of
        self.max_length = max_length

    def padded_length(self, longest: int) -> int:
        length = max(longest, self.max_length or 0)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        return length

    def __call__(self, features: list[dict]) -> dict:
        import torch

        length = self.padded_length(max(len(f["input_ids"]) for f in features))
        input_ids, labels, attention_mask = [], [], []
        for f in features:
            pad = length - len(f["input_ids"])
            input_ids.append(list(f["input_ids"]) + [self.pad_token_id] * pad)
            labels.append(list(f["labels"]) + [IGNORE_INDEX] * pad)
            attention_mask.append([1] * len(f["input_ids"]) + [0] * pad)
        return {"input_ids": torch.tensor(input_ids), "labels": torch.tensor(labels),
                "attention_mask": torch.tensor(attention_mask)}


# --- the preview command ---------------------------------------------------------------------

def preview(tokenizer, path: str, train_format: str, limits: LengthLimits, index: int = 0) -> list[str]:
    """Validates the whole file; returns the sanity check of record `index` and a summary line."""
    records = read_records(path)
    validate_records(records, train_format)
    if not 0 <= index < len(records):
        raise DataError(f"{path}: --index {index} is out of range (the file has {len(records)} records)")
    encoded = [encode_record(tokenizer, record, train_format, limits) for _, record in records]
    report = TruncationReport(
        records=len(encoded), tokens=sum(len(e.input_ids) for e in encoded),
        targets=sum(e.as_dict()["num_targets"] for e in encoded),
        truncated=sum(e.truncated for e in encoded), lost_targets=sum(e.lost_targets for e in encoded),
        lost_stop=sum(e.lost_stop for e in encoded),
    )
    chosen = encoded[index]
    return sanity_check_lines(tokenizer, chosen.input_ids, chosen.labels) + [report.summary()]


def main(argv: list[str] | None = None) -> int:
    from chatglm3_tokenizer import load_tokenizer

    parser = argparse.ArgumentParser(description="Validate a data file and preview one record's tokens.")
    parser.add_argument("--tokenizer", required=True, help="folder holding a ChatGLM3 tokenizer.model")
    parser.add_argument("--train_format", required=True, choices=TRAIN_FORMATS)
    parser.add_argument("--data", required=True, help=".json (a list) or .jsonl (one record a line)")
    parser.add_argument("--index", type=int, default=0, help="which record to show (default 0)")
    parser.add_argument("--max_seq_length", type=int, default=None)
    parser.add_argument("--max_source_length", type=int, default=None)
    parser.add_argument("--max_target_length", type=int, default=None)
    args = parser.parse_args(argv)
    try:
        tokenizer = load_tokenizer(args.tokenizer)
        lines = preview(tokenizer, args.data, args.train_format,
                        LengthLimits(args.max_seq_length, args.max_source_length, args.max_target_length),
                        args.index)
    except (DataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
