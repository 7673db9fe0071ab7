"""The P-Tuning launchers' CPU-sized examples: printed the same in each launcher's header, the README
and docs/training.md, they set what makes a step small, and they train as printed (with the test's
tiny model and data in place of the demo's, and fewer steps)."""

import re
import shlex
import subprocess
from pathlib import Path

import pytest

from test_launchers import launcher_env

ROOT = Path(__file__).resolve().parents[1]
LAUNCHERS = {"finetune_pt.sh": "advertise_gen.jsonl", "finetune_pt_multiturn.sh": "tool_alpaca.jsonl"}


def header_example(name: str) -> str:
    """The command under "# On a CPU" in the launcher's header comment, continuation lines joined."""
    lines = (ROOT / "scripts" / name).read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("# On a CPU"))
    command = []
    for line in lines[start + 1:]:
        text = line.lstrip("#").strip()
        if not command and not text.startswith("OMP_NUM_THREADS="):
            continue
        command.append(text.rstrip("\\").strip())
        if not text.endswith("\\"):
            return " ".join(command)
    raise AssertionError(f"{name}: no CPU example in the header")


def page_commands(page: str) -> list[str]:
    """The commands of a page's bash blocks, continuation lines joined, comments dropped."""
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / page).read_text(), re.S)
    commands = [re.sub(r"\s+#.*$", "", line).strip() for block in blocks
                for line in block.replace("\\\n", " ").splitlines()]
    return [" ".join(command.split()) for command in commands if command]


def variables(command: str) -> dict:
    words = shlex.split(command)
    return dict(word.split("=", 1) for word in words if re.match(r"^[A-Z_]+=", word))


@pytest.mark.parametrize("name", sorted(LAUNCHERS))
def test_the_cpu_example_is_printed_alike_in_the_header_the_readme_and_the_training_page(name):
    example = " ".join(header_example(name).split())
    assert example in page_commands("README.md")
    assert example in page_commands("docs/training.md")
    settings = variables(example)
    assert settings["USE_CPU"] == "1" and settings["OMP_NUM_THREADS"] == "1"
    assert settings["BASE_MODEL_PATH"] == "models/tiny-chatglm3"
    assert settings["DATASET_PATH"] == f"formatted_data/demo/{LAUNCHERS[name]}"
    # what makes the defaults' step about 50 s on two cores: accumulation, a long prefix, long rows
    assert settings["GRAD_ACCUMULARION_STEPS"] == "1" and int(settings["PRE_SEQ_LEN"]) <= 16
    assert int(settings["MAX_STEP"]) <= 50


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(LAUNCHERS))
def test_the_cpu_example_trains(name, tiny_model_dir, formatted_samples, tmp_path):
    """The header's command as printed, run by bash, with the test's tiny model and the bundled samples
    (what the demo gives the example), 3 steps instead of 40 and an output folder of the test's own."""
    data = formatted_samples["input-output" if name == "finetune_pt.sh" else "multi-turn"]
    command = (header_example(name).replace("models/tiny-chatglm3", shlex.quote(tiny_model_dir))
               .replace(f"formatted_data/demo/{LAUNCHERS[name]}", shlex.quote(data))
               .replace("MAX_STEP=40", "MAX_STEP=3"))
    env = launcher_env(OUTPUT_DIR=tmp_path / "run", EXTRA_ARGS=f"--report_to none --preprocessing_cache_dir "
                                                               f"{tmp_path / 'cache'}")
    done = subprocess.run(["bash", "-c", command], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (tmp_path / "run" / "prefix_encoder.safetensors").is_file()
    assert "trained: 3 steps" in done.stdout and (tmp_path / "run" / "train.log").is_file()
