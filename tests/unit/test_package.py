"""The package's shape: which distribution owns which import package, what the error tree
exports, and that trtserve's modules import each other without circles."""
from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest
import trtserve_client
from trtserve_client import errors as client_errors

import trtserve
from trtserve import errors as server_errors

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "trtserve"

# Circles among trtserve's modules that are still there; each entry goes when its modules
# are reworked.  Nothing else may join or form a circle.
KNOWN_CIRCLES = [
]


def test_the_error_tree_exports_every_error_class_by_name():
    classes = {name for name, value in vars(client_errors).items()
               if isinstance(value, type) and issubclass(value, client_errors.TrtserveError)}
    helpers = {"ErrorCode", "error_class", "error_from_wire"}
    assert set(client_errors.__all__) == classes | helpers
    assert server_errors.__all__ == client_errors.__all__
    for module in (server_errors, trtserve, trtserve_client):
        missing = [name for name in client_errors.__all__ if name not in module.__all__]
        assert not missing, f"{module.__name__}.__all__ lacks {missing}"
        assert all(getattr(module, name) is getattr(client_errors, name) for name in client_errors.__all__)


def test_the_server_distribution_requires_the_client_distribution_and_ships_none_of_it(tmp_path):
    subprocess.run([sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(tmp_path)],
                   cwd=ROOT, check=True, capture_output=True, timeout=120)
    info = tmp_path / "trtserve.egg-info"
    assert (info / "top_level.txt").read_text().split() == ["trtserve", "trtserve_bench"]
    requires = (info / "requires.txt").read_text().splitlines()
    client = [m[1] for line in requires if (m := re.fullmatch(r"trtserve-client\s*@\s*(\S+)", line))]
    assert client == [(ROOT / "clients").as_uri()]  # a direct reference to this checkout's clients/
    sources = (info / "SOURCES.txt").read_text()
    assert "trtserve_client" not in sources


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str], lazy: bool, typing: bool) -> set[str]:
    """The trtserve modules ``path`` imports: at module level, with ``lazy`` inside functions
    too, with ``typing`` under ``if TYPE_CHECKING`` too (for annotations only)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def absolute(node: ast.ImportFrom) -> str:
        if not node.level:
            return node.module or ""
        base = package.split(".")[: len(package.split(".")) - node.level + 1]
        return ".".join(base + ([node.module] if node.module else []))

    def visit(statements: list[ast.stmt]) -> None:
        for node in statements:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                visit(node.body if typing else [])
                visit(node.orelse)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if lazy:
                    visit(node.body)
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = absolute(node)
                found.add(base)
                found.update(f"{base}.{alias.name}" for alias in node.names)  # from a package import a module
            else:
                for field in ("body", "orelse", "finalbody", "handlers"):
                    inner = getattr(node, field, None)
                    if isinstance(inner, list):
                        visit(inner)

    visit(ast.parse(path.read_text()).body)
    return {m for m in found if m in modules and m != name}


def _circles(graph: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles: list[set[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(component)

    for v in graph:
        if v not in index:
            connect(v)
    return circles


@pytest.mark.parametrize(
    "lazy, typing", [(False, False), (True, False), (True, True)],
    ids=["module-level", "with-imports-in-functions", "with-imports-for-annotations"],
)
def test_trtserve_modules_import_each_other_without_circles(lazy, typing):
    paths = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {name: _imports(path, set(paths), lazy, typing) for name, path in paths.items()}
    circles = _circles(graph)
    assert [c for c in circles if c not in KNOWN_CIRCLES] == []


def test_the_circle_finder_finds_a_circle():
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]
