"""The import rules of :mod:`models`: runtime code never imports training code, the package never
imports the other packages, and the training CLI builds its parser without torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / "models"
RUNTIME = sorted(p for p in MODELS.glob("*.py"))
FOREIGN = ("worker", "db", "dicom_node")


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at the top or inside a function."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def _is_under(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def test_runtime_modules_exist() -> None:
    names = {p.stem for p in RUNTIME}
    assert {"analyzer", "api", "labels", "lung_mask", "classifiers", "xrv_adapter"} <= names
    assert not (MODELS / "datasets").exists() and not (MODELS / "train_classifier.py").exists()


@pytest.mark.parametrize("path", RUNTIME, ids=lambda p: p.name)
def test_runtime_module_never_imports_training(path: Path) -> None:
    bad = sorted(n for n in _imports(path) if _is_under(n, "models.training"))
    assert not bad, f"{path.name} imports training code: {bad}"


@pytest.mark.parametrize(
    "path", sorted(MODELS.rglob("*.py")), ids=lambda p: str(p.relative_to(MODELS))
)
def test_models_never_import_other_packages(path: Path) -> None:
    bad = sorted(n for n in _imports(path) if any(_is_under(n, pkg) for pkg in FOREIGN))
    assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_loading_runtime_modules_loads_no_training_code() -> None:
    mods = [f"models.{p.stem}" for p in RUNTIME if p.stem != "__init__"]
    code = (
        "import importlib, sys\n"
        f"for m in {mods!r}: importlib.import_module(m)\n"
        "print(sorted(m for m in sys.modules if m.startswith('models.training')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]", out.stdout


def test_training_scripts_do_not_import_each_other() -> None:
    """Shared training code lives in modules both import, not in another script."""
    scripts = {"train_classifier", "train_view", "evaluate"}
    for name in scripts:
        imported = _imports(MODELS / "training" / f"{name}.py")
        other = sorted(
            n for n in imported for s in scripts - {name} if _is_under(n, f"models.training.{s}")
        )
        assert not other, f"{name} imports {other}"


def test_cli_parser_is_built_without_torch() -> None:
    code = (
        "import argparse, sys\n"
        "from models.training.cli import add_subcommands\n"
        "p = argparse.ArgumentParser()\n"
        "add_subcommands(p.add_subparsers(dest='command', required=True))\n"
        "a = p.parse_args(['train', 'classifier', '--model', 'model1', '--out', 'x.json'])\n"
        "print(a.func.module, a.model_kind, 'torch' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["models.training.train_model2", "classifier", "False"]
