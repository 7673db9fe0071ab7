"""The "did you mean" hint of an error message: the valid choice closest to what was written."""

from __future__ import annotations

import difflib


def closest(word: str, choices) -> str | None:
    """The choice that differs from `word` only in case, else the closest by spelling (difflib's
    ratio of at least 0.6), else None."""
    choices = [str(choice) for choice in choices]
    same_letters = [choice for choice in choices if choice.lower() == str(word).lower()]
    if same_letters:
        return same_letters[0]
    close = difflib.get_close_matches(str(word), choices, n=1)
    return close[0] if close else None


def did_you_mean(word: str, choices) -> str:
    """`; did you mean 'user'?` to end an error message with, or "" when nothing is close."""
    match = closest(word, choices)
    return f"; did you mean {match!r}?" if match is not None else ""
