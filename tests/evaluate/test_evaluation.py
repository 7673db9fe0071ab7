"""evaluation.py: prompts from records, decoding, scoring; generation-based evaluation in finetune.py
(the Trainer subclass), under DeepSpeed ZeRO-3 on the CPU."""

import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import EvalPrediction

from chatglm3_finetune.format.chat_parsing import ToolCall
from conftest import ROOT
from chatglm3_finetune.data.collation import GenerationCollator
from chatglm3_finetune.evaluate.evaluation import (GenerationEval, build_eval_items, decode_generated, generate_new_tokens,
                        prediction_rows, score_items)
from chatglm3_finetune.data.encoding import IGNORE_INDEX, encode_multi_turn, encode_prompt_response

TOOLS = [{"name": "get_weather", "description": "Get the weather of a city", "parameters": {"city": "string"}}]
TOOL_RECORD = {"tools": TOOLS, "conversations": [
    {"role": "user", "content": "What is the weather in Paris?"},
    {"role": "assistant", "content": "I will look it up."},
    {"role": "tool", "name": "get_weather", "parameters": {"city": "Paris"}, "observation": {"temperature": 21}},
    {"role": "assistant", "content": "It is 21 degrees in Paris."},
    {"role": "user", "content": "Add 2 and 3"},
    {"role": "interpreter", "content": "print(2 + 3)", "observation": "5"},
    {"role": "assistant", "content": "The sum is 5."},
]}
PROMPT_RECORDS = [{"prompt": "Hello there", "response": "Hello! How can I help you today?"},
                  {"prompt": "The quick brown fox jumps over the lazy dog " * 3, "response": "Thank you."}]


# ---- records -> prompts --------------------------------------------------------------------------

def test_conversation_items_are_the_training_sequence_up_to_each_generated_turn(tiny_tokenizer):
    items = build_eval_items(tiny_tokenizer, [TOOL_RECORD], "multi-turn")
    assert [(i.turn_index, i.role) for i in items] == [(1, "assistant"), (2, "tool"), (3, "assistant"),
                                                       (5, "interpreter"), (6, "assistant")]
    full = encode_multi_turn(tiny_tokenizer, TOOL_RECORD).input_ids
    assistant = tiny_tokenizer.role_token_id("assistant")
    starts = [i for i, token in enumerate(full) if token == assistant]
    for item, start in zip(items, starts):
        # the prompt is exactly what training saw before this turn's first target
        assert item.prompt_ids == full[:start + 1]
    assert items[1].expected_call == ToolCall("get_weather", {"city": "Paris"})
    assert items[1].reference == "```python\ntool_call(city='Paris')\n```"
    assert [i.expected_call for i in items if i.role != "tool"] == [None] * 4
    assert items[3].reference == "print(2 + 3)" and items[4].reference == "The sum is 5."


def test_prompt_response_items_are_the_training_source_capped(tiny_tokenizer):
    items = build_eval_items(tiny_tokenizer, PROMPT_RECORDS, "input-output", max_source_length=8)
    for item, record in zip(items, PROMPT_RECORDS):
        encoded = encode_prompt_response(tiny_tokenizer, record, max_source_length=8)
        source = [t for t, label in zip(encoded.input_ids, encoded.labels) if label == IGNORE_INDEX]
        assert item.prompt_ids == source and item.reference == record["response"]
    assert len(items[1].prompt_ids) == 8
    assert items[0].prompt_ids[:2] == [tiny_tokenizer.get_command("[gMASK]"), tiny_tokenizer.get_command("sop")]


def test_decode_generated_cuts_at_the_first_stop_token_and_drops_padding(tiny_tokenizer):
    hello = tiny_tokenizer.encode_text("Hello")
    user = tiny_tokenizer.get_command("<|user|>")
    assert decode_generated(tiny_tokenizer, hello + [user] + tiny_tokenizer.encode_text("more")) == "Hello"
    assert decode_generated(tiny_tokenizer, np.array(hello + [2, IGNORE_INDEX, IGNORE_INDEX])) == "Hello"
    assert decode_generated(tiny_tokenizer, hello + [IGNORE_INDEX]) == "Hello"


def thought_then_call(tokenizer) -> tuple[list[int], list[int]]:
    """(the thought's ids, the whole reply of a ToolAlpaca-trained model: the thought,
    `<|assistant|>`, the tool call, `<|observation|>`)."""
    thought = tokenizer.encode_text("\n") + tokenizer.encode_text("I will look it up.")
    call = tokenizer.encode_text("get_weather\n") + tokenizer.encode_text("```python\ntool_call(city='Paris')\n```")
    reply = thought + [tokenizer.role_token_id("assistant")] + call + [tokenizer.get_command("<|observation|>")]
    return thought, reply


