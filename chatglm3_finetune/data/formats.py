"""The fine-tuning data people already have (OpenAI chat messages, ShareGPT, Alpaca), recognised
and converted record by record into this project's own records (multi-turn `conversations`, or
prompt/response), so that encoding, evaluation, inference and the preview work on it unchanged.

A bad record stops everything with `file:line: field: problem`, in the user's own field names.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from ..did_you_mean import did_you_mean
from .sources import read_source
from .records import (
    ALPACA, AUTO, INPUT_OUTPUT, MULTI_TURN, OPENAI, RECORD_FORMATS, SHAREGPT, DataError, json_type,
    validate_conversation_record, validate_prompt_response, validate_records,
)

# What each format's records become; alpaca (and so auto) depends on the data: see alpaca_as_chat.
FIXED_RECORD_FORMAT = {MULTI_TURN: MULTI_TURN, INPUT_OUTPUT: INPUT_OUTPUT, OPENAI: MULTI_TURN, SHAREGPT: MULTI_TURN}
FORMAT_SHAPES = {
    OPENAI: "'messages' of role/content",
    SHAREGPT: "'conversations' of from/value",
    ALPACA: "'instruction'/'input'/'output'",
    MULTI_TURN: "'conversations' of role/content",
    INPUT_OUTPUT: "'prompt'/'response'",
}
OPENAI_ROLES = ("system", "developer", "user", "assistant", "tool")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "function_call": "tool", "observation": "observation"}


class FormatProblem(ValueError):
    """`field: problem` inside one record; the reader adds where the record is."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}")
        self.field, self.problem = field, problem


@dataclass
class LoadedData:
    records: list[tuple[str, dict]]  # (location, record in one of RECORD_FORMATS)
    record_format: str  # multi-turn or input-output: what the records are now
    source_format: str  # what the data held
    how: str  # how source_format was chosen, and why it became record_format when the data decided

    def describe(self) -> str:
        """One line saying what was read, e.g. `folder/train: 3 openai records (recognised from the
        first record), read as multi-turn records`."""
        first = self.records[0][0]  # `file:LINE` or `file[INDEX]`: the source is what comes before
        source = first[:first.rindex("[")] if first.endswith("]") else first[:first.rindex(":")]
        return (f"{source}: {len(self.records)} {self.source_format} records ({self.how}), "
                f"read as {self.record_format} records")


def detect_format(record) -> str | None:
    """The format a record is written in, from its keys; None when it has none of them."""
    if not isinstance(record, dict):
        return None
    if "messages" in record:
        return OPENAI
    if "conversations" in record:  # told apart by the first turn's keys; None when it has neither
        turns = record["conversations"]
        first = turns[0] if isinstance(turns, list) and turns and isinstance(turns[0], dict) else {}
        return SHAREGPT if "from" in first else MULTI_TURN if "role" in first else None
    if "instruction" in record:
        return ALPACA
    if "prompt" in record or "response" in record:
        return INPUT_OUTPUT
    return None


def load_data(path: str, train_format: str, split: str | None = None, split_flag: str = "--split") -> LoadedData:
    """The validated records of a data file or dataset folder, converted to this project's records.

    `train_format` is one of TRAIN_FORMATS; `auto` recognises the format from the first record.
    Every record must be in that one format. Raises DataError naming file, line and field.
    """
    located = read_source(path, split, split_flag)
    source_format, how = train_format, "as --train_format says"
    if train_format == AUTO:
        source_format = _first_format(located)
        how = "recognised from the first record"
    _check_one_format(located, source_format, train_format == AUTO)
    if source_format in RECORD_FORMATS:
        validate_records(located, source_format)
        return LoadedData(located, source_format, source_format, how)
    record_format = FIXED_RECORD_FORMAT.get(source_format, INPUT_OUTPUT)  # alpaca: unless a record is a chat
    if source_format == ALPACA:
        chat = next((where for where, record in located if alpaca_as_chat(record)), None)
        if chat is not None:
            record_format = MULTI_TURN
            how += f"; as conversations because {chat} has a system or history"
    return LoadedData([(where, _converted(where, record, source_format, record_format)) for where, record in located],
                      record_format, source_format, how)


def _first_format(located: list[tuple[str, object]]) -> str:
    where, record = located[0]
    found = detect_format(record)
    if found is None and isinstance(record, dict) and "conversations" in record:
        found = MULTI_TURN  # this project's own format, whose validation says what is wrong
    if found is None:
        keys = ", ".join(map(repr, record)) if isinstance(record, dict) else json_type(record)
        shapes = "; ".join(f"{shape} ({name})" for name, shape in FORMAT_SHAPES.items())
        raise DataError(f"{where}: cannot tell the format of this record (it has {keys or 'no keys'}): expected "
                        f"{shapes}; or name it with --train_format")
    return found


