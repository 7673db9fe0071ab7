"""benchmarks/gpu_check_wheels.sh: its help, its refusal of arguments, and the ignore line it writes into a
checkout that has no .git/info (a fresh clone may lack it)."""

import shutil
import subprocess

from conftest import ROOT

SCRIPT = "benchmarks/gpu_check_wheels.sh"


def run_script(*arguments: str, cwd=ROOT, **environment: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", SCRIPT, *arguments], cwd=cwd, capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", **environment})


def test_help_prints_the_header_and_does_nothing(tmp_path):
    shutil.copytree(ROOT / "benchmarks", tmp_path / "benchmarks", ignore=shutil.ignore_patterns("__pycache__"))
    done = run_script("--help", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("Fills .gpu_check/")
    assert "TOKENIZER_DIR=path/to/chatglm3-6b bash benchmarks/gpu_check_wheels.sh" in done.stdout
    assert "set -euo" not in done.stdout
    assert not (tmp_path / ".gpu_check").exists()


def test_an_argument_is_refused_with_exit_2():
    done = run_script("--cpu")
    assert done.returncode == 2
    assert "unknown argument --cpu" in done.stderr


def test_the_ignore_line_is_written_where_git_info_is_missing(tmp_path):
    clone = tmp_path / "clone"
    subprocess.run(["git", "init", "-q", str(clone)], check=True)
    shutil.copytree(ROOT / "benchmarks", clone / "benchmarks", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "requirements.txt", clone / "requirements.txt")
    shutil.rmtree(clone / ".git" / "info", ignore_errors=True)
    # PYTHON=false makes every download fail at once, so the script stops right after the ignore step.
    done = run_script(cwd=clone, PYTHON="false")
    assert done.returncode != 0
    assert "info/exclude" not in done.stderr
    assert "/.gpu_check/" in (clone / ".git" / "info" / "exclude").read_text().splitlines()
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all", "--", ".gpu_check"],
                            cwd=clone, capture_output=True, text=True, check=True)
    assert status.stdout == ""
