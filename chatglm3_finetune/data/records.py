"""Data files in, validated records out: read `.json`/`.jsonl` files and check every record,
reporting problems as one line naming the file, line (or list index) and field. The names of the
data formats live here too; formats converts the other formats into these records."""

from __future__ import annotations

import json
import os
import re

from ..did_you_mean import did_you_mean
from ..format.chat_format import NEVER_SUPERVISED_ROLES, ROLES
from .paths import file_problem
from .strict_json import StrictJsonError, field_path, loads

MULTI_TURN = "multi-turn"
INPUT_OUTPUT = "input-output"
RECORD_FORMATS = (MULTI_TURN, INPUT_OUTPUT)  # this project's own records: every other format becomes one
OPENAI, SHAREGPT, ALPACA = "openai", "sharegpt", "alpaca"
AUTO = "auto"  # recognise the format from the first record
TRAIN_FORMATS = (AUTO, MULTI_TURN, INPUT_OUTPUT, OPENAI, SHAREGPT, ALPACA)


class DataError(ValueError):
    """A problem with the user's data, reported as one line naming file, record and field."""


def read_records(path: str) -> list[tuple[str, object]]:
    """(location, record) pairs from a `.jsonl` (one object a line) or `.json` (a list) file.

    The location is `file:LINE` for JSON lines and `file[INDEX]` for a JSON list. Lines end at a
    newline only (see split_lines). NaN, Infinity and a key given twice in one object are refused.
    """
    problem = file_problem(path)
    if problem:
        raise DataError(problem)
    with open(path, "rb") as f:
        text = _decode(path, f.read())
    records = _read_json_list(path, text) if _looks_like_json_list(path, text) else _read_json_lines(path, text)
    if not records:
        raise DataError(f"{path}: the file holds no records")
    return records


def _decode(path: str, data: bytes) -> str:
    """The file's text as UTF-8 (a UTF-8 byte-order mark is allowed); anything else is a DataError."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise DataError(f"{path}:1: the file is UTF-16 text; save it as UTF-8")
    if b"\x00" in data:
        line = data.count(b"\n", 0, data.index(b"\x00")) + 1
        raise DataError(f"{path}:{line}: a NUL byte: this is a binary file, not JSON text (UTF-8 expected)")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}:{line}: byte 0x{data[e.start]:02x} is not UTF-8 (is the file latin-1 or another "
                        f"encoding?); save it as UTF-8") from None


def split_lines(text: str) -> list[str]:
    r"""The lines of a JSON Lines text, split on "\n" only. str.splitlines() also ends a line at
    U+2028, U+2029, U+0085, \x0b, \x0c, \x1c-\x1e and a lone \r; json.dumps(ensure_ascii=False)
    writes the first three raw inside strings, so such records would break and every line number
    after them would be off. A "\r" before the "\n" is JSON whitespace."""
    return text.split("\n")


def _parse_json(where: str, text: str, line: int | None = 1):
    """Strict json loads (strict_json) with every failure as one DataError naming `where`: `file:line`
    for a line of JSON Lines; for a whole list (`line` None) `file[INDEX]` and the field."""
    try:
        value = loads(text)
    except StrictJsonError as e:
        if line is None and e.location and isinstance(e.location[0], int):
            index, *inside = e.location
            raise DataError(f"{where}[{index}]: {field_path(tuple(inside)) + ': ' if inside else ''}{e.problem}") \
                from None
        raise DataError(f"{where}:{line or 1}: {e}") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{where}:{(line or 1) + e.lineno - 1}: invalid JSON: {e.msg} (column {e.colno})") from None
    except RecursionError:
        raise DataError(f"{where}:{line or 1}: JSON nested too deeply to read") from None
    except ValueError as e:  # e.g. an integer longer than Python's 4300-digit conversion limit
        raise DataError(f"{where}:{line or 1}: unreadable JSON value: {e}") from None
    if _SURROGATE_ESCAPE.search(text):
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise DataError(f"{where}:{line or 1}: a lone UTF-16 surrogate escape (\\ud800-\\udfff) that is not "
                            f"part of a pair: this is not valid text") from None
    return value


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89abcdefABCDEF]")


def _looks_like_json_list(path: str, text: str) -> bool:
    if path.endswith(".jsonl"):
        return False
    return text.lstrip().startswith("[") or path.endswith(".json") and not _is_json_lines(text)


def _is_json_lines(text: str) -> bool:
    first = next((line for line in split_lines(text) if line.strip()), "")
    try:
        return isinstance(json.loads(first), dict)
    except (ValueError, RecursionError):
        return False


def _read_json_list(path: str, text: str) -> list[tuple[str, object]]:
    data = _parse_json(path, text, None)
    if not isinstance(data, list):
        raise DataError(f"{path}: a .json data file must hold a list of records, found {json_type(data)}")
    return [(f"{path}[{i}]", record) for i, record in enumerate(data)]


def _read_json_lines(path: str, text: str) -> list[tuple[str, object]]:
    records = []
    for number, line in enumerate(split_lines(text), start=1):
        if not line.strip():
            continue
        records.append((f"{path}:{number}", _parse_json(path, line, number)))
    return records


def write_jsonl(rows: list[dict], path: str) -> None:
    """Rows as JSON lines (UTF-8, not escaped), creating the folder; non-JSON values as repr."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, default=repr) + "\n")


