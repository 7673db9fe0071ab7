"""The dataset converters: ToolAlpaca -> multi-turn tool conversations, AdvertiseGen -> prompt/response."""

import json
import subprocess
import sys

import pytest

from conftest import ROOT, shared_path

from chatglm3_finetune.data.converters.advertise_gen import AdvertiseGenError, convert_advertise_gen  # noqa: E402
from chatglm3_finetune.data.converters.tool_alpaca import (  # noqa: E402
    BAD_ACTION_INPUT, BAD_STEP, ERROR_INSTANCE, NO_DOCUMENTATION, NOT_AN_OBJECT, PARAMETERS_NOT_OBJECT,
    ToolAlpacaFileError, convert_instance, convert_tool_alpaca, length_histogram,
)

SAMPLE_TOOL_ALPACA = ROOT / "data" / "sample" / "tool_alpaca_train.json"
SAMPLE_ADVERTISE_GEN = ROOT / "data" / "sample" / "advertise_gen_train.json"


def load_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def counts(skipped):
    return {reason: len(places) for reason, places in skipped.items()}


def good_instance(**changes):
    instance = {
        "input": "Weather in Paris?",
        "output": "It is sunny.",
        "Final Thought": "I know the weather.",
        "intermediate_steps": [[["getWeather", '{"city": "Paris", "days": 3}',
                                 "  I should look it up.\nAction: getWeather\nAction Input: {\"city\": \"Paris\"}"],
                                '{"temp": 20}']],
    }
    instance.update(changes)
    return instance


# --- ToolAlpaca: one instance -----------------------------------------------------------------

def test_instance_becomes_user_thought_tool_and_final_turns():
    row = convert_instance(["DOC"], good_instance())
    assert row == {
        "tools": ["DOC"],
        "conversations": [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": "I should look it up."},
            {"role": "tool", "name": "getWeather", "parameters": {"city": "Paris", "days": 3},
             "observation": '{"temp": 20}'},
            {"role": "assistant", "content": "I know the weather.\nIt is sunny."},
        ],
    }
    assert list(row["conversations"][2]["parameters"]) == ["city", "days"]  # the order tool_call() shows


def test_instance_without_steps_is_user_then_final_answer():
    row = convert_instance(["DOC"], good_instance(intermediate_steps=[]))
    assert [t["role"] for t in row["conversations"]] == ["user", "assistant"]


@pytest.mark.parametrize("instance, reason", [
    ({"error": "generation failed"}, ERROR_INSTANCE),
    ("not a dict", NOT_AN_OBJECT),
    ({k: v for k, v in good_instance().items() if k != "Final Thought"}, 'missing field "Final Thought"'),
    (good_instance(input=None), 'field has the wrong type: "input" must be str'),
    (good_instance(intermediate_steps=[["getWeather", "{}"]]), BAD_STEP),
    (good_instance(intermediate_steps=[[["getWeather", "{}"], "obs"]]), BAD_STEP),
    (good_instance(intermediate_steps=[[["getWeather", '{"date": ${start date}}', "t\nAction: x"], "obs"]]),
     BAD_ACTION_INPUT),
    (good_instance(intermediate_steps=[[["getWeather", '["Paris"]', "t\nAction: x"], "obs"]]),
     PARAMETERS_NOT_OBJECT),
])
def test_damaged_instances_are_skipped_and_counted_by_reason(instance, reason):
    records = [{"Name": "W", "NLDocumentation": "DOC", "Instances": [good_instance(), instance, good_instance()]}]
    rows, skipped = convert_tool_alpaca(records)
    assert len(rows) == 2
    assert skipped == {reason: ["[0] (W) Instances[1]"]}


def test_api_without_documentation_skips_its_instances_with_a_reason():
    records = [{"Name": "A", "Instances": [good_instance(), good_instance()]},
               {"Name": "B", "NLDocumentation": "DOC", "Instances": [good_instance()]}]
    rows, skipped = convert_tool_alpaca(records)
    assert len(rows) == 1 and counts(skipped) == {NO_DOCUMENTATION: 2}