def test_decode_generated_keeps_only_the_first_assistant_message(tiny_tokenizer):
    thought, reply = thought_then_call(tiny_tokenizer)
    text = decode_generated(tiny_tokenizer, reply)
    assert text == tiny_tokenizer.decode(thought) and "get_weather" not in text
    metrics = score_items(build_eval_items(tiny_tokenizer, [TOOL_RECORD], "multi-turn")[:1], [text])
    assert metrics["rouge-l"] == 100.0 and metrics["num_unexpected_calls"] == 0


class ScriptedGenerate:
    """A model whose `generate` writes `reply` after each prompt, stopping at `eos_token_id` and padding
    finished rows, as transformers' generate does."""

    def __init__(self, reply: list[int]):
        self.reply = reply

    def generate(self, input_ids, attention_mask=None, eos_token_id=(), pad_token_id=0, max_new_tokens=20, **kwargs):
        new = []
        for token in self.reply[:max_new_tokens]:
            new.append(token)
            if token in eos_token_id:
                break
        rows = torch.tensor([new] * input_ids.shape[0], dtype=torch.long)
        return torch.cat([input_ids, rows], dim=1)


def test_evaluation_generation_stops_at_a_new_assistant_message(tiny_tokenizer):
    thought, reply = thought_then_call(tiny_tokenizer)
    inputs = {"input_ids": torch.tensor([[5, 6, 7]]), "attention_mask": torch.ones(1, 3, dtype=torch.long)}
    new_tokens = generate_new_tokens(ScriptedGenerate(reply), inputs, tiny_tokenizer, {"max_new_tokens": 64})
    assert new_tokens[0].tolist() == thought + [tiny_tokenizer.role_token_id("assistant")]


# ---- scoring -----------------------------------------------------------------------------------

def perfect_and_wrong_texts():
    return [
        "\nI will look it up.",                                     # plain, exact
        "get_weather\n```python\ntool_call(city='Paris')\n```",      # tool call, exact
        "get_weather\n```python\ntool_call(city='Rome')\n```",       # right tool, wrong parameters
        "interpreter\n```python\nprint(2 + 3)\n```",                 # interpreter, exact
        "\nThe sum is 5.",                                          # plain, exact
    ]


def test_conversation_scores_split_plain_tool_and_interpreter_turns(tiny_tokenizer):
    items = build_eval_items(tiny_tokenizer, [TOOL_RECORD], "multi-turn")
    # the third item expects the plain answer "It is 21 degrees in Paris." and gets a tool call
    metrics = score_items(items, perfect_and_wrong_texts())
    assert metrics["num_expected_calls"] == 1 and metrics["tool_name_accuracy"] == 100.0
    assert metrics["parameters_exact_match"] == 100.0
    assert metrics["num_unexpected_calls"] == 1  # the plain turn answered with a call
    assert metrics["num_attempted_calls"] == 2 and metrics["well_formed_rate"] == 100.0
    assert metrics["num_interpreter_turns"] == 1 and metrics["interpreter_accuracy"] == 100.0
    assert metrics["interpreter_code_exact_match"] == 100.0
    assert metrics["num_plain_turns"] == 3 and metrics["num_items"] == 5
    # two of the three plain turns are exact, one is a tool call's code
    assert 60.0 < metrics["rouge-l"] < 100.0
    for key in ("rouge-1", "rouge-2", "rouge-l", "bleu-4"):
        assert key in metrics


def test_prompt_response_scores_and_prediction_rows(tiny_tokenizer):
    items = build_eval_items(tiny_tokenizer, PROMPT_RECORDS, "input-output")
    texts = [PROMPT_RECORDS[0]["response"], "nothing alike"]
    metrics = score_items(items, texts)
    assert set(metrics) == {"rouge-1", "rouge-2", "rouge-l", "bleu-4", "num_predictions"}
    assert 45.0 < metrics["rouge-1"] < 55.0  # one exact, one without a common word
    rows = prediction_rows(PROMPT_RECORDS, items, texts)
    assert rows[1] == {**PROMPT_RECORDS[1], "prediction": "nothing alike"}
    assert "prediction" not in PROMPT_RECORDS[0]  # the input records are not modified


def test_conversation_prediction_rows_list_each_generated_turn(tiny_tokenizer):
    items = build_eval_items(tiny_tokenizer, [TOOL_RECORD], "multi-turn")
    row = prediction_rows([TOOL_RECORD], items, perfect_and_wrong_texts())[0]
    assert row["conversations"] == TOOL_RECORD["conversations"]
    assert [p["turn"] for p in row["prediction"]] == [1, 2, 3, 5, 6]
    assert row["prediction"][1]["tool_call"] == {"name": "get_weather", "parameters": {"city": "Paris"}}
    assert row["prediction"][3]["code"] == "print(2 + 3)"
    assert row["prediction"][0] == {"turn": 1, "role": "assistant", "text": "\nI will look it up.",
                                    "content": "I will look it up.", "tool_call": None, "code": None, "error": None}


# ---- the Trainer's side --------------------------------------------------------------------------

