"""The package's rooms import downward only, and no two modules import each other (directly or round a circle).

Floors, lowest first: the ground (``llava/*.py``: constants, fingerprints, file I/O, the method's vocabulary,
the conversation templates), ``model``, ``data``, then ``eval`` and ``train`` side by side (neither imports the
other). ``llava/mm_utils.py`` and ``llava/cli.py`` are fronts (LLaVA's own module name; the command line), not ground.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "llava"
FLOOR = {"ground": 0, "model": 1, "data": 2, "eval": 3, "train": 3}
FRONTS = {"llava.mm_utils", "llava.cli"}


def imports() -> dict[str, set[str]]:
    found = {}
    for f in PACKAGE.rglob("*.py"):
        name = ".".join(f.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        found[name] = {node.module for node in ast.walk(ast.parse(f.read_text()))
                       if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("llava.")}
    return found


def room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 else "ground"


def test_every_import_runs_down_or_level():
    upward = [(a, b) for a, targets in imports().items() if a not in FRONTS for b in targets
              if FLOOR[room(b)] > FLOOR[room(a)] or {room(a), room(b)} == {"eval", "train"}]
    assert not upward, upward


def test_no_circle():
    graph = imports()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module, path):
        state[module] = 1
        for target in graph.get(module, ()):
            assert state.get(target) != 1, " -> ".join(path + [module, target])
            if target in graph and target not in state:
                visit(target, path + [module])
        state[module] = 2

    for module in graph:
        if module not in state:
            visit(module, [])
