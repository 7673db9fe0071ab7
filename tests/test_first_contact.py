"""What a new user runs first: the demo in its own folders, and every command of the README and of
docs/*.md working as printed in a fresh shell (no activated virtual environment, no .venv/bin on PATH)."""

import ast
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import tomllib
import urllib.request
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOT_COPIED = shutil.ignore_patterns(".git", ".venv", "output", "models", "formatted_data", "runs", "__pycache__",
                                    "*.egg-info", ".pytest_cache", ".cache")
PAGES = ["README.md", *sorted(f"docs/{path.name}" for path in (ROOT / "docs").glob("*.md"))]
HAS_VENV = (ROOT / ".venv" / "bin" / "python").exists()
needs_venv = pytest.mark.skipif(not HAS_VENV, reason="the documented commands use the project's .venv: "
                                                      "run scripts/setup.sh first")


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


# ---- the commands of the README and docs/ -----------------------------------------------------------

@dataclass(frozen=True)
class DocCommand:
    """One command as a page prints it: a line of a ```bash block (continuations joined, the trailing
    comment dropped), or an inline `...` span in the text that starts like a command."""
    page: str
    line: int
    text: str

    def __str__(self) -> str:
        return f"{self.page}:{self.line}: {self.text}"


INLINE_COMMAND = re.compile(r"`((?:\w+=[^\s`]+ )*(?:\.venv/bin/|bash (?:scripts|benchmarks)/)[^\s`]+(?: [^`]*)?)`")


def fenced_blocks(page: str, language: str) -> list[tuple[int, str]]:
    """(first line number, text) of every ```language block of a page."""
    blocks, lines = [], (ROOT / page).read_text().splitlines()
    start = None
    for number, line in enumerate(lines, 1):
        if start is None and line.strip() == f"```{language}":
            start, body = number + 1, []
        elif start is not None and line.strip() == "```":
            blocks.append((start, "\n".join(body)))
            start = None
        elif start is not None:
            body.append(line)
    return blocks


def without_comment(text: str) -> str | None:
    """A command line without its trailing `# comment`; None while a quote is still open."""
    try:
        words = shlex.split(text, comments=True)
    except ValueError:
        return None
    bare = re.sub(r"(^|\s+)#[^\n]*$", "", text).strip()
    return bare if shlex.split(bare) == words else text.strip()


def page_commands(page: str) -> list[DocCommand]:
    """Every command a page prints: the lines of its bash blocks and its inline command spans."""
    commands = []
    for first, block in fenced_blocks(page, "bash"):
        pending, pending_line = "", first
        for number, line in enumerate(block.splitlines(), first):
            if not pending:
                pending_line = number
            if line.endswith("\\"):
                pending += line[:-1] + " "
                continue
            text = without_comment(pending + line)
            if text is None:  # a quoted argument goes on over the next lines
                pending += line + "\n"
                continue
            pending = ""
            if text:
                commands.append(DocCommand(page, pending_line, text))
    in_fence = False
    for number, line in enumerate((ROOT / page).read_text().splitlines(), 1):
        if line.strip().startswith("```"):
            in_fence = not in_fence
        elif not in_fence:
            commands += [DocCommand(page, number, span.strip()) for span in INLINE_COMMAND.findall(line)]
    return commands


ALL_COMMANDS = [command for page in PAGES for command in page_commands(page)]


def command_id(command: DocCommand) -> str:
    return f"{command.page}:{command.line}"


def environment_and_program(command: str) -> tuple[list[str], list[str]]:
    """(leading VAR=value words, the rest) of a command's last part (after its last `&&`), as the shell
    splits them."""
    words = shlex.split(command.split("&&")[-1])
    leading = 0
    while leading < len(words) and re.match(r"\w+=", words[leading]):
        leading += 1
    return words[:leading], words[leading:]


NOT_RUN_HERE = {  # program pattern: why the command does not run in the test of the commands
    r"scripts/setup\.sh": "builds .venv (minutes): every other command here needs it, and .ci/run runs it",
    r"scripts/demo\.sh": "test_demo_leaves_the_users_data_and_runs_alone runs the demo",
    r"^vllm$": "vLLM is not installed here; tests/serve/test_vllm_recipe.py checks the folder it serves",
    r"^curl$": "test_curl_commands_get_answers_from_the_server sends it to a running server",
}


