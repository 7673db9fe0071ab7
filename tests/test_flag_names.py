"""Every message names flags exactly as the program that prints it spells them: each `--flag` in a
string of a program's code (docstrings aside) must be one of that program's options."""

import ast
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


def argparse_flags(*paths):
    """The `--flags` that add_argument calls in these files define."""
    flags = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument":
                flags |= {arg.value[2:] for arg in node.args
                          if isinstance(arg, ast.Constant) and str(arg.value).startswith("--")}
    return flags


def finetune_flags():
    from transformers import HfArgumentParser, Seq2SeqTrainingArguments

    from arguments import DataArguments, ModelArguments

    parser = HfArgumentParser((ModelArguments, DataArguments, Seq2SeqTrainingArguments))
    return {option[2:] for option in parser._option_string_actions if option.startswith("--")}


PACKAGE = ROOT / "chatglm3_finetune"
CONVERT = argparse_flags(ROOT / "scripts" / "convert_chatglm3.py")
PROGRAMS = {
    # finetune.py and what only it runs (model_loading's remote-code hint names the converter's flags)
    "finetune": ([ROOT / "finetune.py", ROOT / "arguments.py", ROOT / "trainer.py", PACKAGE / "training_data.py",
                  PACKAGE / "model_loading.py"], lambda: finetune_flags() | CONVERT),
    # the summary's last line is an inference.py command
    "run summary": ([PACKAGE / "run_summary.py"], lambda: finetune_flags() | argparse_flags(ROOT / "inference.py")),
    # the data modules that finetune.py and the preview share: flags both spell the same way
    "finetune+preview": ([PACKAGE / "encoding.py", PACKAGE / "records.py"],
                         lambda: finetune_flags() & argparse_flags(ROOT / "preprocess_utils.py")),
    # the tokenizer loader's messages reach every program: they may name no flag at all
    "every program": ([PACKAGE / "tokenizer.py"], lambda: set()),
    "preview": ([ROOT / "preprocess_utils.py"], lambda: argparse_flags(ROOT / "preprocess_utils.py")),
    "inference": ([ROOT / "inference.py"], lambda: argparse_flags(ROOT / "inference.py")),
    "server": ([ROOT / "api_server.py"], lambda: argparse_flags(ROOT / "api_server.py")),
    # chat_engine's messages reach users of both
    "chat engine": ([PACKAGE / "chat_engine.py"],
                    lambda: argparse_flags(ROOT / "inference.py") & argparse_flags(ROOT / "api_server.py")),
    "convert": ([ROOT / "scripts" / "convert_chatglm3.py", PACKAGE / "conversion.py"], lambda: CONVERT),
    "merge": ([PACKAGE / "lora_merge.py"], lambda: argparse_flags(PACKAGE / "lora_merge.py")),
    "converters": ([PACKAGE / "advertise_gen.py", PACKAGE / "tool_alpaca.py", PACKAGE / "splitting.py"],
                   lambda: argparse_flags(PACKAGE / "advertise_gen.py", PACKAGE / "splitting.py")
                   & argparse_flags(PACKAGE / "tool_alpaca.py", PACKAGE / "splitting.py")),
    "tiny model": ([PACKAGE / "make_tiny_model.py"], lambda: argparse_flags(PACKAGE / "make_tiny_model.py")),
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