def _check_one_format(located: list[tuple[str, object]], source_format: str, detected: bool) -> None:
    first = located[0][0]
    for where, record in located:
        if not isinstance(record, dict):
            raise DataError(f"{where}: a record must be a JSON object, found {json_type(record)}")
        found = detect_format(record)
        if found is None or found == source_format:
            continue
        if detected:
            raise DataError(f"{where}: this record is {found} ({FORMAT_SHAPES[found]}) but {first} is "
                            f"{source_format}: a file must hold records of one format")
        raise DataError(f"{where}: this record is {found} ({FORMAT_SHAPES[found]}) but --train_format is "
                        f"{source_format}; pass --train_format {found} (or auto)")


def _converted(where: str, record: dict, source_format: str, record_format: str) -> dict:
    try:
        if source_format == OPENAI:
            converted, role_fields, turns_field = openai_record(record)
        elif source_format == SHAREGPT:
            converted, role_fields, turns_field = sharegpt_record(record)
        else:
            converted, role_fields, turns_field = alpaca_record(record, record_format == MULTI_TURN)
    except FormatProblem as e:
        raise DataError(f"{where}: {e}") from None
    if record_format == MULTI_TURN:
        problem = validate_conversation_record(converted, role_fields, turns_field)
    else:
        problem = validate_prompt_response(converted)
    if problem:
        raise DataError(f"{where}: {problem}")
    return converted


# ---- shared pieces ---------------------------------------------------------------------------------

def _loss_flag(item: dict, field: str, trained: bool) -> bool | None:
    """A message's own `weight` (0/1) or `loss` (true/false), or None when it has neither."""
    given = [key for key in ("weight", "loss") if item.get(key) is not None]
    if not given:
        return None
    if len(given) == 2:
        raise FormatProblem(field, "has both 'weight' and 'loss'; keep one")
    key, value = given[0], item[given[0]]
    if not trained:
        raise FormatProblem(f"{field}.{key}", f"only assistant turns are trained (system, user, tool results never "
                            f"are); remove it")
    if key == "weight" and (isinstance(value, bool) or value not in (0, 1)):
        raise FormatProblem(f"{field}.weight", f"must be 0 or 1, found {json.dumps(value)}")
    if key == "loss" and not isinstance(value, bool):
        raise FormatProblem(f"{field}.loss", f"must be true or false, found {json.dumps(value)}")
    return bool(value)


def _turn(loss: bool | None, **fields) -> dict:
    return fields if loss is None else {**fields, "loss": loss}


def _arguments(value, field: str) -> dict:
    """Tool-call arguments: an object, or a string holding one (a blank string is no arguments)."""
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else {}
        except (json.JSONDecodeError, RecursionError) as e:
            reason = f"{e.msg} at column {e.colno}" if isinstance(e, json.JSONDecodeError) else "nested too deeply"
            raise FormatProblem(field, f"not valid JSON ({reason}); it must hold the arguments as a JSON "
                                       f"object") from None
    if not isinstance(value, dict):
        raise FormatProblem(field, f"must be a JSON object of arguments, found {json_type(value)}")
    return value


def _tools(value, field: str) -> list:
    """A record's tools as the tools system prompt lists them: OpenAI's {type: function, function: F}
    entries become F; other entries stay as they are. A string may hold
    the JSON list (as many published data sets store it)."""
    if value is None:
        return []
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else []
        except json.JSONDecodeError as e:
            raise FormatProblem(field, f"a string must hold a JSON list of tools ({e.msg} at column {e.colno})") \
                from None
    if not isinstance(value, list):
        raise FormatProblem(field, f"must be a list of tools, found {json_type(value)}")
    tools = []
    for i, tool in enumerate(value):
        if isinstance(tool, dict) and tool.get("type") == "function":
            if not isinstance(tool.get("function"), dict):
                raise FormatProblem(f"{field}[{i}].function", "must be an object (name, description, parameters)")
            tool = tool["function"]
        tools.append(tool)
    return tools


def _text(item: dict, key: str, field: str | None = None) -> str:
    name = f"{field}.{key}" if field else key
    if key not in item:
        raise FormatProblem(name, "missing")
    if not isinstance(item[key], str):
        raise FormatProblem(name, f"must be a string, found {json_type(item[key])}")
    return item[key]


