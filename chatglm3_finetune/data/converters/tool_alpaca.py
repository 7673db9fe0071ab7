#!/usr/bin/env python3
"""ToolAlpaca train data (a JSON list of API records) -> multi-turn tool conversations.

    python scripts/format_tool_alpaca.py --path ToolAlpaca/data/train_data.json
    # writes formatted_data/tool_alpaca.jsonl with {"tools", "conversations"} per line

Per API, tools = [NLDocumentation] (one natural-language string, as the reference does).
Per instance: a user turn from "input"; per intermediate step [[name, params_json, thought_log],
observation] an assistant turn with the thought (the log before "Action:") and a tool turn
{name, parameters, observation}; then an assistant turn "Final Thought\\noutput".
Damaged instances (the generator leaves some) are skipped, counted by reason and reported.
"""

from __future__ import annotations

import json
import sys
from collections import Counter

from ..splitting import converter_arguments, write_converted
from ..strict_json import StrictJsonError, loads

ERROR_INSTANCE = 'instance has "error"'
NOT_AN_OBJECT = "instance is not a JSON object"
NO_DOCUMENTATION = "API record has no NLDocumentation string"
MISSING_FIELD = "missing field"
WRONG_TYPE = "field has the wrong type"
BAD_STEP = "intermediate step is not [[name, params_json, thought_log], observation]"
BAD_ACTION_INPUT = "Action Input is not valid JSON"
PARAMETERS_NOT_OBJECT = "parameters are not a JSON object"

INSTANCE_FIELDS = {"input": str, "output": str, "Final Thought": str, "intermediate_steps": list}


class DamagedInstance(ValueError):
    """An instance the converter cannot turn into a conversation; args[0] is the reason."""


class ToolAlpacaFileError(ValueError):
    """The file itself is not ToolAlpaca train data (not a list of API records with Instances)."""


def convert_instance(tools: list[str], instance) -> dict:
    """One {"tools", "conversations"} row; raises DamagedInstance(reason) for a damaged instance."""
    if not isinstance(instance, dict):
        raise DamagedInstance(NOT_AN_OBJECT)
    if "error" in instance:
        raise DamagedInstance(ERROR_INSTANCE)
    for field, kind in INSTANCE_FIELDS.items():
        if field not in instance:
            raise DamagedInstance(f'{MISSING_FIELD} "{field}"')
        if not isinstance(instance[field], kind):
            raise DamagedInstance(f'{WRONG_TYPE}: "{field}" must be {kind.__name__}')

    conversations = [{"role": "user", "content": instance["input"]}]
    for step in instance["intermediate_steps"]:
        if not (isinstance(step, list) and len(step) == 2 and isinstance(step[0], list) and len(step[0]) == 3
                and all(isinstance(part, str) for part in step[0])):
            raise DamagedInstance(BAD_STEP)
        (name, params_json, thought_log), observation = step
        try:
            parameters = loads(params_json)
        except (json.JSONDecodeError, StrictJsonError):  # NaN or a repeated key: not JSON training can use
            raise DamagedInstance(BAD_ACTION_INPUT) from None
        if not isinstance(parameters, dict):
            raise DamagedInstance(PARAMETERS_NOT_OBJECT)
        conversations.append({"role": "assistant", "content": thought_log.split("Action:")[0].strip()})
        conversations.append({"role": "tool", "name": name, "parameters": parameters, "observation": observation})
    conversations.append({"role": "assistant", "content": instance["Final Thought"] + "\n" + instance["output"]})
    return {"tools": tools, "conversations": conversations}


def convert_tool_alpaca(records: list, source: str = "<input>") -> tuple[list[dict], dict[str, list[str]]]:
    """All convertible instances as rows, and the skipped ones as {reason: [where, ...]}.

    Raises ToolAlpacaFileError when the data is not a list of API records that hold an "Instances" list.
    """
    if not isinstance(records, list):
        raise ToolAlpacaFileError(f"{source}: expected a JSON list of API records, got {type(records).__name__}")
    rows, skipped = [], {}
    for api_index, api in enumerate(records):
        if not isinstance(api, dict) or not isinstance(api.get("Instances"), list):
            raise ToolAlpacaFileError(f'{source}: [{api_index}]: an API record needs an "Instances" list')
        api_name = api.get("Name", "?")
        documentation = api.get("NLDocumentation")
        for instance_index, instance in enumerate(api["Instances"]):
            try:
                if not isinstance(documentation, str):
                    raise DamagedInstance(NO_DOCUMENTATION)
                rows.append(convert_instance([documentation], instance))
            except DamagedInstance as damage:
                where = f"[{api_index}] ({api_name}) Instances[{instance_index}]"
                skipped.setdefault(damage.args[0], []).append(where)
    return rows, skipped


def count_instances(records: list) -> int:
    return sum(len(api["Instances"]) for api in records)


def length_histogram(rows: list[dict]) -> dict[int, int]:
    """{number of turns: number of conversations}, sorted by length."""
    return dict(sorted(Counter(len(row["conversations"]) for row in rows).items()))


def summary_lines(records: list, rows: list[dict], skipped: dict[str, list[str]]) -> list[str]:
    lines = [
        f"APIs: {len(records)}",
        f"instances read: {count_instances(records)}",
        f"kept: {len(rows)}",
        f"skipped: {sum(len(v) for v in skipped.values())}",
    ]
    for reason, places in sorted(skipped.items(), key=lambda item: -len(item[1])):
        lines.append(f"  {len(places):5d}  {reason} (first: {places[0]})")
    histogram = length_histogram(rows)
    lines.append("conversation lengths (turns: conversations):")
    widest = max(histogram.values(), default=1)
    for turns, count in histogram.items():
        lines.append(f"  {turns:3d}: {count:5d} {'#' * max(1, round(40 * count / widest))}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser, args = converter_arguments(__doc__.split("\n\n")[0], "ToolAlpaca train-format JSON file (a list of API records)",
                                       "formatted_data/tool_alpaca.jsonl", argv)
    try:
        with open(args.path, encoding="utf-8", newline="") as f:
            records = loads(f.read())
        rows, skipped = convert_tool_alpaca(records, source=args.path)
    except (OSError, UnicodeDecodeError) as error:
        print(f"error: cannot read {args.path}: {error}", file=sys.stderr)
        return 2
    except json.JSONDecodeError as error:
        print(f"error: {args.path}:{error.lineno}: not valid JSON ({error.msg} at column {error.colno})",
              file=sys.stderr)
        return 2
    except StrictJsonError as error:
        print(f"error: {args.path}: {error}", file=sys.stderr)
        return 2
    except ToolAlpacaFileError as error:
        print(f"error: {error}. Is this ToolAlpaca train data (train_data.json)?", file=sys.stderr)
        return 2
    print("\n".join(summary_lines(records, rows, skipped)))
    print("\n".join(write_converted(parser, args, rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
