"""The package tree reads as layers: no module imports a module of a higher layer.

Imports are read from the source (module level and inside functions); the only upward
imports allowed are the lazy re-exports of moved names inside a module's ``__getattr__``.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

import gradience_jax

ROOT = pathlib.Path(gradience_jax.__file__).parent

#: top-level name -> layer (higher may import lower, never the reverse)
LAYERS = {
    "tree": 0, "errors": 0, "_validate": 0, "_json": 0, "_compat": 0, "environment": 0,
    "operators": 1,
    "lanczos": 2, "spectrum": 2, "estimators": 2, "solvers": 2,
    "geometry": 3, "weights": 3, "landscape": 3, "attention": 3, "probes": 3,
    "telemetry": 3, "influence": 3, "laplace": 3,
    "models": 4, "data": 4,
    "torch_bridge": 5,
    "experiments": 6,
    "plots": 7, "plots_weights": 7,
    "app": 8, "cli": 8, "report": 8, "protocols": 8,
}
#: analyses hold numerics only: none of these at module level
ANALYSES = ("geometry", "weights", "landscape", "attention", "probes", "telemetry", "spectrum",
            "estimators", "solvers", "lanczos", "operators", "tree")
HEAVY = ("optax", "matplotlib", "gradience_jax.models", "gradience_jax.data")


def _modules():
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        top = parts[0] if parts[0] != "__init__" else None
        yield path, top


def _imports(tree: ast.Module, *, module_level_only: bool = False):
    shim = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name == "__getattr__":
            shim |= {id(sub) for sub in ast.walk(node)}
    nodes = tree.body if module_level_only else ast.walk(tree)
    for node in nodes:
        if id(node) in shim:
            continue
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "gradience_jax":
                yield from (f"gradience_jax.{a.name}" for a in node.names)
            else:
                yield node.module
        elif isinstance(node, ast.Import):
            yield from (a.name for a in node.names)


def _layer_of(name: str):
    parts = name.split(".")
    if parts[0] != "gradience_jax" or len(parts) < 2:
        return None
    return LAYERS.get(parts[1])


@pytest.mark.parametrize("path,top", list(_modules()), ids=lambda x: str(x)[-40:])
def test_no_upward_imports(path, top):
    if top is None:  # the package __init__ gathers the public API
        return
    assert top in LAYERS, f"{top} has no layer in tests/test_layers.py: add it"
    tree = ast.parse(path.read_text())
    upward = sorted({n for n in _imports(tree)
                     if (_layer_of(n) or 0) > LAYERS[top]})
    assert not upward, f"{path.relative_to(ROOT)} (layer {LAYERS[top]}) imports {upward}"


@pytest.mark.parametrize("path,top", [m for m in _modules() if m[1] in ANALYSES],
                         ids=lambda x: str(x)[-40:])
def test_analyses_import_no_training_models_or_plotting_at_module_level(path, top):
    tree = ast.parse(path.read_text())
    heavy = sorted({n for n in _imports(tree, module_level_only=True)
                    if n.startswith(HEAVY)})
    assert not heavy, f"{path.relative_to(ROOT)} imports {heavy} at module level"


def test_every_layer_name_exists():
    present = {top for _, top in _modules() if top is not None}
    assert set(LAYERS) <= present, sorted(set(LAYERS) - present)