def not_run_reason(command: str) -> str | None:
    _, words = environment_and_program(command)
    for pattern, reason in NOT_RUN_HERE.items():
        if words and re.search(pattern, " ".join(words[:2]) if words[0] == "bash" else words[0]):
            return reason
    return None


def cheap_form(command: str) -> str:
    """The command made cheap but still run as printed: --help for a program (pytest only collects),
    DRY_RUN=1 for a launcher (it prints the finetune.py command instead of running it). The command's
    own VAR=value words are kept as the page prints them."""
    parts = [part.strip() for part in command.split("&&")]
    if len(parts) > 1:
        return " && ".join(cheap_form(part) for part in parts if not_run_reason(part) is None)
    environment, words = environment_and_program(command)
    printed_environment = command[:command.index(words[0])] if words else command
    if words[:1] == ["bash"] and re.match(r"scripts/finetune_\w+\.sh$", words[1]):
        return f"PRECISION=bf16 {printed_environment}DRY_RUN=1 {shlex.join(words)}"
    if words[:1] == ["bash"] and words[1].startswith("benchmarks/"):
        # The GPU machine's python3 has torch; on this one the project's Python stands in for it.
        python = "" if any(word.startswith("PYTHON=") for word in environment) else "PYTHON=.venv/bin/python "
        return f"{python}{printed_environment}{shlex.join(words[:2])} --help"
    if words and words[0].startswith(".venv/bin/"):
        if words[1:3] == ["-m", "pytest"]:
            return f"{command} --collect-only -q"
        program = words[:2] if len(words) > 1 and words[1].endswith(".py") else words[:1]
        if words[1:2] == ["-m"]:
            program = words[:3] + (words[3:4] if words[2] == "pip" else [])
        return f"{printed_environment}{shlex.join(program)} --help"
    raise AssertionError(f"no cheap form for this command: run it as a launcher, a .venv/bin program or "
                         f"add it to NOT_RUN_HERE with a reason: {command}")


def flags_of(command: str) -> list[str]:
    """The long options a command passes (those in EXTRA_ARGS too), without their values."""
    environment, words = environment_and_program(command)
    for assignment in environment:
        if assignment.startswith("EXTRA_ARGS="):
            words += shlex.split(assignment.split("=", 1)[1])
    return [word.split("=", 1)[0] for word in words if word.startswith("--") and word != "--"]


def option_values(command: str) -> list[tuple[str, str]]:
    """(option, value) for each value that follows a long option, up to the next option."""
    _, words = environment_and_program(command)
    pairs, flag = [], None
    for word in words:
        if word.startswith("-"):
            flag = word.split("=", 1)[0] if word.startswith("--") else None
            if flag and "=" in word:
                pairs.append((flag, word.split("=", 1)[1]))
        elif flag:
            pairs.append((flag, word))
    return pairs


