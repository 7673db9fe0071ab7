"""Shared fixtures: the real ChatGLM3 tokenizer (when ../shared/data is present) and tiny models."""

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))
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
    from chatglm3_tokenizer import load_tokenizer

    return load_tokenizer(str(shared_path("chatglm3-tokenizer")))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny GlmForCausalLM + ChatGLM3-layout tokenizer on disk (random weights)."""
    from tiny_model import build_tiny_model

    return build_tiny_model(str(tmp_path_factory.mktemp("tiny-chatglm3")))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from chatglm3_tokenizer import load_tokenizer

    return load_tokenizer(tiny_model_dir)