@pytest.mark.parametrize("records, message", [
    ({"Instances": []}, "expected a JSON list of API records"),
    ([{"Name": "A", "NLDocumentation": "DOC"}], '[0]: an API record needs an "Instances" list'),
])
def test_not_tool_alpaca_train_data_is_an_error(records, message):
    with pytest.raises(ToolAlpacaFileError, match=message.replace("[", r"\[")):
        convert_tool_alpaca(records, source="x.json")


# --- ToolAlpaca: the shared train-format file ----------------------------------------------------

def test_shared_train_sample_keeps_70_of_102():
    records = load_json(shared_path("toolalpaca", "train_sample.json"))
    rows, skipped = convert_tool_alpaca(records)
    assert len(records) == 10
    assert sum(len(api["Instances"]) for api in records) == 102
    assert len(rows) == 70
    assert counts(skipped) == {BAD_ACTION_INPUT: 31, ERROR_INSTANCE: 1}
    assert skipped[ERROR_INSTANCE] == ["[0] (Axolotl) Instances[10]"]
    assert length_histogram(rows) == {4: 51, 6: 13, 8: 4, 10: 1, 12: 1}
    for row in rows:
        assert len(row["tools"]) == 1 and isinstance(row["tools"][0], str)


def test_shared_train_sample_record_field_by_field():
    records = load_json(shared_path("toolalpaca", "train_sample.json"))
    source = records[0]["Instances"][6]
    assert source["input"].startswith("My nephew is crazy about axolotls")  # the record this test pins
    rows, _ = convert_tool_alpaca(records)
    row = next(r for r in rows if r["conversations"][0]["content"] == source["input"])

    assert row["tools"] == [records[0]["NLDocumentation"]]
    assert row["tools"][0].startswith("getRandomAxolotlImage: Retrieve a random axolotl image")
    turns = row["conversations"]
    assert [t["role"] for t in turns] == ["user"] + ["assistant", "tool"] * 3 + ["assistant"]
    for k, size in enumerate(["small", "medium", "large"]):
        thought, tool = turns[1 + 2 * k], turns[2 + 2 * k]
        assert thought == {"role": "assistant", "content": "I need to call searchAxolotlImages to answer this."}
        assert tool == {
            "role": "tool", "name": "searchAxolotlImages",
            "parameters": {"color": "wild", "gender": "", "size": size, "page": 1},
            "observation": '{"status": 200, "data": "(synthetic response of searchAxolotlImages)"}',
        }
        assert tool["observation"] == source["intermediate_steps"][k][1]
    assert turns[-1] == {"role": "assistant",
                         "content": "I have the information the user asked for.\nHere is what I found using Axolotl."}


# --- ToolAlpaca: the bundled sample ----------------------------------------------------------------

def test_bundled_tool_alpaca_sample():
    records = load_json(SAMPLE_TOOL_ALPACA)
    rows, skipped = convert_tool_alpaca(records)
    assert len(records) == 8
    assert sum(len(api["Instances"]) for api in records) == 42
    assert len(rows) == 41 and counts(skipped) == {ERROR_INSTANCE: 1}
    assert length_histogram(rows) == {4: 38, 6: 3}
    for row in rows:
        for turn in row["conversations"]:
            if turn["role"] == "tool":
                assert isinstance(turn["parameters"], dict) and turn["observation"]
            else:
                assert turn["content"].strip()
    assert any("北京" in row["conversations"][0]["content"] for row in rows)


# --- AdvertiseGen ----------------------------------------------------------------------------------

def test_advertise_gen_maps_content_and_summary():
    lines = ['{"content": "类型#裙*颜色#红色", "summary": "红色的裙子。", "extra": 1}\n', "\n",
             '{"summary": "s", "content": "c"}']
    assert convert_advertise_gen(lines) == [{"prompt": "类型#裙*颜色#红色", "response": "红色的裙子。"},
                                            {"prompt": "c", "response": "s"}]


