"""The engine's rooms keep their order (import-linter contracts in pyproject.toml); no module imports itself in a circle."""

from __future__ import annotations

from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_every_room_imports_only_the_rooms_below_it(monkeypatch):
    from importlinter.cli import lint_imports

    monkeypatch.chdir(ROOT)
    assert lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True) == 0  # the report says which import


def _cycles(graph: grimp.ImportGraph) -> list:
    """Groups of modules that import each other in a circle (Tarjan's strongly connected components)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(module: str) -> None:
        index[module] = low[module] = counter[0]
        counter[0] += 1
        stack.append(module)
        on_stack.add(module)
        for imported in graph.find_modules_directly_imported_by(module):
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in on_stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == module:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return found


def test_no_import_cycles():
    graph = grimp.build_graph("medautolabel", "MedAutoLabelLib", cache_dir=None, exclude_type_checking_imports=True)
    assert _cycles(graph) == []


def test_a_cycle_is_found(tmp_path, monkeypatch):
    """The cycle finder itself: two modules importing each other inside a function are found."""
    package = tmp_path / "circle"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("def f():\n    from circle import b\n")
    (package / "b.py").write_text("from circle import a\n")
    (package / "c.py").write_text("from circle import a\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert _cycles(grimp.build_graph("circle", cache_dir=None)) == [["circle.a", "circle.b"]]


@pytest.mark.parametrize("room", ["io", "catalog", "runtime", "labelling", "training", "evaluation", "synthetic", "cli"])
def test_every_room_is_a_package_with_a_docstring(room):
    init = ROOT / "MedAutoLabel" / "medautolabel" / room / "__init__.py"
    assert init.is_file() and init.read_text().lstrip().startswith('"""')
