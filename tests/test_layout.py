"""The package's shape: no import cycle, small files and functions, a layout table (the "## Layout"
section of docs/development.md) that names every module where it lives, and a README that stays a
short front door whose docs/ links all exist."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "apostate"
ROOT = PACKAGE.parents[1]
README = ROOT / "README.md"
LAYOUT_DOC = ROOT / "docs" / "development.md"
MAX_README_LINES = 200
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 60


def module_name(path: Path) -> str:
    parts = ["apostate", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


# The layers, top first: a module may import only its own layer or those below it.
COMMANDS = ("apostate.cli", "apostate.__main__", "apostate.commands")
ORCHESTRATOR = ("apostate.session",)


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Every apostate module `name` imports anywhere: at module level, inside functions, under
    TYPE_CHECKING, and by `import_module("apostate...")` with a literal name."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            target = (f"{base}.{node.module}" if node.module else base) if node.level else (node.module or "")
            hits = {c for c in [target] + [f"{target}.{alias.name}" for alias in node.names] if c in known}
            found |= hits or ({target} & known)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name in known}
        elif (
            isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == "import_module"
        ):
            literal = node.args[0] if node.args else None
            if isinstance(literal, ast.Constant) and isinstance(literal.value, str) and literal.value in known:
                found.add(literal.value)
    return found


def import_graph() -> dict[str, set[str]]:
    found = modules()
    known = set(found)
    graph = {}
    for name, path in found.items():
        ancestors = {name.rsplit(".", k)[0] for k in range(1, name.count(".") + 1)}
        # Importing a package's module while the package initializes is no cycle: it is in sys.modules.
        graph[name] = imports_of(name, path, known) - ancestors - {name}
    return graph


def _within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes)


def test_no_import_cycle():
    graph = import_graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt) :] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_no_stage_imports_a_command_or_the_orchestrator():
    upward = []
    for name, targets in import_graph().items():
        if _within(name, COMMANDS):
            continue
        for target in sorted(targets):
            if _within(target, COMMANDS) or (_within(target, ORCHESTRATOR) and not _within(name, ORCHESTRATOR)):
                upward.append(f"{name} -> {target}")
    assert not upward, upward


def test_settings_import_only_leaf_settings_modules():
    """settings.py imports pydantic, config_sources, errors and settings modules that import
    nothing else of apostate; no method, scorer or result imports the settings."""
    graph = import_graph()
    leaves = graph["apostate.settings"] - {"apostate.config_sources", "apostate.errors"}
    for leaf in leaves:
        data = {"apostate.methods", "apostate.capabilities"}  # registries that are plain data
        assert graph[leaf] <= {"apostate.errors", "apostate.methods.ranges", *data}, leaf
    for name, targets in graph.items():
        if _within(name, ("apostate.methods", "apostate.scoring", "apostate.results")):
            assert "apostate.settings" not in targets, name


def _scratch_package(tmp_path, monkeypatch, files: dict[str, str]) -> None:
    package = tmp_path / "apostate"
    for relative, text in {"__init__.py": "", **files}.items():
        (package / relative).parent.mkdir(parents=True, exist_ok=True)
        (package / relative).write_text(text)
    monkeypatch.setattr(__import__(__name__), "PACKAGE", package)


def test_the_cycle_check_finds_a_cycle_hidden_in_a_function(tmp_path, monkeypatch):
    """The checks above can fail: two modules that import each other, one of them only inside a
    function or under TYPE_CHECKING, are reported."""
    hidden = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import y\n"
    _scratch_package(tmp_path, monkeypatch, {"a.py": "def f():\n    from .b import x\n", "b.py": hidden})
    try:
        test_no_import_cycle()
    except AssertionError as error:
        assert "apostate.a -> apostate.b -> apostate.a" in str(error)
    else:
        raise AssertionError("a cycle was not found")


def test_the_layer_check_finds_a_stage_importing_a_command(tmp_path, monkeypatch):
    files = {"commands/__init__.py": "", "commands/run.py": "", "session.py": "", "search/__init__.py": ""}
    files["search/trials.py"] = (
        "def f():\n    from apostate.commands.run import x\n    from apostate.session import y\n"
    )
    _scratch_package(tmp_path, monkeypatch, files)
    try:
        test_no_stage_imports_a_command_or_the_orchestrator()
    except AssertionError as error:
        assert "apostate.search.trials -> apostate.commands.run" in str(error)
        assert "apostate.search.trials -> apostate.session" in str(error)
    else:
        raise AssertionError("an upward import was not found")


def test_importing_the_settings_loads_no_torch():
    import subprocess
    import sys

    code = "import sys, apostate.settings; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_files_and_functions_stay_small():
    too_long = []
    for name, path in modules().items():
        lines = path.read_text().splitlines()
        if len(lines) > MAX_FILE_LINES:
            too_long.append(f"{name}: {len(lines)} lines")
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    too_long.append(f"{name}.{node.name}: {length} lines")
    assert not too_long, too_long


def layout_table() -> dict[str, set[str]]:
    """The layout table of docs/development.md: folder (or '' for the top level) -> the module files its row names."""
    text = LAYOUT_DOC.read_text()
    section = text[text.index("## Layout") :]
    section = section[: section.index("\n## ", 4)] if "\n## " in section[4:] else section
    rows: dict[str, set[str]] = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not (cells[0].startswith("`") and cells[0].endswith("/`")):
            continue  # folder rows only (the section also lists bench/ scripts)
        folder = cells[0].strip("`").rstrip("/")
        folder = "" if folder in ("apostate", ".") else folder
        rows[folder] = set(re.findall(r"`([\w/]+\.py)`", cells[2]))
    return rows


def test_layout_table_names_every_module_in_its_folder():
    table = layout_table()
    on_disk: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(PACKAGE)
        folder = relative.parts[0] if len(relative.parts) > 1 else ""
        on_disk.setdefault(folder, set()).add("/".join(relative.parts[1:]) if folder else relative.name)
    assert set(table) == set(on_disk), "one row per folder"
    for folder, files in on_disk.items():
        assert table[folder] == files, f"docs/development.md layout row for '{folder or 'apostate'}'"


def test_readme_is_a_front_door():
    """README.md stays short; the rest lives in docs/, and every docs/ page it links exists."""
    text = README.read_text()
    lines = len(text.splitlines())
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines (at most {MAX_README_LINES}); move detail to docs/"
    links = set(re.findall(r"\(\s*(docs/[^)\s#]+\.md)", text))
    assert links, "README.md links no docs/ page"
    missing = sorted(link for link in links if not (ROOT / link).is_file())
    assert not missing, f"README.md links docs/ pages that do not exist: {missing}"