def lists_option(help_text: str, flag: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", help_text) is not None


def listed_choices(help_text: str, flag: str) -> set[str] | None:
    """The values an option's help lists as its choices ({a,b,c}); None when it lists none."""
    match = re.search(rf"(?<![\w-]){re.escape(flag)} \{{([^}}]+)\}}", help_text)
    return set(match.group(1).split(",")) if match else None


def not_among_choices(help_text: str, command: str) -> list[tuple[str, str]]:
    """(option, value) pairs of a command whose value is not among the choices the help lists."""
    return [(flag, value) for flag, value in option_values(command)
            if (choices := listed_choices(help_text, flag)) is not None and value not in choices]


@cache
def run_in_fresh_shell(form: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", form], cwd=ROOT, env=fresh_shell_env(), capture_output=True, text=True,
                          timeout=300)


def test_pages_print_their_commands():
    """The extraction finds the commands users copy: the launchers, inference and the server."""
    readme = [command.text for command in page_commands("README.md")]
    assert any("scripts/finetune_" in text for text in readme) and any("inference.py" in text for text in readme)
    assert any("api_server.py" in command.text for command in page_commands("docs/serving.md"))
    assert {command.page for command in ALL_COMMANDS} >= {"README.md", "docs/training.md", "docs/data.md"}


@pytest.mark.parametrize("command", ALL_COMMANDS, ids=command_id)
def test_doc_commands_need_no_activated_environment(command):
    """Python commands are spelled .venv/bin/python, so they work in a new shell after set-up."""
    for part in command.text.split("&&"):
        _, words = environment_and_program(part)
        assert words and words[0] not in ("python", "python3", "pip", "torchrun", "deepspeed", "pytest"), str(command)


def test_every_command_runs_cheaply_or_has_a_reason():
    """A command the test below cannot make cheap is a known kind (NOT_RUN_HERE says why), never silently
    left out."""
    for command in ALL_COMMANDS:
        assert not_run_reason(command.text) or cheap_form(command.text), str(command)


@pytest.mark.slow
@needs_venv
@pytest.mark.parametrize("command", [command for command in ALL_COMMANDS if not not_run_reason(command.text)],
                         ids=command_id)
def test_doc_command_works_in_a_new_shell(command):
    """Each command of the README and docs/, in its cheap form, in a fresh environment from the project
    root; every long option it passes is one the program (finetune.py for a launcher) declares, with a
    value among the choices it lists."""
    form = cheap_form(command.text)
    done = run_in_fresh_shell(form)
    assert done.returncode == 0, f"{command}\nran: {form}\n{done.stdout[-2000:]}{done.stderr[-2000:]}"
    assert "Traceback" not in done.stderr, f"{command}\n{done.stderr[-2000:]}"
    if "--collect-only" in form:
        return
    listing = ".venv/bin/python finetune.py --help" if "scripts/finetune_" in command.text else form
    help_text = run_in_fresh_shell(listing).stdout
    unknown = [flag for flag in flags_of(command.text) if not lists_option(help_text, flag)]
    assert not unknown, f"{command}\noptions that {listing} does not list: {unknown}"
    wrong = not_among_choices(help_text, command.text)
    assert not wrong, f"{command}\nvalues that {listing} does not list among the choices: {wrong}"


OTHER_TOOLS_OPTIONS = {  # options of programs that are not this project's, named in the pages
    "--index-url", "--no-deps", "--only-binary", "--platform", "--python-version", "--implementation",  # pip
    "--served-model-name", "--enable-auto-tool-choice", "--tool-call-parser",  # vllm serve
    "--ntasks-per-node",  # srun
    "--lf",  # pytest
}
PROGRAMS = ["finetune.py", "preprocess_utils.py", "inference.py", "api_server.py",
            *sorted(str(path.relative_to(ROOT)) for path in (ROOT / "scripts").glob("*.py")),
            *sorted(str(path.relative_to(ROOT)) for path in (ROOT / "benchmarks").glob("*.py"))]


@pytest.mark.slow
@needs_venv
def test_options_the_pages_name_exist():
    """Every --option a page names, in its text or its tables, is declared by one of the project's
    programs (or is one of the few other tools' options the pages show)."""
    every_help = ("import runpy, sys\n"
                  "for program in sys.argv[1:]:\n"
                  "    sys.argv = [program, '--help']\n"
                  "    try:\n"
                  "        runpy.run_path(program, run_name='__main__')\n"
                  "    except SystemExit as done:\n"
                  "        assert not done.code, program\n")
    done = subprocess.run([".venv/bin/python", "-c", every_help, *PROGRAMS], cwd=ROOT, env=fresh_shell_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    declared = done.stdout
    for page in PAGES:
        named = set(re.findall(r"(?<![\w-])--[a-z][\w-]*", (ROOT / page).read_text())) - OTHER_TOOLS_OPTIONS
        unknown = sorted(flag for flag in named if not lists_option(declared, flag))
        assert not unknown, f"{page} names options no program declares: {unknown}"


def test_console_scripts_name_functions_that_exist():
    """pyproject's console commands each name a module-level function of the project (read, not imported)."""
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert {"chatglm3-finetune", "chatglm3-inference", "chatglm3-serve", "chatglm3-preview"} <= scripts.keys()
    for target in scripts.values():
        module, function = target.split(":")
        source = ROOT / (module.replace(".", "/") + ".py")
        defined = {node.name for node in ast.parse(source.read_text()).body if isinstance(node, ast.FunctionDef)}
        assert function in defined, target


# ---- curl against a running server ----------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
@needs_venv
def test_curl_commands_get_answers_from_the_server(tiny_model_dir, tmp_path):
    """Every curl command of the pages, sent to api_server.py serving the tiny model (on a free port
    instead of 8000, the one change): each gets a JSON answer or a stream that ends with [DONE]."""
    curls = [command for command in ALL_COMMANDS if environment_and_program(command.text)[1][:1] == ["curl"]]
    assert curls, "the pages show no curl command"
    port = free_port()
    log = tmp_path / "server.log"
    server = subprocess.Popen([".venv/bin/python", "api_server.py", "--model", str(tiny_model_dir), "--port",
                               str(port), "--threads", "1", "--default-max-tokens", "8"],
                              cwd=ROOT, env=fresh_shell_env(), stdout=log.open("w"), stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2)
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.5)
        for command in curls:
            sent = command.text.replace("127.0.0.1:8000", f"127.0.0.1:{port}")
            done = subprocess.run(["bash", "-c", sent], cwd=ROOT, env=fresh_shell_env(), capture_output=True,
                                  text=True, timeout=120)
            assert done.returncode == 0, f"{command}\n{done.stderr[-2000:]}"
            if '"stream": true' in sent:
                assert done.stdout.rstrip().endswith("data: [DONE]"), f"{command}\n{done.stdout[-2000:]}"
            else:
                answer = json.loads(done.stdout)
                assert "error" not in answer and answer.get("object") in ("list", "chat.completion"), \
                    f"{command}\n{done.stdout[-2000:]}"
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)