def _record(tools: list, turns: list[dict]) -> dict:
    return {"tools": tools, "conversations": turns} if tools else {"conversations": turns}


def _turn_list(record: dict, key: str) -> list:
    if key not in record:
        raise FormatProblem(key, "missing")
    if not isinstance(record[key], list):
        raise FormatProblem(key, f"must be a list of turns, found {json_type(record[key])}")
    if not record[key]:
        raise FormatProblem(key, "the list is empty")
    return record[key]


# ---- OpenAI chat messages --------------------------------------------------------------------------

def openai_record(record: dict, lenient: bool = False) -> tuple[dict, list[str], str]:
    """{"messages", "tools"?} -> a multi-turn record, the field of each turn's role, "messages": the
    one translation of OpenAI chat messages, for training data and the API server alike.

    system and developer messages become system turns; an assistant message's text (if any) an
    assistant turn, each of its `tool_calls` a `tool` turn whose observation is the `tool` message
    answering it (by `tool_call_id`, else in order): ChatGLM3 writes every call followed by its
    result. Training data must keep to that. A chat request need not (`lenient`): a call with no
    result is a `tool` turn without observation, a result with no call an `observation` turn, and
    an assistant message may have no content.
    """
    messages = _turn_list(record, "messages")
    turns, role_fields = [], []
    index = 0
    while index < len(messages):
        message, field = messages[index], f"messages[{index}]"
        role = _role(message, field, "role", OPENAI_ROLES)
        if message.get("function_call") is not None:
            raise FormatProblem(f"{field}.function_call", "the legacy form; write the call in 'tool_calls'")
        loss = _loss_flag(message, field, trained=role == "assistant")
        if role == "tool" and not lenient:
            raise FormatProblem(field, "a 'tool' message must follow the assistant message whose tool_calls "
                                       "it answers")
        if role != "assistant":
            native = {"user": "user", "tool": "observation"}.get(role, "system")
            turns.append({"role": native, "content": _openai_content(message, field)})
            role_fields.append(f"{field}.role")
            index += 1
            continue
        calls = _openai_calls(message.get("tool_calls"), f"{field}.tool_calls")
        text = _openai_content(message, field, required=not (calls or lenient))
        if text.strip() or not calls:
            turns.append(_turn(loss, role="assistant", content=text))
            role_fields.append(f"{field}.role")
        end = index + 1
        while end < len(messages) and isinstance(messages[end], dict) and messages[end].get("role") == "tool":
            end += 1
        results, unanswering = _call_results(calls, messages, index, end, lenient)
        for (name, parameters, _), observation in zip(calls, results):
            result = {} if observation is None else {"observation": observation}
            turns.append(_turn(loss, role="tool", name=name, parameters=parameters, **result))
            role_fields.append(f"{field}.role")
        for position, observation in unanswering:
            turns.append({"role": "observation", "content": observation})
            role_fields.append(f"messages[{position}].role")
        index = end
    return _record(_tools(record.get("tools"), "tools"), turns), role_fields, "messages"


def _role(turn, field: str, key: str, roles) -> str:
    """turn[key] (the role: "role" or "from"), checked to be one of `roles`."""
    if not isinstance(turn, dict):
        raise FormatProblem(field, f"a turn must be an object, found {json_type(turn)}")
    if key not in turn:
        raise FormatProblem(f"{field}.{key}", "missing")
    if turn[key] not in roles:
        raise FormatProblem(f"{field}.{key}", f"{turn[key]!r} is not one of {', '.join(roles)}"
                                              f"{did_you_mean(str(turn[key]), roles)}")
    return turn[key]


def _openai_content(message: dict, field: str, required: bool = True) -> str:
    """A string, or the text parts of a list joined by newlines (as the API server reads them)."""
    content = message.get("content")
    if content is None:
        if required:
            raise FormatProblem(f"{field}.content", "missing")
        return ""
    if isinstance(content, list):
        for i, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise FormatProblem(f"{field}.content[{i}]", f"only text parts ({{\"type\": \"text\", \"text\": ...}}) "
                                    f"can be trained")
        return "\n".join(part["text"] for part in content)
    if not isinstance(content, str):
        raise FormatProblem(f"{field}.content", f"must be a string or a list of text parts, found {json_type(content)}")
    return content


