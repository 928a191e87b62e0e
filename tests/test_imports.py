"""The structure of the packages: imports go one way (pipeline and trainer import cache, tools may import all
three, nothing imports tools), cache/ has no import circle, the reader contract names no format, and no
module of cache/ passes about 600 lines. Read from the source with ast (imports under TYPE_CHECKING are
names for annotations only and do not count)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("cache", "pipeline", "trainer", "tools")


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _runtime_imports(path: Path) -> set[str]:
    """Modules ``path`` imports at run time (absolute names; TYPE_CHECKING blocks left out)."""
    tree = ast.parse(path.read_text())
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for child in node.body for n in ast.walk(child)}
    me = _module(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            out.add(name)
            out |= {f"{name}.{a.name}" for a in node.names}
    return out


def _graph(package: str) -> dict[str, set[str]]:
    files = {_module(p): p for p in (ROOT / package).rglob("*.py")}
    return {m: {i for i in _runtime_imports(p) if i in files and i != m} for m, p in files.items()}


def test_imports_go_one_way():
    allowed = {"cache": {"cache"}, "pipeline": {"cache", "pipeline"}, "trainer": {"cache", "trainer"},
               "tools": set(PACKAGES)}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            for name in _runtime_imports(path):
                top = name.split(".")[0]
                if top in PACKAGES:
                    assert top in allowed[package], f"{_module(path)} imports {name}"


def test_cache_has_no_import_circle():
    graph = _graph("cache")
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if nxt.startswith(node + "."):  # a package importing its own submodule is its face, not a circle
                continue
            if state.get(nxt) == 1:
                raise AssertionError("import circle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def test_the_contract_names_no_format():
    contract = ("cache.errors", "cache.layout", "cache.manifest", "cache.reader", "cache.writer", "cache.loader",
                "cache.torch_data", "cache.quant", "cache.files", "cache.diff", "cache.inspect", "cache.convert")
    graph = _graph("cache")
    for module in contract:
        formats = sorted(i for i in graph[module] if i.startswith("cache.formats.") or i == "cache.formats.zarr")
        assert not formats, f"{module} imports a format's internals: {formats}"
    for module, imported in graph.items():
        if module.startswith("cache.formats"):
            assert not any(i.startswith("cache.cli") for i in imported), f"{module} imports the entry-point kit"


def test_no_cache_module_is_huge():
    for path in (ROOT / "cache").rglob("*.py"):
        assert len(path.read_text().splitlines()) <= 620, f"{path} has {len(path.read_text().splitlines())} lines"
