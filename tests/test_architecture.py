"""The import graph of captum_iclip: no cycle, and every import points down the layers of docs/architecture.md.

Every module is parsed with ``ast``; imports at module level and inside functions (the lazy ones) are both edges.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "captum_iclip"
ENTRY_MODULES = {"captum_iclip.eval", "captum_iclip.train"}  # python -m entry points besides the __main__ modules

# Cycles that the layering work of issue 23 has still to remove; each fix deletes its entry (an entry that no
# longer occurs fails the test, so that the list only shrinks).
PENDING_CYCLES: list[list[str]] = []


def module_names() -> dict[str, Path]:
    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[tuple[str, int]]:
    """The captum_iclip modules that ``name`` imports, with the line of each import."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {(alias.name, node.lineno) for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:  # ``from package import module`` imports the module
                submodule = f"{source}.{alias.name}"
                found.add((submodule if submodule in modules else source, node.lineno))
    return {(target, line) for target, line in found if target in modules and target != name}


def import_graph() -> dict[str, set[tuple[str, int]]]:
    modules = module_names()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def unit(module: str) -> str:
    """The name a module has in the layer list: its top-level package or module, or ``__main__``."""
    if module in ENTRY_MODULES or module.endswith(".__main__"):
        return "__main__"
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def documented_layers() -> dict[str, int]:
    """Name -> layer number (1 is the top) from the numbered list under "## Layers" in docs/architecture.md."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    section = text.split("## Layers", 1)[1].split("\n## ", 1)[0]
    layers = {}
    for line in section.splitlines():
        match = re.match(r"(\d+)\. (.*?) — ", line)
        if match:
            for name in re.findall(r"`([^`]+)`", match.group(2)):
                layers[name] = int(match.group(1))
    return layers


def test_every_package_has_a_layer():
    layers = documented_layers()
    units = {unit(module) for module in module_names()}
    assert units - layers.keys() == set(), "add these to the layers of docs/architecture.md"
    assert layers.keys() - units == set(), "docs/architecture.md names what captum_iclip does not hold"


def test_imports_point_down():
    layers = documented_layers()
    upward = []
    for module, targets in import_graph().items():
        for target, line in targets:
            source_unit, target_unit = unit(module), unit(target)
            if source_unit != target_unit and layers[target_unit] <= layers[source_unit]:
                upward.append(f"{module}:{line} imports {target} ({source_unit} -> {target_unit})")
    assert sorted(upward) == [], "\n".join(sorted(upward))


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(graph[child]))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return found


def test_no_import_cycle():
    graph = {module: {target for target, _ in targets} for module, targets in import_graph().items()}
    assert sorted(cycles(graph)) == PENDING_CYCLES


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