def _openai_calls(calls, field: str) -> list[tuple[str, dict, str | None]]:
    """(name, arguments, id) of each call of an assistant message."""
    if calls is None:
        return []
    if not isinstance(calls, list):
        raise FormatProblem(field, f"must be a list, found {json_type(calls)}")
    parsed = []
    for i, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict):
            raise FormatProblem(f"{field}[{i}].function", "missing (a call is {\"id\", \"type\": \"function\", "
                                                          "\"function\": {\"name\", \"arguments\"}})")
        name = function.get("name")
        if not isinstance(name, str) or not name:
            raise FormatProblem(f"{field}[{i}].function.name", f"must be a non-empty string, found {json_type(name)}")
        if "arguments" not in function:
            raise FormatProblem(f"{field}[{i}].function.arguments", "missing")
        parsed.append((name, _arguments(function["arguments"], f"{field}[{i}].function.arguments"), call.get("id")))
    return parsed


def _call_results(calls: list[tuple[str, dict, str | None]], messages: list, index: int, end: int,
                  lenient: bool) -> tuple[list[str | None], list[tuple[int, str]]]:
    """The text of the `tool` message answering each call of messages[index] (the results are
    messages[index + 1:end]), and (position, text) of the results that answer none.

    A result answers the call its `tool_call_id` names, else the next call in order that no
    result names. Strict: every call has exactly one result; lenient: a call may have none, and
    results for no call (unknown ids count as none) are left over.
    """
    ids = [call_id for _, _, call_id in calls]
    results: list[str | None] = [None] * len(calls)
    in_order, unanswering = [], []
    for position in range(index + 1, end):
        message, field = messages[position], f"messages[{position}]"
        _loss_flag(message, field, trained=False)
        text, call_id = _openai_content(message, field), message.get("tool_call_id")
        if call_id is None or (lenient and call_id not in ids):
            in_order.append((position, text))
            continue
        if call_id not in ids:
            known = ", ".join(repr(i) for i in ids if i is not None) or "none"
            raise FormatProblem(f"{field}.tool_call_id", f"{call_id!r} matches no call of messages[{index}] "
                                                         f"(its call ids: {known})")
        answered = next((i for i, known in enumerate(ids) if known == call_id and results[i] is None), None)
        if answered is None and not lenient:
            raise FormatProblem(f"{field}.tool_call_id", f"a second result for call {call_id!r}")
        if answered is None:
            unanswering.append((position, text))
        else:
            results[answered] = text
    for position, text in in_order:
        answered = next((i for i, result in enumerate(results) if result is None), None)
        if answered is None and not lenient:
            raise FormatProblem(f"messages[{position}]", f"a 'tool' result with no call left to answer "
                                                         f"(messages[{index}] has {len(calls)} tool_calls)")
        if answered is None:
            unanswering.append((position, text))
        else:
            results[answered] = text
    for i, result in enumerate(results):
        if result is None and not lenient:
            raise FormatProblem(f"messages[{index}].tool_calls[{i}]", f"no 'tool' message answers this call; "
                                f"ChatGLM3 writes every call followed by its result, so add one right after "
                                f"messages[{index}]")
    return results, sorted(unanswering)


# ---- ShareGPT --------------------------------------------------------------------------------------

def sharegpt_record(record: dict) -> tuple[dict, list[str], str]:
    """{"conversations": [{"from", "value"}], "system"?, "tools"?} -> a multi-turn record, the
    field of each turn's role, "conversations". A `function_call` turn (value: JSON {"name",
    "arguments"}) and the `observation` turn after it become one `tool` turn."""
    source = _turn_list(record, "conversations")
    turns, role_fields = [], []
    system = record.get("system")
    if system is not None and not isinstance(system, str):
        raise FormatProblem("system", f"must be a string, found {json_type(system)}")
    if system:
        turns.append({"role": "system", "content": system})
        role_fields.append("system")
    index = 0
    while index < len(source):
        turn, field = source[index], f"conversations[{index}]"
        role = SHAREGPT_ROLES[_role(turn, field, "from", SHAREGPT_ROLES)]
        loss = _loss_flag(turn, field, trained=role in ("assistant", "tool"))
        value = _text(turn, "value", field)
        if role == "observation":
            raise FormatProblem(f"{field}.from", "an 'observation' must come right after the 'function_call' it "
                                                 "answers")
        if role == "tool":
            name, parameters = _sharegpt_call(value, f"{field}.value")
            result = source[index + 1] if index + 1 < len(source) else None
            if not isinstance(result, dict) or result.get("from") != "observation":
                raise FormatProblem(field, "a function_call must be followed by its 'observation' turn (ChatGLM3 "
                                    f"writes every call followed by its result)")
            _loss_flag(result, f"conversations[{index + 1}]", trained=False)
            observation = _text(result, "value", f"conversations[{index + 1}]")
            turns.append(_turn(loss, role="tool", name=name, parameters=parameters, observation=observation))
            index += 2
        else:
            turns.append(_turn(loss, role=role, content=value))
            index += 1
        role_fields.append(f"{field}.from")
    return _record(_tools(record.get("tools"), "tools"), turns), role_fields, "conversations"


