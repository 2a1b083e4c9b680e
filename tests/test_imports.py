"""The layering rule: core imports only NumPy (and the standard library); nothing imports cli."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "src" / "klayer"
CORE = {"layers", "losses", "network", "bnstats", "optim", "schedules", "gradcheck", "data",
        "config", "batchfile", "modelfile", "augment", "checkpoint",
        "kernels"}  # kernels loads the C twin, _kernels
# Layers from the bottom up; a module may import only its own layer or lower ones.
LEVEL = {**dict.fromkeys(CORE, 0), "fetch": 1, "train": 1, "experiments": 2, "search": 2,
         "plots": 2, "report": 2, "cli": 4, "__init__": 0, "__main__": 5}
CLI_PARTS = {"cli_common", "cli_gradcheck", "cli_train", "cli_tools", "cli_experiment",
             "cli_search"}
LEVEL.update(dict.fromkeys(CLI_PARTS, 3))
LEVEL.update({"runner": 2, "jobcache": 2, "lambda_search": 2, "checkpoint": 0, "best": 2})
LEVEL.update(dict.fromkeys(("plan", "evaluation", "runfolder", "trainstate", "batched",
                            "batched_stack"), 1))
LEVEL.update(dict.fromkeys(("search_space", "search_study", "search_faults", "search_worker",
                            "search_pool", "search_status"), 2))
STDLIB = set(sys.stdlib_module_names)


def imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from .x import y  /  from . import x
                if node.module:
                    names.add("klayer." + node.module.split(".")[0])
                else:
                    names.update("klayer." + a.name for a in node.names)
            elif node.module:
                names.add(node.module)
    return names


def test_every_module_has_a_level() -> None:
    missing = [p.stem for p in PKG.glob("*.py") if p.stem not in LEVEL]
    assert not missing, f"add these modules to LEVEL in {__file__}: {missing}"


def test_core_imports_only_numpy_and_stdlib() -> None:
    for path in PKG.glob("*.py"):
        if path.stem not in CORE:
            continue
        for name in imports(path):
            top = name.split(".")[0]
            ok = top in STDLIB or top == "numpy" or (
                name.startswith("klayer.") and name.split(".")[1] in CORE | {"__init__"}
            )
            assert ok, f"core module {path.stem} imports {name}"


def test_imports_point_downwards() -> None:
    for path in PKG.glob("*.py"):
        for name in imports(path):
            if name.startswith("klayer."):
                target = name.split(".")[1]
                if target == "__version__" or target not in LEVEL:
                    continue
                assert LEVEL[target] <= LEVEL[path.stem] or path.stem == "__main__", (
                    f"{path.stem} (level {LEVEL[path.stem]}) imports {target} "
                    f"(level {LEVEL[target]})"
                )
                assert target != "cli" or path.stem == "__main__", f"{path.stem} imports cli"
                assert target not in CLI_PARTS or path.stem in CLI_PARTS | {"cli"}, (
                    f"{path.stem} imports {target}: only the command line may")