# ---- the pages themselves ----------------------------------------------------------------------------

@pytest.mark.parametrize("page", PAGES)
def test_python_examples_compile(page):
    for line, block in fenced_blocks(page, "python"):
        compile(block, f"{page}:{line}", "exec")


@pytest.mark.parametrize("page", PAGES)
def test_json_examples_are_valid_records(page, tmp_path):
    """Every ```json block parses; one that is a training record passes the checks finetune.py makes."""
    from chatglm3_finetune.data.formats import detect_format, load_data

    for line, block in fenced_blocks(page, "json"):
        try:
            example = json.loads(block)
        except json.JSONDecodeError as error:
            pytest.fail(f"{page}:{line}: {error}")
        if detect_format(example):
            data = tmp_path / "example.jsonl"
            data.write_text(json.dumps(example) + "\n")
            load_data(str(data), "auto")  # raises DataError naming the field


def heading_anchors(page: Path) -> set[str]:
    """The anchors GitHub gives a page's headings."""
    anchors = set()
    for line in page.read_text().splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"\s", "-", re.sub(r"[^\w\- ]", "", title)))
    return anchors


@pytest.mark.parametrize("page", PAGES)
def test_links_reach_existing_pages_and_headings(page):
    text = (ROOT / page).read_text()
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"https?://", target):
            continue
        path, _, anchor = target.partition("#")
        linked = (ROOT / page).parent / path if path else ROOT / page
        assert linked.exists(), f"{page}: link to {target}: no such file"
        if anchor:
            assert anchor in heading_anchors(linked), f"{page}: link to {target}: no such heading"


@pytest.mark.parametrize("page", PAGES)
def test_files_the_pages_name_exist(page):
    """Every project path a page names in `code` (chatglm3_finetune/..., scripts/..., tests/..., ...)
    exists: pages follow the tree when it moves."""
    text = (ROOT / page).read_text()
    named = re.findall(r"`((?:chatglm3_finetune|scripts|tests|benchmarks|configs|docs|web)/[\w./-]*)`", text)
    missing = sorted({path for path in named if not (ROOT / path).exists()})
    assert not missing, f"{page} names files that do not exist: {missing}"


def test_readme_links_every_docs_page():
    readme = (ROOT / "README.md").read_text()
    for page in PAGES[1:]:
        assert f"({page})" in readme or f"({page}#" in readme, f"README.md does not link {page}"