def _sharegpt_call(value: str, field: str) -> tuple[str, dict]:
    try:
        call = json.loads(value)
    except json.JSONDecodeError as e:
        raise FormatProblem(field, f"a function_call's value must be JSON {{\"name\", \"arguments\"}} ({e.msg} at "
                            f"column {e.colno})") from None
    if isinstance(call, list):
        raise FormatProblem(field, "several calls in one turn; ChatGLM3 writes every call followed by its own "
                            f"result, so write one function_call/observation pair per call")
    if not isinstance(call, dict):
        raise FormatProblem(field, f"must be a JSON object {{\"name\", \"arguments\"}}, found {json_type(call)}")
    if not isinstance(call.get("name"), str) or not call["name"]:
        raise FormatProblem(field, "the call's \"name\" must be a non-empty string")
    if "arguments" not in call:
        raise FormatProblem(field, f"the call has no \"arguments\" (write {{}} for none)")
    return call["name"], _arguments(call["arguments"], f"{field}: arguments")


# ---- Alpaca ----------------------------------------------------------------------------------------

def alpaca_as_chat(record: dict) -> bool:
    """An Alpaca record with a system text or a history is a conversation; then the whole file is."""
    return bool(record.get("system") or record.get("history"))


def alpaca_record(record: dict, as_chat: bool) -> tuple[dict, list[str] | None, str | None]:
    """{"instruction", "input"?, "output", "system"?, "history"?} -> a prompt/response record (the
    prompt is the instruction, plus a newline and the input when there is one), or with `as_chat`
    a multi-turn one: system, the history's [question, answer] pairs, the prompt, the output."""
    instruction, output = _text(record, "instruction"), _text(record, "output")
    extra = _optional(record, "input", "")
    if not isinstance(extra, str):
        raise FormatProblem("input", f"must be a string, found {json_type(extra)}")
    prompt = "\n".join(part for part in (instruction, extra) if part)
    if not prompt:
        raise FormatProblem("instruction", "empty, and no input: the record has no prompt")
    if not as_chat:
        return {"prompt": prompt, "response": output}, None, None
    system = _optional(record, "system", "")
    if not isinstance(system, str):
        raise FormatProblem("system", f"must be a string, found {json_type(system)}")
    turns, role_fields = ([{"role": "system", "content": system}], ["system"]) if system else ([], [])
    history = _optional(record, "history", [])
    if not isinstance(history, list):
        raise FormatProblem("history", f"must be a list of [question, answer] pairs, found {json_type(history)}")
    for i, pair in enumerate(history):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(text, str) for text in pair)):
            raise FormatProblem(f"history[{i}]", f"must be a [question, answer] pair of strings, found "
                                f"{json.dumps(pair, ensure_ascii=False)[:80]}")
        turns += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
        role_fields += [f"history[{i}]", f"history[{i}]"]
    turns += [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]
    return {"conversations": turns}, role_fields + ["instruction", "output"], "alpaca"


def _optional(record: dict, key: str, default):
    """An optional field; null counts as absent (published Alpaca files write `"input": null`)."""
    value = record.get(key)
    return default if value is None else value


# ---- the format a run's data became -----------------------------------------------------------------

def settle_record_format(data_args, data: LoadedData, path: str) -> None:
    """Records on `data_args` what this run's data became; every split must become the same."""
    known = getattr(data_args, "resolved_format", None)
    if known is not None and known != data.record_format:
        raise DataError(f"{path}: its records become {data.record_format} records but the run's other data "
                        f"became {known}: give every split in one format")
    data_args.resolved_format = data.record_format


def record_format_of(data_args) -> str:
    """multi-turn or input-output: what --train_format's data becomes (alpaca and auto: once read)."""
    record_format = getattr(data_args, "resolved_format", None) or FIXED_RECORD_FORMAT.get(data_args.train_format)
    if record_format is None:
        raise RuntimeError(f"--train_format {data_args.train_format}: read the data before asking what it became")
    return record_format
