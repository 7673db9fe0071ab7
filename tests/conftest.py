"""Shared fixtures: the real ChatGLM3 tokenizer (when ../shared/data is present) and tiny models; and a
clean stop of the suite on SIGTERM or Ctrl-C (suite_processes)."""

import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

import suite_processes

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")


def pytest_configure(config):
    suite_processes.install()  # SIGTERM stops the suite and kills what the tests started


# The test files that take longest (minutes each, measured with --durations=0), in that order. They are
# collected first so that the two xdist workers start them at once and finish together: by its own
# rule xdist would hand out the files with the most tests first, and these, with few tests, last.
LONGEST_FILES = ["benchmarks/test_gpu_check_dry_others.py", "benchmarks/test_gpu_check.py", "test_first_contact.py",
                 "test_launchers.py", "train/test_deepspeed_checkpoints.py", "benchmarks/test_bench_load_memory.py",
                 "train/test_final_save.py", "train/test_deepspeed.py", "test_suite_stop.py"]


def pytest_collection_modifyitems(items):
    rank = {str(ROOT / "tests" / name): position for position, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(str(item.path), len(rank)))  # stable: the rest keep their order


def pytest_keyboard_interrupt(excinfo):
    """Ctrl-C, and the stop SIGTERM turns into: nothing the tests started outlives the suite."""
    suite_processes.kill_suite_processes()


def shared_path(*parts: str) -> Path:
    """A path under ../shared/data, or a skip when this checkout has no shared data beside it."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent: this test needs the shared data folder beside the project")
    return path


@pytest.fixture(scope="session")
def real_tokenizer():
    from chatglm3_finetune.format.tokenizer import load_tokenizer

    return load_tokenizer(str(shared_path("chatglm3-tokenizer")))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny GlmForCausalLM + ChatGLM3-layout tokenizer on disk (random weights)."""
    from chatglm3_finetune.model.tiny_model import build_tiny_model

    return build_tiny_model(str(tmp_path_factory.mktemp("tiny-chatglm3")))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from chatglm3_finetune.format.tokenizer import load_tokenizer

    return load_tokenizer(tiny_model_dir)


@pytest.fixture(scope="session")
def formatted_samples(tmp_path_factory):
    """The bundled samples through the two converters: {"multi-turn": path, "input-output": path}.
    In-process (the converter scripts are thin wrappers over these mains, tested as processes in
    test_converters.py)."""
    from chatglm3_finetune.data.converters import advertise_gen
    from chatglm3_finetune.data.converters import tool_alpaca

    out = tmp_path_factory.mktemp("formatted_data")
    tool = out / "tool_alpaca.jsonl"
    advert = out / "advertise_gen.jsonl"
    for convert, sample, output in ((tool_alpaca.main, "tool_alpaca_train.json", tool),
                                    (advertise_gen.main, "advertise_gen_train.json", advert)):
        code = convert(["--path", str(ROOT / "data" / "sample" / sample), "--output", str(output)])
        assert code == 0 and output.stat().st_size > 0, f"{convert.__module__} failed on {sample}"
    return {"multi-turn": str(tool), "input-output": str(advert)}


def run_finetune(*args: str, env: dict | None = None, check: bool = True, timeout: int = 300):
    """Runs finetune.py in a subprocess on the CPU; returns the CompletedProcess."""
    import subprocess

    full_env = {**os.environ, "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    result = subprocess.run([sys.executable, str(ROOT / "finetune.py"), *args], capture_output=True, text=True,
                            env=full_env, cwd=str(ROOT), timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"finetune.py failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


@dataclass
class FinetuneResult:
    """What `finetune.main` left behind in-process, shaped like a finished subprocess: stdout holds
    what it printed plus its INFO log records (a real run logs to stdout)."""
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def finetune_in_process(capsys, caplog):
    """Runs `finetune.main(args)` in this process (no interpreter start-up, no imports to repeat) and
    returns a FinetuneResult; the exit code is SystemExit's (2 for user mistakes), or 0.

    main() configures logging for a process of its own; the global settings it changes (root
    handlers and level, transformers' verbosity and format) are put back afterwards."""
    import transformers

    def run(*args: str) -> FinetuneResult:
        import finetune

        root = logging.getLogger()
        handlers, level = list(root.handlers), root.level
        verbosity = transformers.utils.logging.get_verbosity()
        caplog.clear()
        caplog.set_level(logging.INFO)
        code = 0
        try:
            finetune.main(list(args))
        except SystemExit as e:
            code = e.code
        finally:
            for handler in root.handlers[:]:
                if handler not in handlers:
                    root.removeHandler(handler)
            root.setLevel(level)
            transformers.utils.logging.set_verbosity(verbosity)
            transformers.utils.logging.reset_format()
        captured = capsys.readouterr()
        return FinetuneResult(code, captured.out + caplog.text, captured.err)

    return run
