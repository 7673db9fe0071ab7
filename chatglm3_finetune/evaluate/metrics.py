"""Evaluation metrics: ROUGE/BLEU for generated text, accuracy for generated tool calls.

Generation scores follow the official ChatGLM(-6B/3) P-Tuning evaluation:
- ROUGE-1/2/L: `rouge_chinese.Rouge` F score on `jieba.cut` words joined by spaces
  (rouge_chinese counts each distinct n-gram once for ROUGE-1/2; ROUGE-L is the longest common
  subsequence of the whole word sequences);
- BLEU-4: `nltk` `sentence_bleu([list(reference)], list(prediction),
  smoothing_function=SmoothingFunction().method3)` on CHARACTERS, equal weights for 1..4-grams.
Each is computed per record, averaged over records, then x100 and rounded to 4 decimals (the
original rounded each record first; the difference is below the last digit shown). Texts are
stripped first, and jieba's whitespace tokens are dropped (rouge_chinese ignores blanks anyway).
A pair with an empty prediction or reference scores 0.0 on every metric.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import jieba
from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
from rouge_chinese import Rouge

from ..format.chat_parsing import AssistantReply, ToolCall, parse_assistant_reply

jieba.setLogLevel(logging.WARNING)  # silences "Building prefix dict ..." on first use

GENERATION_METRICS = ("rouge-1", "rouge-2", "rouge-l", "bleu-4")
_ROUGE = Rouge()
_SMOOTHING = SmoothingFunction().method3


def words(text: str) -> list[str]:
    """jieba words of a text, without the whitespace tokens."""
    return [word for word in jieba.cut(text) if word.strip()]


def score_generation(prediction: str, reference: str) -> dict[str, float]:
    """One record's scores as fractions in [0, 1] (keys: GENERATION_METRICS)."""
    prediction, reference = prediction.strip(), reference.strip()
    predicted_words, reference_words = words(prediction), words(reference)
    if not predicted_words or not reference_words:
        # rouge_chinese raises on an empty side; BLEU of nothing is 0 too.
        return dict.fromkeys(GENERATION_METRICS, 0.0)
    rouge = _ROUGE.get_scores(" ".join(predicted_words), " ".join(reference_words))[0]
    scores = {name: rouge[name]["f"] for name in ("rouge-1", "rouge-2", "rouge-l")}
    scores["bleu-4"] = float(sentence_bleu([list(reference)], list(prediction),
                                           smoothing_function=_SMOOTHING))
    return scores


def generation_metrics(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F and BLEU-4 over record pairs, x100, rounded to 4 decimals.

    An empty list gives 0.0 for every metric. Strings shorter than 4 characters cannot reach a
    BLEU-4 of 100 even when identical (method3 smoothing gives the missing 4-gram precision 1/2).
    """
    _check_same_length(predictions, references, "predictions", "references")
    totals = dict.fromkeys(GENERATION_METRICS, 0.0)
    for prediction, reference in zip(predictions, references):
        for name, value in score_generation(prediction, reference).items():
            totals[name] += value
    count = len(predictions)
    return {name: round(100 * total / count, 4) if count else 0.0 for name, total in totals.items()}


def tool_call_metrics(predicted: list[AssistantReply | str],
                      expected: list[ToolCall | None]) -> dict[str, Any]:
    """How well generated replies reproduce the expected tool calls.

    `predicted[i]` is a generated reply (text or already parsed); `expected[i]` the call it
    should make, or None where a plain answer was expected. Percentages (x100, 4 decimals):
    - `tool_name_accuracy`: among records with an expected call, the share whose reply parses
      into a tool call with the same name;
    - `parameters_exact_match`: among the same records, the share with the same name AND equal
      parameters (order of keys ignored; values compared as JSON values: 3 == 3.0, True != 1,
      tuples equal lists);
    - `well_formed_rate`: among replies that look like a call (non-empty metadata, i.e. a tool
      name or `interpreter`, or `tool_call(` in the text), the share that parse (a tool call or
      interpreter code, no `error`).
    A share with nothing to count is 0.0; the counts are returned beside it: `num_predictions`,
    `num_expected_calls`, `num_attempted_calls` (replies that look like a call) and
    `num_unexpected_calls` (replies that look like a call where a plain answer was expected).
    """
    _check_same_length(predicted, expected, "predicted", "expected")
    replies = [parse_assistant_reply(p) if isinstance(p, str) else p for p in predicted]
    expected_calls = [(reply, call) for reply, call in zip(replies, expected) if call is not None]
    attempted = [reply for reply in replies if reply.looks_like_call]
    same_name = [(reply.tool_call, call) for reply, call in expected_calls
                 if reply.tool_call is not None and reply.tool_call.name == call.name]
    exact = [1 for made, call in same_name if same_parameters(made.parameters, call.parameters)]
    well_formed = [reply for reply in attempted if reply.error is None]
    unexpected = [1 for reply, call in zip(replies, expected) if call is None and reply.looks_like_call]
    return {
        "tool_name_accuracy": percent(len(same_name), len(expected_calls)),
        "parameters_exact_match": percent(len(exact), len(expected_calls)),
        "well_formed_rate": percent(len(well_formed), len(attempted)),
        "num_predictions": len(replies),
        "num_expected_calls": len(expected_calls),
        "num_attempted_calls": len(attempted),
        "num_unexpected_calls": len(unexpected),
    }


def same_parameters(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Equal as JSON values: key order ignored, 3 == 3.0, but True != 1 and None != 0."""
    return _comparable(a) == _comparable(b)


def _comparable(value: Any) -> Any:
    if isinstance(value, bool):
        return ("bool", value)
    if isinstance(value, (int, float)):
        return ("number", value)
    if isinstance(value, dict):
        return ("object", {key: _comparable(item) for key, item in value.items()})
    if isinstance(value, (list, tuple)):
        return ("array", [_comparable(item) for item in value])
    return (type(value).__name__, value)


def percent(count: int, total: int) -> float:
    """count / total in percent, rounded to 4 decimals; 0.0 when there is nothing to count."""
    return round(100 * count / total, 4) if total else 0.0


def _check_same_length(a: Sequence, b: Sequence, a_name: str, b_name: str) -> None:
    if len(a) != len(b):
        raise ValueError(f"{len(a)} {a_name} but {len(b)} {b_name}: pass one of each per record")
