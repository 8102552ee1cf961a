"""The map of the code in CONTRIBUTING.md stays true: no module imports one of its own layer
or above, every module is on the map, and no function is longer than 60 lines."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "fmnist_jax"


def _layers() -> dict[str, int]:
    text = (REPO / "CONTRIBUTING.md").read_text()
    return {name: int(layer) for layer, name in
            re.findall(r"^\| (\d+) \| `fmnist_jax/(\w+)\.py` \|", text, flags=re.M)}


def _imports(path: Path) -> set[str]:
    """The fmnist_jax modules ``path`` imports, at any depth of its code."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module == "fmnist_jax":
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fmnist_jax."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names
                      if a.name.startswith("fmnist_jax.")}
    return found


def test_every_module_is_on_the_map():
    modules = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    assert modules == set(_layers()), modules ^ set(_layers())


def test_no_module_imports_its_own_layer_or_above():
    layers = _layers()
    wrong = [f"{name} (layer {layer}) imports {other} (layer {layers[other]})"
             for name, layer in layers.items()
             for other in _imports(PACKAGE / f"{name}.py") if layers[other] >= layer]
    assert not wrong, wrong


def test_the_check_can_fail(tmp_path):
    """The import reader finds the three forms of import."""
    path = tmp_path / "m.py"
    path.write_text("import fmnist_jax.steps\nfrom fmnist_jax import data\n"
                    "def f():\n    from fmnist_jax.train import fit\n")
    assert _imports(path) == {"steps", "data", "train"}


def test_functions_are_at_most_60_lines():
    long = [f"{path.name}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1})"
            for path in PACKAGE.glob("*.py")
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > 60]
    assert not long, long
