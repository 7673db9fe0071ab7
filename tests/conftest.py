"""Shared fixtures: the real ChatGLM3 tokenizer (when ../shared/data is present) and tiny models."""

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")


def shared_path(*parts: str) -> Path:
    """A path under ../shared/data, or a skip when this checkout has no shared data beside it."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent: this test needs the shared data folder beside the project")
    return path


@pytest.fixture(scope="session")
def real_tokenizer():
    from chatglm3_finetune.tokenizer import load_tokenizer

    return load_tokenizer(str(shared_path("chatglm3-tokenizer")))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny GlmForCausalLM + ChatGLM3-layout tokenizer on disk (random weights)."""
    from chatglm3_finetune.tiny_model import build_tiny_model

    return build_tiny_model(str(tmp_path_factory.mktemp("tiny-chatglm3")))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from chatglm3_finetune.tokenizer import load_tokenizer

    return load_tokenizer(tiny_model_dir)


@pytest.fixture(scope="session")
def formatted_samples(tmp_path_factory):
    """The bundled samples through the two converters: {"multi-turn": path, "input-output": path}."""
    import subprocess

    out = tmp_path_factory.mktemp("formatted_data")
    tool = out / "tool_alpaca.jsonl"
    advert = out / "advertise_gen.jsonl"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "format_tool_alpaca.py"), "--path",
                    str(ROOT / "data" / "sample" / "tool_alpaca_train.json"), "--output", str(tool)],
                   check=True, capture_output=True)
    subprocess.run([sys.executable, str(ROOT / "scripts" / "format_advertise_gen.py"), "--path",
                    str(ROOT / "data" / "sample" / "advertise_gen_train.json"), "--output", str(advert)],
                   check=True, capture_output=True)
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
