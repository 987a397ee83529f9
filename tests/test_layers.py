"""The architecture's invariants: imports run one way, and nothing private crosses a module.

Layers, bottom to top: ``schemas`` (the contract) <- ``backbones``, ``evaluation``, ``storage``
(shared) <- ``pipeline``, ``training`` (never each other) <- ``demo`` <- ``benchmarks``. Every
import of a hubflow package is checked, including imports inside functions.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Package -> the hubflow packages it may import (besides itself).
SHARED = {"schemas", "backbones", "evaluation", "storage"}
ALLOWED = {
    "schemas": set(),
    "backbones": {"schemas"},
    "evaluation": {"schemas"},
    "storage": {"schemas"},
    "pipeline": SHARED,
    "training": SHARED,
    "demo": SHARED | {"pipeline", "training"},
    "benchmarks": SHARED | {"pipeline", "training", "demo"},
}
PACKAGES = set(ALLOWED)


def _modules(package: str) -> list[pathlib.Path]:
    return sorted((ROOT / package).rglob("*.py"))


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(tree: ast.AST) -> list[tuple[int, str, list[str]]]:
    """``(line, module, imported names)`` of every absolute import in ``tree``."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module, [alias.name for alias in node.names]))
    return found


def _is_hubflow_module(name: str) -> bool:
    return name.split(".")[0] in PACKAGES


def layer_violations(package: str, source: str) -> list[str]:
    """Imports in ``source`` (a module of ``package``) of a layer ``package`` may not use."""
    return [
        f"line {line} imports {module}"
        for line, module, _ in _imports(ast.parse(source))
        if (top := module.split(".")[0]) in PACKAGES
        and top != package
        and top not in ALLOWED[package]
    ]


def private_uses(source: str, this: str) -> list[str]:
    """``from x import _y`` and ``x._y`` in ``source`` (module ``this``) on other hubflow modules."""
    tree = ast.parse(source)
    found = []
    aliases: dict[str, str] = {}  # local name -> the hubflow module or name it is bound to
    for line, module, names in _imports(tree):
        if not _is_hubflow_module(module):
            continue
        if not names:  # import a.b binds a
            aliases[module.split(".")[0]] = module.split(".")[0]
        for name in names:
            if name.startswith("_") and module != this:
                found.append(f"line {line}: from {module} import {name}")
            aliases[name] = f"{module}.{name}"
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in aliases
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
            and aliases[node.value.id] != this
        ):
            found.append(f"line {node.lineno}: {node.value.id}.{node.attr}")
    return found


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_run_one_way(package):
    offenders = [
        f"{path.relative_to(ROOT)}: {v}"
        for path in _modules(package)
        for v in layer_violations(package, path.read_text())
    ]
    assert not offenders, f"{package}/ reaches a layer it must not:\n" + "\n".join(offenders)


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_no_private_name_crosses_a_module(package):
    offenders = [
        f"{path.relative_to(ROOT)}: {v}"
        for path in _modules(package)
        for v in private_uses(path.read_text(), _module_name(path))
    ]
    assert not offenders, "private names used across modules:\n" + "\n".join(offenders)


def test_the_checks_find_violations_also_inside_functions():
    source = "def f():\n    from training import task\n    return task._fit\n"
    assert layer_violations("pipeline", source) == ["line 2 imports training"]
    assert layer_violations("demo", source) == []
    assert private_uses(source, "pipeline.predict") == ["line 3: task._fit"]
    assert private_uses("from pipeline.transforms import _rejected\n", "pipeline.predict") == [
        "line 1: from pipeline.transforms import _rejected"
    ]
    assert layer_violations("training", "import pipeline.preprocess\n") == [
        "line 1 imports pipeline.preprocess"
    ]
