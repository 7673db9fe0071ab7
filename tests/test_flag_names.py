"""Every message names flags exactly as the program that prints it spells them: each `--flag` in a
string of a program's code (docstrings aside) must be one of that program's options."""

import ast
import contextlib
import io
import re

import pytest

from conftest import ROOT

FLAG = re.compile(r"(?<![\w-])--([a-z][a-z0-9]*(?:[_-][a-z0-9]+)*)")


def strings_outside_docstrings(path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr)
                  and isinstance(node.body[0].value, ast.Constant)}
    return [node.value for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings]


def help_flags(parse) -> set[str]:
    """The `--flags` a program's --help lists (its parser's options, however they were added)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        parse(["--help"])
    return set(FLAG.findall(out.getvalue()))


def program_flags(name: str) -> set[str]:
    import importlib
    import runpy

    if name == "convert":
        return help_flags(runpy.run_path(str(ROOT / "scripts" / "convert_chatglm3.py"))["parse_args"])
    module, function = {"inference": ("inference", "parse_args"), "server": ("api_server", "parse_args"),
                        "preview": ("preprocess_utils", "main"), "merge": ("chatglm3_finetune.model.lora_merge", "main"),
                        "tiny model": ("chatglm3_finetune.model.make_tiny_model", "main"),
                        "advertise_gen": ("chatglm3_finetune.data.converters.advertise_gen", "main"),
                        "tool_alpaca": ("chatglm3_finetune.data.converters.tool_alpaca", "main")}[name]
    return help_flags(getattr(importlib.import_module(module), function))


def finetune_flags():
    from transformers import HfArgumentParser

    from arguments import DataArguments, ModelArguments, TrainingArguments

    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    return {option[2:] for option in parser._option_string_actions if option.startswith("--")}


PACKAGE = ROOT / "chatglm3_finetune"
PROGRAMS = {
    # finetune.py and what only it runs (loading's remote-code hint names the converter's flags)
    "finetune": ([ROOT / "finetune.py", ROOT / "arguments.py", ROOT / "trainer.py", PACKAGE / "data/training_data.py",
                  PACKAGE / "model/loading.py", PACKAGE / "train/divergence.py", PACKAGE / "train/preemption.py",
                  PACKAGE / "train/run_record.py", PACKAGE / "train/output_folder.py", PACKAGE / "train/checkpoints.py",
                  PACKAGE / "train/run_lock.py", PACKAGE / "train/final_model.py", PACKAGE / "train/manifest.py",
                  PACKAGE / "train/run_start.py", *sorted((PACKAGE / "plan").glob("*.py"))],
                 lambda: finetune_flags() | program_flags("convert")),
    # the summary's last line is an inference.py command
    "run summary": ([PACKAGE / "train/run_summary.py"], lambda: finetune_flags() | program_flags("inference")),
    # the data modules that finetune.py and the preview share: flags both spell the same way
    "finetune+preview": ([PACKAGE / "data/encoding.py", PACKAGE / "data/records.py"],
                         lambda: finetune_flags() & program_flags("preview")),
    # the tokenizer loader's messages reach every program: they may name no flag at all
    "every program": ([PACKAGE / "format/tokenizer.py"], lambda: set()),
    "preview": ([ROOT / "preprocess_utils.py"], lambda: program_flags("preview")),
    "inference": ([ROOT / "inference.py"], lambda: program_flags("inference")),
    "server": ([ROOT / "api_server.py"], lambda: program_flags("server")),
    # chat_engine's messages reach users of both
    "chat engine": ([PACKAGE / "serve/chat_engine.py"], lambda: program_flags("inference") & program_flags("server")),
    "convert": ([ROOT / "scripts" / "convert_chatglm3.py", PACKAGE / "model/conversion.py"],
                lambda: program_flags("convert")),
    "merge": ([PACKAGE / "model/lora_merge.py"], lambda: program_flags("merge")),
    "converters": ([PACKAGE / "data/converters/advertise_gen.py", PACKAGE / "data/converters/tool_alpaca.py", PACKAGE / "data/splitting.py"],
                   lambda: program_flags("advertise_gen") & program_flags("tool_alpaca")),
    "tiny model": ([PACKAGE / "model/make_tiny_model.py"], lambda: program_flags("tiny model")),
}


@pytest.mark.parametrize("program", sorted(PROGRAMS))
def test_messages_name_only_the_programs_own_flags(program):
    files, valid_flags = PROGRAMS[program]
    valid = valid_flags()
    wrong = sorted({f"{path.name}: --{flag}" for path in files for text in strings_outside_docstrings(path)
                    for flag in FLAG.findall(text) if flag not in valid})
    assert not wrong, f"{program}: messages name flags it does not have: {wrong}"


def test_the_check_catches_a_misspelled_flag(tmp_path):
    path = tmp_path / "x.py"
    path.write_text('raise ValueError(f"pass --tokenizer_name {x} or --trust_remote_code")\n')
    found = [flag for text in strings_outside_docstrings(path) for flag in FLAG.findall(text)]
    assert found == ["tokenizer_name", "trust_remote_code"]