def test_generation_collator_left_pads_and_keeps_item_indices():
    batch = GenerationCollator(pad_token_id=0)([{"input_ids": [5, 6, 7], "labels": [4]},
                                                {"input_ids": [8], "labels": [5]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch["labels"].tolist() == [[4], [5]]


def test_compute_metrics_maps_predictions_by_item_index(tiny_tokenizer, tmp_path):
    generation = GenerationEval(tiny_tokenizer, "input-output")
    generation.add_split("eval", PROMPT_RECORDS[:1])
    test = generation.add_split("test", PROMPT_RECORDS)
    assert test["labels"] == [[1], [2]]
    exact = tiny_tokenizer.encode_text(PROMPT_RECORDS[0]["response"]) + [2]
    wrong = tiny_tokenizer.encode_text("nothing alike")
    width = len(exact)
    rows = [exact, wrong + [IGNORE_INDEX] * (width - len(wrong)), exact]  # out of order, a padded repeat
    predictions, labels = np.array([rows[1], rows[0], rows[2]]), np.array([[2], [1], [1]])
    metrics = generation.compute_metrics(EvalPrediction(predictions=predictions, label_ids=labels))
    assert metrics["num_predictions"] == 2
    assert metrics["bleu-4"] == pytest.approx(score_items(
        build_eval_items(tiny_tokenizer, PROMPT_RECORDS, "input-output"),
        [PROMPT_RECORDS[0]["response"], "nothing alike"])["bleu-4"])
    path = generation.write_predictions("test", predictions, labels, str(tmp_path / "p.jsonl"))
    rows = [json.loads(line) for line in open(path, encoding="utf-8")]
    assert [r["prediction"] for r in rows] == [PROMPT_RECORDS[0]["response"], "nothing alike"]


# ---- finetune.py --predict_with_generate under ZeRO-3 (one process, torchrun) -------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


ZERO3_CONFIG = {
    "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                          "stage3_gather_16bit_weights_on_model_save": True},
    "optimizer": {"type": "AdamW", "params": {"lr": "auto", "torch_adam": True}},
}


@pytest.mark.slow
def test_finetune_predict_with_generate_under_zero3(tiny_model_dir, tmp_path, capsys):
    if shutil.which("torchrun") is None and not os.path.exists(os.path.join(os.path.dirname(sys.executable), "torchrun")):
        pytest.skip("torchrun is not installed")
    pytest.importorskip("deepspeed")
    data = tmp_path / "tool.jsonl"
    data.write_text(json.dumps(TOOL_RECORD) + "\n" + json.dumps({**TOOL_RECORD, "tools": TOOLS * 2}) + "\n")
    config = ROOT / "configs" / "ds_zero3.json"
    if not config.exists():
        config = tmp_path / "ds_zero3.json"
        config.write_text(json.dumps(ZERO3_CONFIG))
    out = tmp_path / "run"
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    command = [torchrun if os.path.exists(torchrun) else "torchrun", "--nproc_per_node", "1", "--master_port",
               str(free_port()), str(ROOT / "finetune.py"),
               "--model_name_or_path", tiny_model_dir, "--train_format", "multi-turn", "--train_file", str(data),
               "--validation_file", str(data), "--test_file", str(data), "--do_train", "--do_eval",
               "--do_predict", "--predict_with_generate", "--pre_seq_len", "4", "--max_steps", "2",
               "--learning_rate", "1e-2", "--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "3",
               "--max_target_length", "8", "--output_dir", str(out), "--use_cpu", "--save_strategy", "no",
               "--report_to", "none", "--deepspeed", str(config), "--preprocessing_cache_dir", str(tmp_path / "c")]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    run = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]

    results = json.loads((out / "all_results.json").read_text())
    for prefix in ("eval", "predict"):
        for key in ("rouge-1", "rouge-2", "rouge-l", "bleu-4", "tool_name_accuracy", "parameters_exact_match"):
            assert f"{prefix}_{key}" in results
        assert results[f"{prefix}_num_items"] == 10 and results[f"{prefix}_num_expected_calls"] == 2
    assert results["eval_bleu-4"] == results["predict_bleu-4"]
    rows = [json.loads(line) for line in (out / "generated_predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and [p["turn"] for p in rows[0]["prediction"]] == [1, 2, 3, 5, 6]

    # the trained prefix, loaded by inference.py, generates the same predictions outside DeepSpeed
    import inference

    assert inference.main(["--model", tiny_model_dir, "--pt-checkpoint", str(out), "--input", str(data),
                           "--output", str(tmp_path / "again.jsonl"), "--max-new-tokens", "8",
                           "--device", "cpu"]) == 0
    again = [json.loads(line) for line in (tmp_path / "again.jsonl").read_text().splitlines()]
    assert [[p["text"] for p in r["prediction"]] for r in again] == [[p["text"] for p in r["prediction"]]
                                                                     for r in rows]
    metrics = json.loads((tmp_path / "again.jsonl.metrics.json").read_text())
    assert metrics["bleu-4"] == results["predict_bleu-4"]
    capsys.readouterr()
