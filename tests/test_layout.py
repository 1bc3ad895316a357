"""The package's shape: no import cycle, small files and functions, and a README layout table
that names every module where it lives."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "apostate"
README = PACKAGE.parents[1] / "README.md"
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 60


def module_name(path: Path) -> str:
    parts = ["apostate", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _type_checking_only(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def module_level_imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Modules imported when `name` is imported (not in functions, not under TYPE_CHECKING)."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    nodes = list(tree.body)
    while nodes:
        node = nodes.pop()
        if isinstance(node, ast.If) and not _type_checking_only(node):
            nodes += node.body + node.orelse
        elif isinstance(node, ast.Try):
            nodes += node.body + node.orelse + node.finalbody
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            target = (f"{base}.{node.module}" if node.module else base) if node.level else (node.module or "")
            candidates = [target] + [f"{target}.{alias.name}" for alias in node.names]
            found |= {c for c in candidates if c in known}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name in known}
    return found


def test_no_import_cycle():
    found = modules()
    known = set(found)
    graph = {}
    for name, path in found.items():
        ancestors = {name.rsplit(".", k)[0] for k in range(1, name.count(".") + 1)}
        # Importing a package's module while the package initializes is no cycle: it is in sys.modules.
        graph[name] = module_level_imports(name, path, known) - ancestors - {name}
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


def test_the_cycle_check_finds_a_cycle(tmp_path, monkeypatch):
    """The check above can fail: two modules that import each other are reported."""
    package = tmp_path / "apostate"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from .b import x\n")
    (package / "b.py").write_text("from .a import y\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", package)
    try:
        test_no_import_cycle()
    except AssertionError as error:
        assert "apostate.a -> apostate.b -> apostate.a" in str(error)
    else:
        raise AssertionError("a cycle was not found")


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
    """README's layout table: folder (or '' for the top level) -> the module files its row names."""
    text = README.read_text()
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


def test_readme_layout_table_names_every_module_in_its_folder():
    table = layout_table()
    on_disk: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(PACKAGE)
        folder = relative.parts[0] if len(relative.parts) > 1 else ""
        on_disk.setdefault(folder, set()).add("/".join(relative.parts[1:]) if folder else relative.name)
    assert set(table) == set(on_disk), "one row per folder"
    for folder, files in on_disk.items():
        assert table[folder] == files, f"README layout row for '{folder or 'apostate'}'"
