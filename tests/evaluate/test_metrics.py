"""Generation metrics (ROUGE on jieba words, BLEU-4 on characters) and tool-call metrics,
checked against values worked out by hand."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

from chatglm3_finetune.format.chat_parsing import ToolCall, parse_assistant_reply

from chatglm3_finetune.format.chat_format import render_tool_call
from chatglm3_finetune.evaluate.metrics import generation_metrics, same_parameters, score_generation, tool_call_metrics, words

ROOT = Path(__file__).resolve().parents[2]


def f_score(precision, recall):
    return 2 * precision * recall / (precision + recall)


def test_english_scores_by_hand():
    # words: prediction [the, cat, sat]; reference [the, cat, sat, on, the, mat]
    # ROUGE-1 (rouge_chinese counts DISTINCT n-grams): prediction {the, cat, sat} = 3,
    #   reference {the, cat, sat, on, mat} = 5, overlap 3 -> P = 3/3, R = 3/5, F = 0.75
    # ROUGE-2: prediction {the cat, cat sat} = 2; reference {the cat, cat sat, sat on, on the,
    #   the mat} = 5; overlap 2 -> P = 1, R = 2/5, F = 0.8 / 1.4 = 0.571428...
    # ROUGE-L: LCS("the cat sat", "the cat sat on the mat") = 3 words, reference length 6 (all
    #   words, repeats included), prediction 3 -> P = 1, R = 1/2, F = 2/3
    # BLEU-4 on characters: the 11 characters of "the cat sat" are a prefix of the 22-character
    #   reference, so every clipped n-gram precision p1..p4 is 1; brevity penalty
    #   exp(1 - 22/11) = exp(-1) -> 0.367879...
    scores = generation_metrics(["the cat sat"], ["the cat sat on the mat"])
    assert scores == pytest.approx({
        "rouge-1": 100 * f_score(1, 3 / 5),
        "rouge-2": 100 * f_score(1, 2 / 5),
        "rouge-l": 100 * f_score(1, 1 / 2),
        "bleu-4": 100 * math.exp(-1),
    }, abs=1e-4)
    assert scores == {"rouge-1": 75.0, "rouge-2": 57.1429, "rouge-l": 66.6667, "bleu-4": 36.7879}


def test_chinese_scores_by_hand():
    assert words("我爱北京天安门") == ["我", "爱", "北京", "天安门"]
    assert words("我爱北京") == ["我", "爱", "北京"]
    # ROUGE-1: {我, 爱, 北京} vs {我, 爱, 北京, 天安门}: P = 1, R = 3/4, F = 6/7
    # ROUGE-2: {我 爱, 爱 北京} vs {我 爱, 爱 北京, 北京 天安门}: P = 1, R = 2/3, F = 0.8
    # ROUGE-L: LCS 3 words, reference 4 -> P = 1, R = 3/4, F = 6/7
    # BLEU-4 on characters: "我爱北京" (4 chars) is a prefix of the 7-character reference:
    #   p1..p4 = 4/4, 3/3, 2/2, 1/1; brevity penalty exp(1 - 7/4) = exp(-0.75)
    scores = generation_metrics(["我爱北京"], ["我爱北京天安门"])
    assert scores == pytest.approx({
        "rouge-1": 100 * 6 / 7, "rouge-2": 80.0, "rouge-l": 100 * 6 / 7,
        "bleu-4": 100 * math.exp(-0.75),
    }, abs=1e-4)


def test_bleu_with_partial_ngram_matches_by_hand():
    # characters a b c e vs reference a b c d (same length: brevity penalty 1)
    #   1-grams a, b, c match, e does not        -> 3/4
    #   2-grams ab, bc match, ce does not        -> 2/3
    #   3-grams abc matches, bce does not        -> 1/2
    #   4-gram abce does not match               -> 0/1, which method3 replaces by 1/(2^1 * 1) = 1/2
    #   BLEU = (3/4 * 2/3 * 1/2 * 1/2) ** (1/4) = (1/8) ** (1/4) = 2 ** -0.75
    expected = 2 ** -0.75
    direct = sentence_bleu([list("abcd")], list("abce"), smoothing_function=SmoothingFunction().method3)
    assert direct == pytest.approx(expected)
    scores = score_generation("abce", "abcd")
    assert scores["bleu-4"] == pytest.approx(expected)
    # jieba keeps each ASCII run as one word: "abce" and "abcd" share no word
    assert (scores["rouge-1"], scores["rouge-2"], scores["rouge-l"]) == (0.0, 0.0, 0.0)


def test_identical_short_strings_cannot_reach_bleu_100():
    # 3 characters have no 4-gram: method3 gives p4 = 1/2, so BLEU = (1 * 1 * 1 * 1/2) ** (1/4)
    assert score_generation("abc", "abc")["bleu-4"] == pytest.approx(0.5 ** 0.25)


@pytest.mark.parametrize("text", ["the cat sat on the mat", "我爱北京天安门", "价格：199元！好评。再来一次？"])
def test_identical_strings_score_100(text):
    assert generation_metrics([text], [text]) == dict.fromkeys(["rouge-1", "rouge-2", "rouge-l", "bleu-4"], 100.0)


@pytest.mark.parametrize("prediction, reference", [
    ("", "the cat"), ("the cat", ""), ("", ""), ("   \n", "我爱北京"), ("我爱北京", " \t"),
])
def test_empty_sides_score_zero_without_crashing(prediction, reference):
    assert generation_metrics([prediction], [reference]) == dict.fromkeys(
        ["rouge-1", "rouge-2", "rouge-l", "bleu-4"], 0.0)


def test_scores_are_averaged_over_records():
    scores = generation_metrics(["我爱北京天安门", ""], ["我爱北京天安门", "我爱北京天安门"])
    assert scores == dict.fromkeys(["rouge-1", "rouge-2", "rouge-l", "bleu-4"], 50.0)


def test_no_records_and_mismatched_lengths():
    assert generation_metrics([], []) == dict.fromkeys(["rouge-1", "rouge-2", "rouge-l", "bleu-4"], 0.0)
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        generation_metrics(["a", "b"], ["a"])


def test_surrounding_blanks_of_a_decoded_reply_are_ignored():
    assert generation_metrics(["\n 我爱北京天安门 "], ["我爱北京天安门"])["bleu-4"] == 100.0


def test_jieba_prints_nothing_in_cli_use():
    code = ("import json; from chatglm3_finetune.evaluate import metrics; "
            "print(json.dumps(metrics.generation_metrics(['我爱北京'], ['我爱北京天安门'])))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                            timeout=120, check=True)
    assert json.loads(result.stdout)["rouge-2"] == 80.0
    assert "prefix dict" not in result.stdout + result.stderr
    assert result.stderr == ""


# --- tool calls ---------------------------------------------------------------------------------

def _call_text(name, parameters):
    return name + "\n" + render_tool_call(name, parameters)


def test_tool_call_metrics_by_hand():
    weather = ToolCall("get_weather", {"city": "Paris", "days": 3})
    search = ToolCall("search", {"q": "x"})
    predicted = [
        _call_text("get_weather", {"days": 3, "city": "Paris"}),  # exact (key order is free)
        _call_text("get_weather", {"city": "Paris", "days": 4}),  # right name, wrong value
        _call_text("find", {"q": "x"}),                           # wrong name
        "search\n```python\ntool_call('x')\n```",                 # malformed: positional
        "\n Hello!",                                              # plain answer, as expected
        _call_text("search", {"q": "y"}),                         # a call where none was expected
    ]
    expected = [weather, weather, search, search, None, None]
    # 4 expected calls; names right in rows 0, 1 -> 2/4; parameters right in row 0 -> 1/4;
    # 5 replies look like calls (all but row 4), 4 of them parse -> 4/5; row 5 is unexpected.
    assert tool_call_metrics(predicted, expected) == {
        "tool_name_accuracy": 50.0,
        "parameters_exact_match": 25.0,
        "well_formed_rate": 80.0,
        "num_predictions": 6,
        "num_expected_calls": 4,
        "num_attempted_calls": 5,
        "num_unexpected_calls": 1,
    }


def test_tool_call_metrics_accept_parsed_replies_and_count_interpreter_turns():
    predicted = [parse_assistant_reply("interpreter\n```python\nprint(1)\n```"),
                 parse_assistant_reply("interpreter\n```python\nprint(1)")]
    metrics = tool_call_metrics(predicted, [None, None])
    assert metrics["well_formed_rate"] == 50.0
    assert metrics["num_attempted_calls"] == 2


def test_tool_call_metrics_without_expected_calls_report_zero_and_the_count():
    metrics = tool_call_metrics(["\nHi", "\nHello"], [None, None])
    assert metrics == {
        "tool_name_accuracy": 0.0, "parameters_exact_match": 0.0, "well_formed_rate": 0.0,
        "num_predictions": 2, "num_expected_calls": 0, "num_attempted_calls": 0,
        "num_unexpected_calls": 0,
    }
    assert tool_call_metrics([], [])["num_predictions"] == 0
    with pytest.raises(ValueError, match="1 predicted but 2 expected"):
        tool_call_metrics(["\nHi"], [None, None])


def test_parameters_compare_as_json_values():
    assert same_parameters({"a": 3, "b": [1, {"c": None}]}, {"b": [1, {"c": None}], "a": 3.0})
    assert same_parameters({"a": (1, 2)}, {"a": [1, 2]})
    assert not same_parameters({"flag": True}, {"flag": 1})
    assert not same_parameters({"flag": False}, {"flag": 0})
    assert not same_parameters({"x": None}, {"x": 0})
    assert not same_parameters({"x": "3"}, {"x": 3})
    assert not same_parameters({"x": [1, 2]}, {"x": [2, 1]})
    assert not same_parameters({"x": 1}, {"x": 1, "y": None})
