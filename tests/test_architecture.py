"""Imports flow one way: driving_log <- sim <- agents <- training <- evaluation (README, "Where things are").

Every .py file of each package is parsed with ``ast``; absolute imports, relative imports
(resolved against the file's package) and ``importlib.import_module`` / ``__import__``
calls with a literal name are all checked.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("driving_log", "sim", "agents", "training", "evaluation")  # left may not import right


def _python_files(package: str) -> list[Path]:
    return sorted(p for p in (ROOT / package).rglob("*.py") if "__pycache__" not in p.parts)


def _module_parts(path: Path) -> list[str]:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return parts[:-1] if parts[-1] == "__init__" else parts


def _layer(module: str) -> str:
    """The layer (or other top-level package) a dotted module name belongs to:
    ``steerloop.sim.env`` -> ``sim``, ``numpy.linalg`` -> ``numpy``."""
    parts = module.split(".")
    return parts[1] if parts[0] == "steerloop" and len(parts) > 1 else parts[0]


def imported_top_level(path: Path) -> set[tuple[str, int]]:
    """(layer or top-level package, line) of everything ``path`` imports."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = _module_parts(path)
    if path.name != "__init__.py":
        package = package[:-1]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {(_layer(alias.name), node.lineno) for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                found.add((_layer(node.module), node.lineno))
            else:
                base = package[:len(package) - (node.level - 1)] if node.level > 1 else package
                target = [*base, *(node.module.split(".") if node.module else [])]
                if target:
                    found.add((target[0], node.lineno))
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                found.add((_layer(node.args[0].value), node.lineno))
    return found


def test_every_layer_has_python_files():
    for package in LAYERS:
        assert (ROOT / package / "__init__.py").is_file(), package


@pytest.mark.parametrize("index", range(len(LAYERS)), ids=LAYERS)
def test_imports_flow_one_way(index):
    package, forbidden = LAYERS[index], set(LAYERS[index + 1:])
    violations = []
    for path in _python_files(package):
        for module, line in sorted(imported_top_level(path)):
            if module in forbidden:
                violations.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert not violations, f"{package}/ may only import {LAYERS[:index + 1]}:\n" + "\n".join(violations)


def test_import_scanner_sees_all_import_forms(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    pkg = tmp_path / "sim" / "sub"
    pkg.mkdir(parents=True)
    (tmp_path / "sim" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    module = pkg / "m.py"
    module.write_text(
        "import numpy as np, steerloop.evaluation.cli\n"
        "from steerloop.agents import experts\n"
        "from . import sibling\n"
        "from ..track import Track\n"
        "import importlib\n"
        "importlib.import_module('steerloop.training.trainer')\n"
        "def f():\n"
        "    from steerloop.evaluation.metrics import drift_metrics\n"
    )
    names = {name for name, _ in imported_top_level(module)}
    assert {"numpy", "evaluation", "agents", "sim", "importlib", "training"} <= names
