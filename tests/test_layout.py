"""The architecture as checked rules: the import-linter contracts in pyproject.toml hold
(and catch a violation), nothing is re-exported, and modules stay small."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
LINT = [str(Path(sys.executable).parent / "lint-imports")]  # import-linter's command


def lint(cwd: Path, pythonpath: Path) -> subprocess.CompletedProcess[str]:
    import os

    env = {**os.environ, "PYTHONPATH": str(pythonpath)}
    return subprocess.run([*LINT, "--no-cache"], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_the_layers_contracts_hold() -> None:
    pytest.importorskip("importlinter", reason="pip install -e '.[dev]' installs import-linter")
    r = lint(ROOT, SRC)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "3 kept, 0 broken" in r.stdout, r.stdout


@pytest.mark.parametrize(("module", "line", "broken"), [
    ("core/layers.py", "from klayer.training import plan  # noqa", "layers"),
    ("core/losses.py", "import matplotlib  # noqa", "core is the math"),
    ("training/checkpoint.py", "from klayer.training import trainstate  # noqa",
     "no import cycles"),
])
def test_the_contracts_catch_a_violation(tmp_path: Path, module: str, line: str,
                                         broken: str) -> None:
    pytest.importorskip("importlinter", reason="pip install -e '.[dev]' installs import-linter")
    shutil.copytree(SRC / "klayer", tmp_path / "src" / "klayer")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    path = tmp_path / "src" / "klayer" / module
    path.write_text(path.read_text() + f"\n\ndef _violation() -> None:\n    {line}\n")
    r = lint(tmp_path, tmp_path / "src")
    assert r.returncode != 0, r.stdout
    assert f"{broken}" in r.stdout and "BROKEN" in r.stdout, r.stdout


def _definitions(module: str) -> set[str]:
    """The names a module defines itself (functions, classes, assignments)."""
    path = SRC / (module.replace(".", "/") + ".py")
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name))
    return names


PUBLIC_APIS = {"klayer": SRC / "klayer" / "__init__.py",  # the library's
               "klayer.check": SRC / "klayer" / "check" / "__init__.py"}  # the checker's


def test_every_name_is_imported_from_the_module_that_defines_it() -> None:
    """No re-exports: only the public APIs (``klayer`` and ``klayer.check``, their
    ``__all__``) gather names from other modules."""
    files = [*SRC.rglob("*.py"), *(ROOT / "tests").rglob("*.py"),
             *(ROOT / "benchmarks").rglob("*.py")]
    wrong = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.ImportFrom) and node.module
                    and node.module.startswith("klayer.")):
                continue
            folder = SRC / node.module.replace(".", "/")
            for alias in node.names:
                if (folder / f"{alias.name}.py").exists() or (folder / alias.name).is_dir():
                    continue  # a module
                if node.module in PUBLIC_APIS and alias.name in _public(node.module):
                    continue
                if alias.name not in _definitions(node.module):
                    wrong.append(f"{path.relative_to(ROOT)}:{node.lineno} imports "
                                 f"{alias.name} from {node.module}, which does not define it")
    assert not wrong, "\n".join(wrong)


def _public(module: str) -> set[str]:
    """The names a public API lists in its ``__all__``."""
    for node in ast.parse(PUBLIC_APIS[module].read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "__all__"
                                                for t in node.targets):
            return set(ast.literal_eval(node.value))
    return set()


def test_the_public_apis_list_only_names_that_exist() -> None:
    import importlib

    for module in PUBLIC_APIS:
        api = importlib.import_module(module)
        assert _public(module) and all(hasattr(api, name) for name in _public(module))
        # a submodule of the same name would shadow the function once imported
        assert not [n for n in _public(module) if (PUBLIC_APIS[module].parent / f"{n}.py").exists()]


def test_the_folders_are_the_layers() -> None:
    folders = {p.name for p in (SRC / "klayer").iterdir() if p.is_dir() and p.name != "recipes"
               and not p.name.startswith("__")}
    assert folders == {"core", "data", "check", "training", "report", "search", "experiments",
                       "cli"}
    assert not [p.name for p in (SRC / "klayer").glob("*.py")
                if p.name not in ("__init__.py", "__main__.py")]
