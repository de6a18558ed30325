"""Imports flow one way (docs/design.md): no cycle between the modules of ``platform/xmr``,
function-local imports included, and each layer imports only the layers below it.

Read with ``ast`` (nothing is imported). An edge is an explicit ``import a.b`` or
``from a.b import c`` (to ``a.b.c`` when that is a module, else to ``a.b``); imports under
``if TYPE_CHECKING:`` never run and are left out.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "platform"
PACKAGE = ROOT / "xmr"

# The layers, bottom to top; a module may import its own layer and those below.
LAYERS = [
    {"xmr", "xmr.config", "xmr.distributed", "xmr.outputs", "xmr.machine", "xmr.data", "xmr.metrics", "xmr.raycompat"},
    {"xmr.models", "xmr.losses"},
    {"xmr.checkpoint"},
    {"xmr.tasks"},
    {"xmr.checks"},
    {"xmr.method"},
    {"xmr.train"},
    {"xmr.tune", "xmr.serve", "xmr.compare"},
    {"xmr.cli"},
]


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


@functools.lru_cache(maxsize=1)
def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports(path: Path, known: set[str]) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:  # ``from pkg import submodule`` imports the submodule, not the package's names
                sub = f"{node.module}.{a.name}"
                found.add(sub if sub in known else node.module)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return {m for m in found if m in known}


@functools.lru_cache(maxsize=1)
def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imports(path, known) - {name} for name, path in mods.items()}


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(g.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if state.get(nxt) is None:
                cycle = dfs(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(g):
        if state.get(node) is None:
            cycle = dfs(node)
            if cycle:
                return cycle
    return None


def layer_of(module: str) -> int:
    best, index = "", -1
    for i, layer in enumerate(LAYERS):
        for prefix in layer:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > len(best):
                best, index = prefix, i
    return index


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_cycle_between_modules():
    cycle = find_cycle(dict(graph()))
    assert cycle is None, " -> ".join(cycle or [])


def test_every_module_has_a_layer():
    assert [m for m in modules() if layer_of(m) < 0] == []


@pytest.mark.parametrize("module", sorted(modules()))
def test_imports_flow_down_the_layers(module):
    upward = sorted(dep for dep in graph()[module] if layer_of(dep) > layer_of(module))
    assert upward == [], f"{module} (layer {layer_of(module)}) imports from a higher layer: {upward}"


def test_ray_is_imported_only_by_the_ray_layers():
    """Everything below train / tune / serve / compare is plain PyTorch, testable without a cluster."""
    ray_layers = ("xmr.train", "xmr.tune", "xmr.serve", "xmr.compare", "xmr.raycompat")
    offenders = [f"{name}: {m}" for name, m in ray_imports() if not name.startswith(ray_layers)]
    assert offenders == []


def ray_imports() -> list[tuple[str, str]]:
    """(module, Ray module it imports) over the package, function-local imports included."""
    out = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            out += [(name, m) for m in mods if m == "ray" or m.startswith("ray.")]
    return out


def test_the_training_loop_is_ray_free():
    """The one loop (``fit``) and its step run without Ray; only the adapters import it."""
    loop = {"xmr.train.fit", "xmr.train.step", "xmr.train.runfs", "xmr.train.progress", "xmr.train.pretrained"}
    assert [(n, m) for n, m in ray_imports() if n in loop] == []


def test_private_ray_is_reached_only_through_raycompat():
    """Ray's private modules and Serve's ``_internal`` option appear in ``xmr.raycompat`` alone,
    so a Ray upgrade is checked in one file."""
    private = [(n, m) for n, m in ray_imports() if "._" in m and n != "xmr.raycompat"]
    internal = [name for name, path in modules().items()
                if name != "xmr.raycompat" and "_internal=True" in path.read_text()]
    assert private == [] and internal == []
    assert any("._" in m for n, m in ray_imports() if n == "xmr.raycompat")  # the check looks where they are