def record_format(record: dict) -> str | None:
    if "conversations" in record:
        return MULTI_TURN
    if "prompt" in record or "response" in record:
        return INPUT_OUTPUT
    return None


def validate_records(records: list[tuple[str, object]], train_format: str) -> None:
    """Checks every record before any work; raises DataError on the first bad one."""
    if train_format not in RECORD_FORMATS:
        raise DataError(f"train_format {train_format!r} is not one of {', '.join(RECORD_FORMATS)}")
    first_format = None
    for where, record in records:
        if not isinstance(record, dict):
            raise DataError(f"{where}: a record must be a JSON object, found {json_type(record)}")
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


def json_type(value) -> str:
    """How a parsed JSON value is called in an error message: "an object", "a list", "null", ..."""
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null",
             int: "a number", float: "a number"}
    return names.get(type(value), type(value).__name__)



def validate_prompt_response(record: dict) -> str | None:
    for field in ("prompt", "response"):
        if field not in record:
            return f"{field}: missing (an input-output record needs 'prompt' and 'response' strings)"
        if not isinstance(record[field], str):
            return f"{field}: must be a string, found {json_type(record[field])}"
    return None


def validate_conversation_record(record: dict, role_fields: list[str] | None = None,
                                 turns_field: str = "conversations") -> str | None:
    """The first problem of a multi-turn record, or None. A record converted from another format
    passes `role_fields` (where each turn's role came from, e.g. `messages[3].role`) and
    `turns_field`, so that rules about the order of turns name the user's own fields."""
    if "conversations" not in record:
        return "conversations: missing (a multi-turn record needs a 'conversations' list)"
    turns = record["conversations"]
    if not isinstance(turns, list):
        return f"conversations: must be a list of turns, found {json_type(turns)}"
    if not turns:
        return "conversations: the list is empty"
    if "tools" in record and not isinstance(record["tools"], list):
        return f"tools: must be a list, found {json_type(record['tools'])}"
    seen_system = seen_user = trained = False
    for i, turn in enumerate(turns):
        field = f"conversations[{i}]"
        role_field = role_fields[i] if role_fields else f"{field}.role"
        if not isinstance(turn, dict):
            return f"{field}: a turn must be an object, found {json_type(turn)}"
        role = turn.get("role")
        if role is None:
            return f"{field}.role: missing"
        if role not in ROLES:
            return f"{field}.role: {role!r} is not one of {', '.join(ROLES)}{did_you_mean(str(role), ROLES)}"
        if "loss" in turn and not isinstance(turn["loss"], bool):
            return f"{field}.loss: must be true or false, found {json.dumps(turn['loss'])}"
        if role == "system":
            if seen_system:
                return f"{role_field}: a second 'system' turn (at most one per record)"
            if seen_user:
                return f"{role_field}: 'system' must come before any 'user' turn"
            seen_system = True
        seen_user = seen_user or role == "user"
        problem = _validate_turn_fields(turn, role, field)
        if problem:
            return problem
        trained = trained or (role not in NEVER_SUPERVISED_ROLES and turn.get("loss", True))
    if not trained:
        return (f"{turns_field}: no turn is trained (only system/user turns, or every other turn has its loss "
                f"turned off); add an assistant turn")
    return None


def _validate_turn_fields(turn: dict, role: str, field: str) -> str | None:
    if role == "tool":
        for key in ("name", "parameters", "observation"):
            if key not in turn:
                return f"{field}.{key}: missing (a 'tool' turn needs name, parameters and observation)"
        if not isinstance(turn["name"], str) or not turn["name"]:
            return f"{field}.name: must be a non-empty string, found {json.dumps(turn['name'], ensure_ascii=False)}"
        if not isinstance(turn["parameters"], dict):
            return f"{field}.parameters: must be an object, found {json_type(turn['parameters'])}"
        return None
    if "content" not in turn:
        return f"{field}.content: missing"
    if not isinstance(turn["content"], str):
        return f"{field}.content: must be a string, found {json_type(turn['content'])}"
    if role == "interpreter" and "observation" not in turn:
        return f"{field}.observation: missing (an 'interpreter' turn needs the code's output)"
    return None
