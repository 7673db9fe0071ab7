"""arguments.py: finetune.py's options, checked in-process before anything loads: options files, DeepSpeed
configs, length caps (against the model's context too), --val_size; each a one-line error, exit 2."""

import json

import pytest

import finetune
from arguments import OptionError, check_options, parse_args


def base_options(model_dir, data, tmp_path):
    return {"model_name_or_path": model_dir, "train_format": "multi-turn", "train_file": data,
            "output_dir": str(tmp_path / "out"), "do_train": True, "use_cpu": True, "report_to": "none"}


def as_flags(options: dict) -> list[str]:
    flags = []
    for key, value in options.items():
        flags += [f"--{key}"] if value is True else [f"--{key}", str(value)]
    return flags


def finetune_error(capsys, argv) -> str:
    """The one line finetune.main prints for a user mistake (exit 2, no traceback)."""
    with pytest.raises(SystemExit) as exit_info:
        finetune.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "Traceback" not in err and "\n" not in err, err
    return err


# ---- options files -------------------------------------------------------------------------------

def test_json_syntax_error_names_file_line_and_column(tmp_path, capsys, tiny_model_dir, formatted_samples):
    text = json.dumps(base_options(tiny_model_dir, formatted_samples["multi-turn"], tmp_path), indent=1)
    path = tmp_path / "args.json"
    path.write_text(text[:-2] + ",\n}")  # a trailing comma
    lines = path.read_text().splitlines()
    err = finetune_error(capsys, [str(path)])
    assert err.startswith(f"error: {path}:{len(lines)}:1: invalid JSON in the options file: ")


def test_yaml_syntax_error_names_file_line_and_column(tmp_path, capsys):
    path = tmp_path / "args.yaml"
    path.write_text("train_format: multi-turn\ndo_train: true\nlearning_rate: [1e-3\nmax_steps: 3\n")
    err = finetune_error(capsys, [str(path)])
    assert err.startswith(f"error: {path}:4:") and "invalid YAML" in err


def test_missing_options_file_is_called_missing(tmp_path, capsys):
    err = finetune_error(capsys, [str(tmp_path / "nope.yaml")])
    assert err == f"error: {tmp_path / 'nope.yaml'}: no such options file"


def test_unknown_key_is_named_with_the_closest_option(tmp_path, capsys, tiny_model_dir, formatted_samples):
    options = dict(base_options(tiny_model_dir, formatted_samples["multi-turn"], tmp_path), learning_rte=1e-3)
    path = tmp_path / "args.yaml"
    path.write_text("\n".join(f"{key}: {json.dumps(value)}" for key, value in options.items()))
    err = finetune_error(capsys, [str(path)])
    assert err == f"error: {path}: unknown option 'learning_rte'; did you mean 'learning_rate'?"


def test_options_file_that_is_not_a_mapping(tmp_path, capsys):
    path = tmp_path / "args.json"
    path.write_text('["--do_train"]')
    assert "must hold one mapping" in finetune_error(capsys, [str(path)])


def test_a_value_the_training_options_reject_is_reported_with_the_file(tmp_path, capsys, tiny_model_dir,
                                                                       formatted_samples):
    options = dict(base_options(tiny_model_dir, formatted_samples["multi-turn"], tmp_path), eval_strategy="often")
    path = tmp_path / "args.json"
    path.write_text(json.dumps(options))
    err = finetune_error(capsys, [str(path)])
    assert err.startswith(f"error: {path}: ") and "often" in err


# ---- DeepSpeed configs ---------------------------------------------------------------------------

@pytest.mark.parametrize("via", ["flag", "file"])
def test_broken_deepspeed_config(tmp_path, capsys, tiny_model_dir, formatted_samples, via):
    options = base_options(tiny_model_dir, formatted_samples["multi-turn"], tmp_path)

    def error_for(deepspeed):
        argv = as_flags(dict(options, deepspeed=deepspeed))
        if via == "file":
            path = tmp_path / "args.json"
            path.write_text(json.dumps(dict(options, deepspeed=deepspeed)))
            argv = [str(path)]
        return finetune_error(capsys, argv)

    missing = tmp_path / "ds_missing.json"
    assert error_for(str(missing)) == f"error: {missing}: no such --deepspeed config"
    broken = tmp_path / "ds.json"
    broken.write_text('{\n  "zero_optimization": {"stage": 2,}\n}\n')
    assert error_for(str(broken)).startswith(f"error: {broken}:2:36: invalid JSON in the --deepspeed config")
    listed = tmp_path / "ds_list.json"
    listed.write_text("[1, 2]")
    assert "a DeepSpeed config is a JSON object, found list" in error_for(str(listed))


