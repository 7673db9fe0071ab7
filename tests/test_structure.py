"""The architecture the tree promises: subpackages by concern that depend on each other one way,
no import cycles, no sys.path edits, the package never importing what users run, each
subpackage naming its public face, and tests mirroring the package."""

import ast
import re
import subprocess

import pytest

from conftest import ROOT

PACKAGE = ROOT / "chatglm3_finetune"
TOP_LEVEL_PROGRAMS = {"finetune", "arguments", "trainer", "preprocess_utils", "inference", "api_server"}


def module_name(path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in PACKAGE.rglob("*.py")}


def imported_names(path) -> set[str]:
    """Every module a file imports, anywhere in it (function-level imports included), absolute."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def package_imports(path) -> set[str]:
    return {name for name in imported_names(path) if name in MODULES and name != module_name(path)}


def subpackage(module: str) -> str:
    return ".".join(module.split(".")[:2])


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for neighbour in sorted(graph.get(node, ())):
            if state.get(neighbour) == "open":
                return stack[stack.index(neighbour):] + [neighbour]
            if neighbour not in state and (cycle := visit(neighbour)):
                return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_module_imports_itself_back():
    graph = {name: package_imports(path) for name, path in MODULES.items()}
    assert find_cycle(graph) is None


def test_subpackages_depend_on_each_other_one_way():
    graph: dict[str, set[str]] = {}
    for name, path in MODULES.items():
        for dependency in package_imports(path):
            if subpackage(dependency) != subpackage(name):
                graph.setdefault(subpackage(name), set()).add(subpackage(dependency))
    cycle = find_cycle(graph)
    assert cycle is None, (f"subpackages import each other: {' -> '.join(cycle)}; put the module that needs "
                           "both sides in the subpackage above them")


def test_the_package_never_imports_the_programs_users_run():
    for name, path in MODULES.items():
        reached = {imported.split(".")[0] for imported in imported_names(path)} & TOP_LEVEL_PROGRAMS
        assert not reached, f"{name} imports {sorted(reached)}"


def tracked_python_files():
    listed = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True)
    if listed.returncode != 0:
        pytest.skip("not a git checkout")
    return [ROOT / line for line in listed.stdout.split()]


def test_nothing_edits_sys_path():
    edits = re.compile(r"sys\.path\s*(\.(insert|append|extend)\s*\(|\[[^\]]*\]\s*=|\s*\+?=)")
    offenders = [str(path.relative_to(ROOT)) for path in tracked_python_files()
                 if path.name != "test_structure.py" and edits.search(path.read_text())]
    assert offenders == []


def test_nothing_outside_a_subpackage_reaches_into_its_private_modules():
    private = {name for name in MODULES if any(part.startswith("_") and part != "__init__" for part in name.split("."))}
    for path in tracked_python_files():
        importer = module_name(path) if PACKAGE in path.parents else None
        for imported in imported_names(path) & private:
            owner = imported.rsplit(".", 1)[0]
            assert importer and importer.startswith(owner), f"{path.relative_to(ROOT)} imports private {imported}"


SUBPACKAGES = sorted(path.parent for path in PACKAGE.rglob("__init__.py"))


@pytest.mark.parametrize("folder", SUBPACKAGES, ids=lambda folder: module_name(folder / "__init__.py"))
def test_every_subpackage_names_its_modules_in_its_docstring(folder):
    docstring = ast.get_docstring(ast.parse((folder / "__init__.py").read_text()))
    assert docstring, f"{folder / '__init__.py'} has no docstring naming its public face"
    assert len(docstring.splitlines()) <= 16, "a public face in a few lines"
    members = [path.stem for path in folder.glob("*.py") if path.stem != "__init__" and not path.stem.startswith("_")]
    members += [path.parent.name for path in folder.glob("*/__init__.py")]
    if folder == PACKAGE:
        return  # the top docstring names the subpackages, checked below
    missing = [member for member in members if f"`{member}`" not in docstring]
    assert missing == [], f"{module_name(folder / '__init__.py')}'s docstring does not name {missing}"


def test_the_package_docstring_names_every_subpackage():
    docstring = ast.get_docstring(ast.parse((PACKAGE / "__init__.py").read_text()))
    members = [path.parent.name for path in PACKAGE.glob("*/__init__.py")] + \
              [path.stem for path in PACKAGE.glob("*.py") if path.stem != "__init__"]
    assert [member for member in members if f"`{member}`" not in docstring] == []


def test_no_history_in_the_code():
    history = re.compile(r"\b(H100|H200|A100)\b|issue #?\d+|load average|not run yet")
    offenders = [f"{path.relative_to(ROOT)}:{number}" for path in MODULES.values()
                 for number, line in enumerate(path.read_text().splitlines(), 1) if history.search(line)]
    assert offenders == [], "machine names, issue numbers and measurements belong in docs/ or commit messages"


def test_tests_mirror_the_package():
    tests = ROOT / "tests"
    for folder in (path for path in tests.rglob("*") if path.is_dir() and path.name != "__pycache__"):
        relative = folder.relative_to(tests)
        assert relative.parts[0] == "benchmarks" or (PACKAGE / relative).is_dir(), \
            f"tests/{relative} mirrors no subpackage of chatglm3_finetune"
    names = [path.name for path in tests.rglob("test_*.py")]
    assert len(names) == len(set(names)), "test file names must be unique: pytest.ini puts every test folder on the path"
    folders = {str(path.relative_to(ROOT)) for path in tests.rglob("*") if path.is_dir() and path.name != "__pycache__"}
    listed = set(re.search(r"^pythonpath\s*=\s*(.*)$", (ROOT / "pytest.ini").read_text(), re.M).group(1).split())
    assert folders | {"tests"} <= listed, f"pytest.ini pythonpath misses {sorted(folders - listed)}"


def test_the_longest_files_that_run_first_exist():
    from conftest import LONGEST_FILES

    missing = [name for name in LONGEST_FILES if not (ROOT / "tests" / name).is_file()]
    assert missing == [], "conftest.LONGEST_FILES names test files that are gone: rename or drop them there"
