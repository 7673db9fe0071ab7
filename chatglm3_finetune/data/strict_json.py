"""JSON read strictly. Python's json module accepts what JSON does not (`NaN`, `Infinity`,
`-Infinity`), reads a number beyond the float range (`1e999`) as infinity, and keeps only the last
of two equal keys in one object, all silently. `loads` refuses each of them and names where the
value is, so a data file, an options file or a request body means what it says.

The check costs little: the decoder's hooks only see floats, constants and finished objects, and
the path to the refused value is looked up only when there is one.
"""

from __future__ import annotations

import json
import math


class StrictJsonError(ValueError):
    """A JSON value this project refuses. `location` is the path of keys and list indexes to it
    (empty: the whole document), `problem` says what is wrong and what to write instead."""

    def __init__(self, location: tuple, problem: str):
        self.location, self.problem = location, problem
        super().__init__(f"{field_path(location)}: {problem}" if location else problem)


def field_path(location: tuple) -> str:
    """("messages", 2, "content") -> "messages[2].content", the way error messages name fields."""
    path = ""
    for part in location:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path


def loads(text: str | bytes):
    """json.loads, raising StrictJsonError for NaN, Infinity, a number beyond the float range and a
    key given twice in one object (malformed JSON raises json.JSONDecodeError, as json.loads does)."""
    if isinstance(text, (bytes, bytearray)):
        text = text.decode(json.detect_encoding(text), "surrogatepass")
    try:
        return _STRICT.decode(text)
    except _Refused:
        location, problem = _first_refused(_MARKING.decode(text), ())
        raise StrictJsonError(location, problem) from None


class _Refused(Exception):
    pass


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise _Refused
    return value


def _refuse_constant(text: str):
    raise _Refused


def _unique_keys(pairs: list) -> dict:
    value = dict(pairs)
    if len(value) != len(pairs):
        raise _Refused
    return value


_STRICT = json.JSONDecoder(object_pairs_hook=_unique_keys, parse_float=_finite_float, parse_constant=_refuse_constant)


# Only after _STRICT refused the text: it is decoded again with the refused values marked, and the
# first one in document order is reported.

class _Marked:
    def __init__(self, text: str):
        self.text = text


class _WithDuplicate(dict):
    duplicate: str


def _marked_float(text: str):
    value = float(text)
    return _Marked(text) if math.isinf(value) else value


def _marked_object(pairs: list) -> dict:
    value = dict(pairs)
    if len(value) == len(pairs):
        return value
    marked, seen = _WithDuplicate(value), set()
    marked.duplicate = next(key for key, _ in pairs if key in seen or seen.add(key))
    return marked


_MARKING = json.JSONDecoder(object_pairs_hook=_marked_object, parse_float=_marked_float, parse_constant=_Marked)


def _first_refused(value, location: tuple) -> tuple[tuple, str] | None:
    if isinstance(value, _Marked):
        return location, _number_problem(value.text)
    if isinstance(value, _WithDuplicate):
        return (*location, value.duplicate), (f"the key {value.duplicate!r} appears twice in one object (a JSON "
                                              f"reader keeps only the last value); keep one")
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        found = _first_refused(item, (*location, key))
        if found:
            return found
    return None


def _number_problem(text: str) -> str:
    if text in ("NaN", "Infinity", "-Infinity"):
        return (f"{text} is not a JSON number (Python's json writes it for a float that is not finite); write a "
                f"number or null")
    return f"{text} is beyond the range of a float (it would be read as infinity); write a smaller number"
