"""What a new user runs first: the demo in its own folders, and the README's commands working as
printed in a fresh shell (no activated virtual environment, no .venv/bin on PATH)."""

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOT_COPIED = shutil.ignore_patterns(".git", ".venv", "output", "models", "formatted_data", "runs", "__pycache__",
                                    "*.egg-info", ".pytest_cache", ".cache")


def fresh_shell_env(**variables) -> dict:
    """A login-like environment: system PATH only, no virtual environment. PYTHONPATH is kept: a
    developer checkout may point it at its own code (it changes which files load, not what runs)."""
    env = {"HOME": os.environ.get("HOME", "/tmp"), "PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8",
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    if os.environ.get("PYTHONPATH"):
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    env.update({key: str(value) for key, value in variables.items()})
    return env


# ---- the demo --------------------------------------------------------------------------------------

@pytest.mark.slow
def test_demo_leaves_the_users_data_and_runs_alone(tmp_path):
    """The demo's steps (tiny settings) in a copy of the project where the user already has converted
    data in the launchers' default files and a run in output/: all of it survives, byte for byte."""
    project = tmp_path / "project"
    shutil.copytree(ROOT, project, ignore=NOT_COPIED)
    user_files = {project / "formatted_data" / "tool_alpaca.jsonl": '{"conversations": "mine"}\n',
                  project / "formatted_data" / "advertise_gen.jsonl": '{"prompt": "mine", "response": "mine"}\n',
                  project / "formatted_data" / "demo_tools.json": "[]\n",
                  project / "output" / "my_run" / "train.log": "my run\n"}
    for path, text in user_files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)

    done = subprocess.run(["bash", "scripts/demo.sh"], cwd=project, capture_output=True, text=True, timeout=900,
                          env=fresh_shell_env(SKIP_SETUP=1, DEMO_STEPS=2, PYTHON=sys.executable,
                                              DEMO_MODEL_ARGS="--pretrain-steps 2"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert {path: path.read_text() for path in user_files} == user_files
    demo_data = project / "formatted_data" / "demo"
    assert sorted(path.name for path in demo_data.iterdir()) == ["advertise_gen.jsonl", "tool_alpaca.jsonl",
                                                                 "tools.json"]
    assert (project / "output" / "demo" / "prefix_encoder.safetensors").is_file()
    assert sorted(path.name for path in (project / "output").iterdir()) == ["demo", "my_run"]


# ---- the README's commands -------------------------------------------------------------------------

def readme_commands() -> list[str]:
    """Every command line in the README's bash blocks (continuation lines joined)."""
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    commands = []
    for block in blocks:
        for command in block.replace("\\\n", " ").splitlines():
            command = re.sub(r"\s+#.*$", "", command).strip()
            if command:
                commands.append(command)
    return commands


def test_readme_commands_need_no_activated_environment():
    """Python commands are spelled .venv/bin/python, so they work in a new shell after set-up."""
    for command in readme_commands():
        words = command.split()
        programs = [word for word in words if "=" not in word][:1]
        assert programs and programs[0] not in ("python", "python3", "pip", "torchrun", "deepspeed"), command


def test_console_scripts_name_functions_that_exist():
    """pyproject's console commands each name a module-level function of the project (read, not imported)."""
    import ast

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert {"chatglm3-finetune", "chatglm3-inference", "chatglm3-serve", "chatglm3-preview"} <= scripts.keys()
    for target in scripts.values():
        module, function = target.split(":")
        source = ROOT / (module.replace(".", "/") + ".py")
        defined = {node.name for node in ast.parse(source.read_text()).body if isinstance(node, ast.FunctionDef)}
        assert function in defined, target


def cheap_form(command: str) -> list[str] | None:
    """The README command made cheap but still run as printed: --help for a Python program, DRY_RUN=1
    for a launcher; None for what cannot run here (set-up, the demo, a server, curl, the tests)."""
    if re.search(r"scripts/(setup|demo)\.sh|pytest|curl|^cat ", command):
        return None
    if "scripts/finetune_" in command:
        return ["bash", "-c", f"DRY_RUN=1 PRECISION=bf16 {command}"]
    match = re.match(r"(?:\w+=\S+ )*(\.venv/bin/\S+)(?: (\S+\.py))?", command)
    if match:
        return ["bash", "-c", " ".join(part for part in match.groups() if part) + " --help"]
    return None


@pytest.mark.slow
@pytest.mark.skipif(not (ROOT / ".venv" / "bin" / "python").exists(),
                    reason="the README's commands use the project's .venv: run scripts/setup.sh first")
def test_readme_commands_work_in_a_new_shell():
    """Each README command, in its cheap form, in a fresh environment from the project root."""
    ran = []
    for command in readme_commands():
        form = cheap_form(command)
        if form is None:
            continue
        done = subprocess.run(form, cwd=ROOT, env=fresh_shell_env(), capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"{command}\n{done.stdout[-2000:]}{done.stderr[-2000:]}"
        assert "Traceback" not in done.stderr, command
        ran.append(command)
    assert any("finetune_" in command for command in ran) and any("inference.py" in command for command in ran)