@pytest.mark.parametrize("bad_line, message", [
    ('{"content": "c", "summary": ', r"bad\.json:3: not valid JSON"),
    ('["c", "s"]', r"bad\.json:3: expected a JSON object .* got list"),
    ('{"content": "c"}', r'bad\.json:3: field "summary" is missing'),
    ('{"content": 5, "summary": "s"}', r'bad\.json:3: field "content" must be a string, got int'),
])
def test_advertise_gen_bad_line_names_file_line_and_field(bad_line, message):
    lines = ['{"content": "a", "summary": "b"}', "", bad_line, '{"content": "a", "summary": "b"}']
    with pytest.raises(AdvertiseGenError, match=message):
        convert_advertise_gen(lines, source="bad.json")


def test_shared_advertise_gen_dev():
    path = shared_path("advertisegen", "dev.json")
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    rows = convert_advertise_gen(lines, source=str(path))
    assert len(rows) == 1070
    first = json.loads(lines[0])
    assert rows[0] == {"prompt": first["content"], "response": first["summary"]}
    assert rows[0]["prompt"] == "类型#上衣*材质#牛仔布*颜色#白色*风格#简约*图案#刺绣*衣样式#外套*衣款式#破洞"
    assert rows[0]["response"].startswith("简约而不简单的牛仔外套")


def test_bundled_advertise_gen_sample():
    with open(SAMPLE_ADVERTISE_GEN, encoding="utf-8") as f:
        rows = convert_advertise_gen(f, source=str(SAMPLE_ADVERTISE_GEN))
    assert len(rows) == 40
    assert all(row["prompt"].startswith("类型#") and row["response"] for row in rows)


# --- the scripts, end to end -----------------------------------------------------------------------

def run_script(name, *args, cwd=ROOT):
    return subprocess.run([sys.executable, str(ROOT / "scripts" / name), *map(str, args)],
                          cwd=cwd, capture_output=True, text=True, timeout=60)


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_format_tool_alpaca_script_writes_default_output_and_summary(tmp_path):
    done = run_script("format_tool_alpaca.py", "--path", SAMPLE_TOOL_ALPACA, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    output = tmp_path / "formatted_data" / "tool_alpaca.jsonl"
    rows = read_jsonl(output)
    assert len(rows) == 41 and set(rows[0]) == {"tools", "conversations"}
    assert "北京" in output.read_text(encoding="utf-8")  # ensure_ascii=False
    for expected in ("APIs: 8", "instances read: 42", "kept: 41", "skipped: 1",
                     f'1  {ERROR_INSTANCE} (first: [0] (SimpleWeather) Instances[6])',
                     "conversation lengths", "4:    38", "6:     3"):
        assert expected in done.stdout


def test_format_tool_alpaca_script_on_shared_sample(tmp_path):
    output = tmp_path / "new" / "dir" / "ta.jsonl"
    done = run_script("format_tool_alpaca.py", "--path", shared_path("toolalpaca", "train_sample.json"),
                      "--output", output)
    assert done.returncode == 0, done.stderr
    assert len(read_jsonl(output)) == 70
    assert "kept: 70" in done.stdout and f"31  {BAD_ACTION_INPUT}" in done.stdout


def test_format_tool_alpaca_script_rejects_non_list_without_traceback(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"Instances": []}')
    done = run_script("format_tool_alpaca.py", "--path", bad, "--output", tmp_path / "o.jsonl")
    assert done.returncode != 0
    assert "expected a JSON list of API records" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "o.jsonl").exists()


