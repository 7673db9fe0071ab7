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


# ---- flash-attention ---------------------------------------------------------------------------------

@pytest.fixture
def no_model_load(monkeypatch):
    """Fails the test if finetune.main gets as far as loading the model."""
    def load(*_):
        raise AssertionError("the model was loaded before the option was refused")
    monkeypatch.setattr(finetune, "load_for_training", load)


@pytest.fixture
def flash_attn_installed(monkeypatch):
    """Pretends the flash-attn package is importable (it never is on these CPU-only machines)."""
    import importlib.util

    import arguments

    real = importlib.util.find_spec
    monkeypatch.setattr(arguments.importlib.util, "find_spec",
                        lambda name, *args: object() if name == "flash_attn" else real(name, *args))


FLASH = {"attn_implementation": "flash_attention_2"}


def test_flash_attention_without_the_package_says_what_to_do(tmp_path, capsys, tiny_model_dir, formatted_samples,
                                                               no_model_load):
    import importlib.util

    assert importlib.util.find_spec("flash_attn") is None
    options = dict(base_options(tiny_model_dir, formatted_samples["multi-turn"], tmp_path), lora_rank=4, bf16=True,
                   **FLASH)
    assert finetune_error(capsys, as_flags(options)) == (
        "error: --attn_implementation flash_attention_2 needs the flash-attn package, which is not installed: "
        "pip install flash-attn (on a machine with CUDA), or use --attn_implementation sdpa "
        "(the default)")
    assert finetune_error(capsys, as_flags(dict(options, packing=True))).endswith(
        "or drop --attn_implementation (--packing then attends per record with packed_sdpa)")


@pytest.mark.parametrize("packing", [False, True])
def test_flash_attention_with_ptuning_is_refused_with_why_and_what_instead(tmp_path, capsys, tiny_model_dir,
                                                                            formatted_samples, no_model_load,
                                                                            flash_attn_installed, packing):
    options = dict(base_options(tiny_model_dir, formatted_samples["multi-turn"], tmp_path), pre_seq_len=4, bf16=True,
                   **FLASH, **({"packing": True} if packing else {}))
    err = finetune_error(capsys, as_flags(options))
    if packing:  # the variable-length kernel cannot give every packed record the prefix
        assert err.startswith("error: --packing with flash_attention_2 cannot show the P-Tuning prefix to every record")
        assert "drop --attn_implementation (packing then uses packed_sdpa, which does)" in err
    else:
        assert err.startswith("error: --attn_implementation flash_attention_2 is not supported with P-Tuning v2: the "
                              "prefix reaches attention as cached keys ahead of the queries")
        assert err.endswith("use --attn_implementation sdpa (the default), or train LoRA with flash_attention_2")


def test_flash_attention_refuses_fp32_compute(tmp_path, capsys, tiny_model_dir, formatted_samples, no_model_load,
                                              flash_attn_installed):
    """Full fine-tuning without DeepSpeed loads fp32 weights: flash-attention then needs autocast (--bf16 or
    --fp16) to see half precision; a frozen base loaded in bf16 needs none."""
    full = dict(base_options(tiny_model_dir, formatted_samples["multi-turn"], tmp_path), **FLASH)
    assert finetune_error(capsys, as_flags(full)) == (
        "error: --attn_implementation flash_attention_2 computes in bf16 or fp16 only, and this run computes in fp32: "
        "add --bf16 (or --fp16; the launchers: PRECISION=bf16), or use --attn_implementation sdpa (the default)")
    for accepted in (dict(full, bf16=True), dict(full, fp16=True),
                     dict(full, lora_rank=4, torch_dtype="bfloat16"), dict(full, lora_rank=4, torch_dtype="float16")):
        check_options(*parse_args(as_flags(accepted)))
    with pytest.raises(OptionError, match="computes in bf16 or fp16 only"):
        check_options(*parse_args(as_flags(dict(full, lora_rank=4, torch_dtype="float32"))))


def test_flash_attention_that_cannot_load_is_one_line(tmp_path, capsys, tiny_model_dir, formatted_samples,
                                                      flash_attn_installed):
    """flash-attn present but unusable (here: transformers finds no flash-attn at all): one line, exit 2."""
    options = dict(base_options(tiny_model_dir, formatted_samples["multi-turn"], tmp_path), lora_rank=4, bf16=True,
                   preprocessing_cache_dir=str(tmp_path / "cache"), **FLASH)
    with pytest.raises(SystemExit) as exit_info:
        finetune.main(as_flags(options))
    assert exit_info.value.code == 2
    stderr = capsys.readouterr().err
    err = stderr.strip().splitlines()[-1]  # after the data's progress bars
    assert "Traceback" not in stderr and err.startswith("error: --attn_implementation flash_attention_2 cannot run on this machine: ")
    assert err.endswith("Use --attn_implementation sdpa (the default)")
