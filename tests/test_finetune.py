"""finetune.py on the CPU with a tiny model: option and data errors (in-process, through
`finetune.main`; one real process for the exit code), outputs and resume (training processes, slow)."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_finetune


def common_args(model_dir, data, output_dir, *extra):
    return ["--model_name_or_path", model_dir, "--train_format", "multi-turn", "--train_file", data,
            "--output_dir", str(output_dir), "--do_train", "--use_cpu", "--report_to", "none",
            "--per_device_train_batch_size", "2", "--logging_steps", "1", "--max_seq_length", "512",
            "--preprocessing_cache_dir", str(output_dir) + "-cache", *extra]


# ---- options fail fast, before any model loads ---------------------------------------------------

def test_unknown_train_format_is_rejected(tiny_model_dir, formatted_samples, tmp_path, finetune_in_process):
    args = common_args(tiny_model_dir, formatted_samples["multi-turn"], tmp_path / "o")
    args[args.index("multi-turn")] = "chat"
    result = finetune_in_process(*args)
    assert result.returncode == 2
    assert "--train_format" in result.stderr and "invalid choice: 'chat'" in result.stderr


def test_missing_data_file_is_rejected(tiny_model_dir, tmp_path, finetune_in_process):
    result = finetune_in_process(*common_args(tiny_model_dir, str(tmp_path / "nope.jsonl"), tmp_path / "o"))
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: --train_file {tmp_path / 'nope.jsonl'}: no such data file"
    assert "Loaded" not in result.stdout


BAD_RECORD = '{"conversations": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": 3}]}\n'


def assert_bad_record_refused(result, data):
    assert result.returncode == 2
    assert result.stderr.strip().endswith(f"error: {data}:1: conversations[1].content: must be a string, found a number")
    assert "Traceback" not in result.stderr


def test_bad_data_is_reported_by_line_without_traceback(tiny_model_dir, tmp_path, finetune_in_process):
    data = tmp_path / "bad.jsonl"
    data.write_text(BAD_RECORD)
    assert_bad_record_refused(finetune_in_process(*common_args(tiny_model_dir, str(data), tmp_path / "o")), data)


def test_a_user_mistake_exits_2_without_traceback_from_a_real_process(tiny_model_dir, tmp_path):
    """The in-process tests above see SystemExit; this one sees what a shell sees."""
    data = tmp_path / "bad.jsonl"
    data.write_text(BAD_RECORD)
    assert_bad_record_refused(run_finetune(*common_args(tiny_model_dir, str(data), tmp_path / "o"), check=False), data)


def test_an_error_is_written_in_one_piece(monkeypatch):
    """Ranks that fail together write to one pipe: a line written in pieces could merge with theirs."""
    import finetune

    writes = []
    monkeypatch.setattr("sys.stderr", type("Stderr", (), {"write": lambda self, text: writes.append(text),
                                                          "flush": lambda self: None})())
    with pytest.raises(SystemExit) as stopped:
        finetune.fail("--model_name_or_path models/x: no such folder")
    assert stopped.value.code == 2
    assert writes == ["error: --model_name_or_path models/x: no such folder\n"]


def test_pre_seq_len_must_agree_with_the_checkpoint(tiny_model_dir, formatted_samples, tmp_path, finetune_in_process):
    from transformers import AutoModelForCausalLM

    from chatglm3_finetune.model.ptuning.prefix_model import PrefixTuningModel

    checkpoint = tmp_path / "prefix"
    PrefixTuningModel(AutoModelForCausalLM.from_pretrained(tiny_model_dir), 8).save_pretrained(str(checkpoint))
    args = common_args(tiny_model_dir, formatted_samples["multi-turn"], tmp_path / "o",
                       "--ptuning_checkpoint", str(checkpoint), "--pre_seq_len", "4")
    result = finetune_in_process(*args)
    assert result.returncode == 2
    assert ("--pre_seq_len 4 disagrees with the checkpoint" in result.stderr
            and "trained with pre_seq_len 8" in result.stderr)
    assert "Loaded" not in result.stdout


# ---- what a run leaves behind ----------------------------------------------------------------------

@pytest.mark.slow
def test_json_args_file_full_finetune_outputs(tiny_model_dir, formatted_samples, tmp_path, finetune_in_process):
    """One .json file stands for all flags; a full run saves a loadable model and its records."""
    from transformers import AutoModelForCausalLM

    output_dir = tmp_path / "full"
    options = {"model_name_or_path": tiny_model_dir, "train_format": "input-output",
               "train_file": formatted_samples["input-output"], "output_dir": str(output_dir), "do_train": True,
               "use_cpu": True, "report_to": "none", "per_device_train_batch_size": 2, "max_steps": 3,
               "logging_steps": 1, "learning_rate": 1e-3, "max_source_length": 64, "max_target_length": 32,
               "max_train_samples": 10, "preprocessing_cache_dir": str(tmp_path / "cache"), "save_strategy": "no"}
    args_file = tmp_path / "args.json"
    args_file.write_text(json.dumps(options))
    result = finetune_in_process(str(args_file))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Sanity Check >>>>>>>>>>>>>" in result.stdout and "'[gMASK]':" in result.stdout

    config = json.loads((output_dir / "run_config.json").read_text())
    assert config["data"]["max_train_samples"] == 10 and config["training"]["learning_rate"] == 1e-3
    assert config["model"]["model_name_or_path"] == tiny_model_dir
    assert (output_dir / "loss_curve.png").stat().st_size > 1000
    train_results = json.loads((output_dir / "train_results.json").read_text())
    assert train_results["train_records"] == 10
    state = json.loads((output_dir / "trainer_state.json").read_text())
    logged = [entry for entry in state["log_history"] if "loss" in entry]
    assert len(logged) == 3 and logged[-1]["supervised_tokens"] > logged[0]["supervised_tokens"] > 0

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    trained = AutoModelForCausalLM.from_pretrained(str(output_dir))
    assert not torch.equal(base.lm_head.weight, trained.lm_head.weight)


def prefix_weights(folder):
    return load_file(os.path.join(folder, "prefix_encoder.safetensors"))


@pytest.mark.slow
def test_interrupted_run_resumes_to_the_same_weights(tiny_model_dir, formatted_samples, tmp_path,
                                                     finetune_in_process):
    output_dir = tmp_path / "pt"
    args = common_args(tiny_model_dir, formatted_samples["multi-turn"], output_dir, "--pre_seq_len", "4",
                       "--max_steps", "4", "--save_steps", "2", "--learning_rate", "2e-2", "--seed", "7")
    first = finetune_in_process(*args)
    assert first.returncode == 0, first.stderr[-2000:]
    uninterrupted = prefix_weights(output_dir)
    assert sorted(os.listdir(output_dir / "checkpoint-4")) == sorted(os.listdir(output_dir / "checkpoint-2"))

    # As if the run died while writing its last checkpoint, checkpoint-4: the final model gone, checkpoint-4 half
    # written (no manifest yet).
    for name in ("prefix_encoder.safetensors", "trainer_state.json"):
        os.remove(output_dir / name)
    for name in ("trainer_state.json", "manifest.json"):
        os.remove(output_dir / "checkpoint-4" / name)

    result = finetune_in_process(*args)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (f"Not resuming from {output_dir / 'checkpoint-4'}: it is incomplete (no manifest.json: its save did not "
            f"complete)") in result.stdout + result.stderr
    assert f"Resuming from {output_dir / 'checkpoint-2'}" in result.stdout + result.stderr
    resumed = prefix_weights(output_dir)
    for name, tensor in uninterrupted.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=0, atol=1e-6)
    state = json.loads((output_dir / "trainer_state.json").read_text())
    assert state["global_step"] == 4


def test_resume_from_a_named_checkpoint_must_exist(tiny_model_dir, formatted_samples, tmp_path, finetune_in_process):
    args = common_args(tiny_model_dir, formatted_samples["multi-turn"], tmp_path / "o", "--pre_seq_len", "4",
                       "--resume_from_checkpoint", str(tmp_path / "missing"), "--max_steps", "1")
    result = finetune_in_process(*args)
    assert result.returncode == 2
    assert result.stderr.strip() == (f"error: --resume_from_checkpoint {tmp_path / 'missing'}: not a complete "
                                     f"checkpoint (no such folder): name another, or leave the option out to resume "
                                     f"from the newest complete one")
    assert not (tmp_path / "o").exists()  # the folder this try created is removed again


@pytest.mark.parametrize("policy", ["drop", "error"])
def test_truncation_policy_reaches_the_data(tiny_model_dir, tiny_tokenizer, formatted_samples, tmp_path, policy,
                                            finetune_in_process):
    from chatglm3_finetune.data.encoding import encode_multi_turn
    from chatglm3_finetune.data.records import read_records

    lengths = sorted(len(encode_multi_turn(tiny_tokenizer, record).input_ids)
                     for _, record in read_records(formatted_samples["multi-turn"]))
    cap = lengths[len(lengths) // 2]
    too_long = sum(length > cap for length in lengths)
    args = common_args(tiny_model_dir, formatted_samples["multi-turn"], tmp_path / "o", "--pre_seq_len", "2",
                       "--max_steps", "1", "--save_strategy", "no", "--truncation_policy", policy)
    args[args.index("--max_seq_length") + 1] = str(cap)
    result = finetune_in_process(*args)
    if policy == "error":
        assert result.returncode == 2 and "truncation removed supervised targets" in result.stderr
    else:
        assert result.returncode == 0, result.stderr[-2000:]
        assert f"{too_long} dropped by --truncation_policy drop" in result.stdout + result.stderr
        train_results = json.loads((tmp_path / "o" / "train_results.json").read_text())
        assert train_results["train_records"] == len(lengths) - too_long


def test_nothing_left_to_train_is_an_error(tiny_model_dir, formatted_samples, tmp_path, finetune_in_process):
    args = common_args(tiny_model_dir, formatted_samples["multi-turn"], tmp_path / "o", "--pre_seq_len", "2",
                       "--max_steps", "1", "--truncation_policy", "drop")
    args[args.index("--max_seq_length") + 1] = "16"
    result = finetune_in_process(*args)
    assert result.returncode == 2
    assert "no records left to use" in result.stderr and "Traceback" not in result.stderr


def first_losses(output_dir):
    state = json.loads((output_dir / "trainer_state.json").read_text())
    return [entry["loss"] for entry in state["log_history"] if "loss" in entry]


@pytest.mark.slow
def test_loss_on_targets_only_learns_the_same_and_packing_trains(tiny_model_dir, formatted_samples, tmp_path,
                                                                 finetune_in_process):
    runs = {}
    for name, extra in {"targets-only": [], "all-positions": ["--no_loss_on_targets_only"],
                        "packed": ["--packing"]}.items():
        output_dir = tmp_path / name
        result = finetune_in_process(*common_args(tiny_model_dir, formatted_samples["multi-turn"], output_dir,
                                                  "--pre_seq_len", "4", "--prefix_dropout", "0", "--max_steps", "2",
                                                  "--save_strategy", "no", "--learning_rate", "1e-2", *extra))
        assert result.returncode == 0, result.stderr[-2000:]
        runs[name] = (output_dir, result.stdout + result.stderr)
    torch.testing.assert_close(first_losses(runs["targets-only"][0]), first_losses(runs["all-positions"][0]),
                               rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(prefix_weights(runs["targets-only"][0]), prefix_weights(runs["all-positions"][0]),
                               rtol=1e-4, atol=1e-5)
    assert "Packed 41 records into" in runs["packed"][1]
    assert len(first_losses(runs["packed"][0])) == 2


@pytest.mark.slow
def test_val_size_evaluates_held_out_records_and_the_summary_says_how_to_chat(tiny_model_dir, formatted_samples,
                                                                               tmp_path, finetune_in_process):
    """--val_size holds records out of --train_file; --do_eval reports their loss, and with
    --predict_with_generate the generation metrics on --max_eval_samples of them; the run ends with
    a summary whose inference command works as printed."""
    import shlex
    import subprocess
    import sys

    from conftest import ROOT

    output_dir = tmp_path / "pt"
    args = common_args(tiny_model_dir, formatted_samples["input-output"], output_dir, "--pre_seq_len", "2",
                       "--max_steps", "2", "--save_strategy", "no", "--do_eval", "--val_size", "0.25",
                       "--eval_strategy", "steps", "--eval_steps", "2")  # as the launchers pass VAL_SIZE
    args[args.index("multi-turn")] = "input-output"
    result = run_finetune(*args)
    out = result.stdout
    assert "--val_size 0.25: 10 of the 40 records" in out
    assert json.loads((output_dir / "train_results.json").read_text())["train_records"] == 30
    evaluated = json.loads((output_dir / "eval_results.json").read_text())
    assert evaluated["eval_loss"] > 0
    # the last step's evaluation is the final one: it runs once, not again after training
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    assert [entry["eval_loss"] for entry in history if "eval_loss" in entry] == [evaluated["eval_loss"]]
    assert out.count("***** eval metrics *****") == 1
    assert "Model config" not in out and "share your model" not in out  # transformers' INFO chatter is quiet
    summary = out[out.index("==== Run summary"):].splitlines()
    assert summary[1].startswith(f"train data {formatted_samples['input-output']}: 30 records, 30 used, 0 left out")
    assert f"eval data {formatted_samples['input-output']} (held out by --val_size): 10 records, 10 used" in "\n".join(summary)
    assert any(line.startswith("eval: eval_loss ") for line in summary)
    command = summary[-1].removeprefix("chat with it: ")
    python, rest = command.split(" ", 1)
    assert rest == f"inference.py --model {tiny_model_dir} --pt-checkpoint {output_dir}"
    assert os.path.samefile(os.path.join(ROOT, python), sys.executable)  # the venv's Python, no bare `python`
    chat = subprocess.run([sys.executable, *shlex.split(command)[1:], "--prompt", "Hi", "--max-new-tokens", "2"],
                          capture_output=True, text=True, cwd=str(ROOT), timeout=120)
    assert chat.returncode == 0, chat.stderr[-2000:]

    generated = tmp_path / "gen"
    args = common_args(tiny_model_dir, formatted_samples["input-output"], generated, "--do_eval", "--val_size", "5",
                       "--predict_with_generate", "--max_eval_samples", "3",
                       "--max_target_length", "4")
    args[args.index("multi-turn")] = "input-output"
    args.remove("--do_train")
    result = finetune_in_process(*args)
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((generated / "eval_results.json").read_text())
    assert metrics["eval_num_predictions"] == 3 and "eval_rouge-l" in metrics


# ---- the output folder: apart from the inputs, one run at a time ---------------------------------------

def tree(folder):
    return {os.path.join(root, name): os.path.getsize(os.path.join(root, name))
            for root, _, names in os.walk(folder) for name in names}


@pytest.mark.parametrize("where, relation, option", [
    ("model", "is", "--model_name_or_path"),
    ("model/out", "sits inside", "--model_name_or_path"),
    ("data", "contains", "--train_file"),
    ("data/train.jsonl", "is", "--train_file"),
])
def test_an_output_folder_near_the_inputs_is_refused_before_anything_is_written(tiny_model_dir, formatted_samples,
                                                                                tmp_path, finetune_in_process, where,
                                                                                relation, option):
    model, data = tmp_path / "model", tmp_path / "data"
    shutil.copytree(tiny_model_dir, model)
    data.mkdir()
    shutil.copy(formatted_samples["multi-turn"], data / "train.jsonl")
    before = tree(tmp_path)
    output_dir = tmp_path / where
    args = common_args(str(model), str(data / "train.jsonl"), output_dir, "--pre_seq_len", "2", "--max_steps", "1")
    args[args.index("--preprocessing_cache_dir") + 1] = str(tmp_path / "cache")
    result = finetune_in_process(*args)
    assert result.returncode == 2
    given = {"--model_name_or_path": model, "--train_file": data / "train.jsonl"}[option]
    assert result.stderr.strip() == (
        f"error: --output_dir {output_dir} {relation} {option} {given}: a run writes checkpoints and its final model "
        f"there and could overwrite or mix with its inputs. Choose another --output_dir (or pass "
        f"--allow_output_near_inputs if you really mean it)")
    assert tree(tmp_path) == before


def test_allow_output_near_inputs_accepts_a_folder_beside_the_data(tiny_model_dir, formatted_samples, tmp_path,
                                                                     finetune_in_process):
    shutil.copy(formatted_samples["multi-turn"], tmp_path / "train.jsonl")
    args = common_args(tiny_model_dir, str(tmp_path / "train.jsonl"), tmp_path, "--pre_seq_len", "2", "--max_steps",
                       "1", "--save_strategy", "no", "--allow_output_near_inputs")
    result = finetune_in_process(*args)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "prefix_encoder.safetensors").exists() and (tmp_path / "train.jsonl").exists()


def test_a_folder_in_use_is_refused_naming_its_run_before_anything_loads(tiny_model_dir, formatted_samples, tmp_path,
                                                                        finetune_in_process):
    import subprocess
    import sys

    output_dir = tmp_path / "o"
    output_dir.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\n"
                               "from chatglm3_finetune.train.run_lock import RunLock\n"
                               "RunLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(60)",
                               str(output_dir)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        result = finetune_in_process(*common_args(tiny_model_dir, formatted_samples["multi-turn"], output_dir,
                                                  "--pre_seq_len", "2", "--max_steps", "1"))
    finally:
        holder.kill()
        holder.wait()
    assert result.returncode == 2
    assert result.stderr.strip().startswith(f"error: --output_dir {output_dir} is in use by another run "
                                            f"(pid {holder.pid} on ")
    assert "Sanity Check" not in result.stdout and sorted(os.listdir(output_dir)) == ["run.lock"]


def test_a_failed_try_leaves_no_empty_output_folder_behind(formatted_samples, tmp_path, finetune_in_process):
    output_dir = tmp_path / "output" / "run-20260101"
    (tmp_path / "output").mkdir()
    result = finetune_in_process(*common_args(str(tmp_path / "no-model"), formatted_samples["multi-turn"],
                                              output_dir, "--pre_seq_len", "2", "--max_steps", "1"))
    assert result.returncode == 2 and "--model_name_or_path" in result.stderr
    assert os.listdir(tmp_path / "output") == []

    output_dir.mkdir()  # a folder the user made is kept, even empty
    finetune_in_process(*common_args(str(tmp_path / "no-model"), formatted_samples["multi-turn"], output_dir,
                                     "--pre_seq_len", "2", "--max_steps", "1"))
    assert output_dir.is_dir() and os.listdir(output_dir) == []