def test_format_advertise_gen_script_writes_default_output(tmp_path):
    done = run_script("format_advertise_gen.py", "--path", SAMPLE_ADVERTISE_GEN, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    output = tmp_path / "formatted_data" / "advertise_gen.jsonl"
    lines = output.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 40 and lines[0].startswith('{"prompt": "类型#')
    assert "40 records" in done.stdout


def test_format_advertise_gen_script_bad_line_exits_with_file_line_and_field(tmp_path):
    bad = tmp_path / "ad.json"
    bad.write_text('{"content": "a", "summary": "b"}\n{"content": "a", "summary": null}\n', encoding="utf-8")
    done = run_script("format_advertise_gen.py", "--path", bad, "--output", tmp_path / "o.jsonl")
    assert done.returncode != 0
    assert f'{bad}:2: field "summary" must be a string' in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "o.jsonl").exists()


def test_format_advertise_gen_script_missing_file(tmp_path):
    done = run_script("format_advertise_gen.py", "--path", tmp_path / "nope.json")
    assert done.returncode == 2 and done.stderr == f"error: --path {tmp_path / 'nope.json'}: no such data file\n"


def test_scripts_are_executable():
    for name in ("format_tool_alpaca.py", "format_advertise_gen.py", "make_tiny_model.py"):
        path = ROOT / "scripts" / name
        assert path.read_text().startswith("#!/usr/bin/env python3\n")
        assert path.stat().st_mode & 0o111, f"chmod +x {path}"


def test_converters_write_a_seeded_train_dev_test_split(tmp_path, capsys):
    from chatglm3_finetune.data.converters import advertise_gen
    from chatglm3_finetune.data.converters import tool_alpaca

    output = tmp_path / "formatted_data" / "advertise_gen.jsonl"
    assert advertise_gen.main(["--path", str(SAMPLE_ADVERTISE_GEN), "--output", str(output),
                               "--split", "0.8,0.1,0.1", "--seed", "3"]) == 0
    parts = {name: read_jsonl(tmp_path / "formatted_data" / f"advertise_gen_{name}.jsonl")
             for name in ("train", "dev", "test")}
    assert {name: len(rows) for name, rows in parts.items()} == {"train": 32, "dev": 4, "test": 4}
    prompts = [row["prompt"] for rows in parts.values() for row in rows]
    assert sorted(prompts) == sorted(row["prompt"] for row in convert_advertise_gen(open(SAMPLE_ADVERTISE_GEN)))
    assert not output.exists()
    printed = capsys.readouterr().out
    assert f"test: 4 records -> {tmp_path / 'formatted_data' / 'advertise_gen_test.jsonl'}" in printed

    # the same seed gives the same files; a dev fraction of 0 writes no dev file
    again = tmp_path / "again" / "ta.jsonl"
    for _ in range(2):
        assert tool_alpaca.main(["--path", str(SAMPLE_TOOL_ALPACA), "--output", str(again),
                                 "--split", "0.9,0,0.1"]) == 0
        first_test = (tmp_path / "again" / "ta_test.jsonl").read_text(encoding="utf-8")
        assert first_test == (tmp_path / "again" / "ta_test.jsonl").read_text(encoding="utf-8")
    assert sorted(p.name for p in (tmp_path / "again").iterdir()) == ["ta_test.jsonl", "ta_train.jsonl"]
    assert len(read_jsonl(tmp_path / "again" / "ta_test.jsonl")) == 4


@pytest.mark.parametrize("split,message", [("0.8,0.1", "three fractions"), ("0.9,0.1,0.1", "add up to 1"),
                                           ("0.98,0.01,0.01", "leaves the dev part empty")])
def test_converter_split_errors_name_the_flag(tmp_path, capsys, split, message):
    from chatglm3_finetune.data.converters import advertise_gen

    with pytest.raises(SystemExit) as exit_info:
        advertise_gen.main(["--path", str(SAMPLE_ADVERTISE_GEN), "--output", str(tmp_path / "o.jsonl"),
                            "--split", split])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"error: --split {split}" in err and message in err and "Traceback" not in err
    assert not list(tmp_path.iterdir())
