#!/usr/bin/env python3
"""AdvertiseGen JSON lines {"content", "summary"} -> prompt/response JSON lines.

    python scripts/format_advertise_gen.py --path AdvertiseGen/train.json
    # writes formatted_data/advertise_gen.jsonl with {"prompt": content, "response": summary}

A line that is not a JSON object with string "content" and "summary" stops the conversion
with an error naming the file, the line and the field; nothing is dropped silently.
Blank lines are not records and are passed over.
"""

from __future__ import annotations

import json
import sys
from typing import Iterable

from ..records import split_lines
from ..splitting import converter_arguments, write_converted
from ..strict_json import StrictJsonError, loads

FIELDS = {"content": "prompt", "summary": "response"}


class AdvertiseGenError(ValueError):
    """A line of the input that is not an AdvertiseGen record; the message names file:line and field."""


def convert_advertise_gen(lines: Iterable[str], source: str = "<input>") -> list[dict]:
    """One {"prompt", "response"} row per non-blank line, in order; raises AdvertiseGenError on a bad line
    (NaN, Infinity and a key given twice included). Give the lines as records.split_lines cuts them,
    so that line numbers count newlines only."""
    rows = []
    for line_number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{source}:{line_number}"
        try:
            record = loads(line)
        except json.JSONDecodeError as error:
            raise AdvertiseGenError(f"{where}: not valid JSON ({error.msg} at column {error.colno})") from None
        except StrictJsonError as error:
            raise AdvertiseGenError(f"{where}: {error}") from None
        if not isinstance(record, dict):
            raise AdvertiseGenError(f"{where}: expected a JSON object with \"content\" and \"summary\", "
                                    f"got {type(record).__name__}")
        row = {}
        for field, target in FIELDS.items():
            if field not in record:
                raise AdvertiseGenError(f"{where}: field \"{field}\" is missing")
            if not isinstance(record[field], str):
                raise AdvertiseGenError(f"{where}: field \"{field}\" must be a string, "
                                        f"got {type(record[field]).__name__}")
            row[target] = record[field]
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser, args = converter_arguments(__doc__.split("\n\n")[0], "AdvertiseGen file: one JSON object per line",
                                       "formatted_data/advertise_gen.jsonl", argv)
    try:
        with open(args.path, encoding="utf-8", newline="") as f:
            rows = convert_advertise_gen(split_lines(f.read()), source=args.path)
    except (OSError, UnicodeDecodeError) as error:
        print(f"error: cannot read {args.path}: {error}", file=sys.stderr)
        return 2
    except AdvertiseGenError as error:
        print(f"error: {error}. Fix or remove that line and run again.", file=sys.stderr)
        return 2
    for line in write_converted(parser, args, rows):
        print(f"{args.path}: {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