# ---- length caps -----------------------------------------------------------------------------------

@pytest.mark.parametrize("flag,value,fmt", [("max_seq_length", 0, "multi-turn"), ("max_seq_length", -5, "multi-turn"),
                                            ("max_source_length", 2, "input-output"),
                                            ("max_target_length", 0, "input-output")])
def test_too_small_cap_names_its_flag(tmp_path, capsys, tiny_model_dir, formatted_samples, flag, value, fmt):
    options = dict(base_options(tiny_model_dir, formatted_samples[fmt], tmp_path), train_format=fmt)
    options[flag] = value
    err = finetune_error(capsys, as_flags(options))
    assert err.startswith(f"error: --{flag} must be at least ") and err.endswith(f"tokens, got {value}")


def test_cap_beyond_the_model_context_is_an_error_unless_allowed(tmp_path, capsys, tiny_model_dir,
                                                                 formatted_samples):
    context = json.loads(open(f"{tiny_model_dir}/config.json").read())["max_position_embeddings"]
    options = dict(base_options(tiny_model_dir, formatted_samples["multi-turn"], tmp_path), max_seq_length=context + 1)
    err = finetune_error(capsys, as_flags(options))
    assert f"--max_seq_length {context + 1} is longer than the model's context, max_position_embeddings {context}" in err
    assert "--allow_longer_than_model" in err
    check_options(*parse_args(as_flags(dict(options, allow_longer_than_model=True))))  # no error
    check_options(*parse_args(as_flags(dict(options, max_seq_length=context))))  # the context itself is fine

    prompt_response = dict(options, train_format="input-output", train_file=formatted_samples["input-output"],
                           max_source_length=context - 10, max_target_length=10)
    err = finetune_error(capsys, as_flags(prompt_response))
    assert f"= {context + 1} tokens is longer than the model's context" in err


# ---- --val_size -------------------------------------------------------------------------------------

def val_size_error(tmp_path, model_dir, data, **extra):
    options = dict(base_options(model_dir, data, tmp_path), do_eval=True, **extra)
    with pytest.raises(OptionError) as error:
        check_options(*parse_args(as_flags(options)))
    return str(error.value)


def test_val_size_checks(tmp_path, tiny_model_dir, formatted_samples):
    data = formatted_samples["multi-turn"]
    assert "--do_eval needs --validation_file, or --val_size" in val_size_error(tmp_path, tiny_model_dir, data)
    assert val_size_error(tmp_path, tiny_model_dir, data, val_size=0.1, validation_file=data) == (
        f"--val_size 0.1 and --validation_file {data} both name evaluation data: keep one")
    for bad in (0, -1, 2.5):
        assert val_size_error(tmp_path, tiny_model_dir, data, val_size=bad).startswith(f"--val_size {bad:g}: give a count")
    for good in (0.1, 3):
        check_options(*parse_args(as_flags(dict(base_options(tiny_model_dir, data, tmp_path), do_eval=True,
                                                val_size=good))))


def test_cap_beyond_the_context_with_an_auto_format_is_refused_once_the_data_is_read(
        tmp_path, capsys, tiny_model_dir, formatted_samples):
    """--train_format auto: which cap applies is known only from the data; still refused before training."""
    context = json.loads(open(f"{tiny_model_dir}/config.json").read())["max_position_embeddings"]
    options = dict(base_options(tiny_model_dir, formatted_samples["multi-turn"], tmp_path), train_format="auto",
                   max_seq_length=context + 1, preprocessing_cache_dir=str(tmp_path / "cache"))
    check_options(*parse_args(as_flags(options)))  # the format is not known yet
    err = finetune_error(capsys, as_flags(options))
    assert err.startswith(f"error: --max_seq_length {context + 1} is longer than the model's context")
    assert not (tmp_path / "cache").exists()  # nothing was tokenized


def test_yaml_numbers_written_as_text_are_numbers(tmp_path, capsys, tiny_model_dir, formatted_samples):
    """YAML reads 2e-2 (no dot) as text; the option becomes the number it says, or a one-line error."""
    options = base_options(tiny_model_dir, formatted_samples["multi-turn"], tmp_path)
    path = tmp_path / "args.yaml"
    text = "\n".join(f"{key}: {json.dumps(value)}" for key, value in options.items())
    path.write_text(text + "\nlearning_rate: 2e-2\nmax_steps: '3'\n")
    _, _, training_args = parse_args([str(path)])
    assert training_args.learning_rate == 0.02 and training_args.max_steps == 3
    path.write_text(text + "\nlearning_rate: 2e-2x\n")
    assert finetune_error(capsys, [str(path)]) == f"error: {path}: learning_rate: '2e-2x' is not a number"
