"""`klayer experiment NAME --quick` for every experiment, and the report it writes."""

from __future__ import annotations

import itertools
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest_data_helpers import make_cifar_folder

from klayer.cli import main
from klayer.experiments import ASSIGNMENT, EXPERIMENTS


def run(tmp_path: Path, *args: str) -> Path:
    out = tmp_path / "report"
    assert main(["experiment", *args, "--quick", "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize("name", list(EXPERIMENTS))
def test_each_experiment_quick(tmp_path: Path, name: str) -> None:
    out = run(tmp_path, name, "--dataset", "synthetic")
    md = (out / "report.md").read_text()
    html = (out / "report.html").read_text()
    title = EXPERIMENTS[name][0]
    assert f"## {title}" in md and "This is a quick run" in md
    assert "quick run" in html and "<script" not in html and "http" not in html.split("<body>")[1]
    for link in re.findall(r"\]\((figures/[^)]+\.png)\)", md):
        assert (out / link).stat().st_size > 1000
    assert md.count("data:image") == 0 and html.count("data:image/png;base64,") == md.count("![")
    assert (out / "results.json").is_file()


def test_bn_stats_on_images_reports_the_2x2x2_table(tmp_path: Path) -> None:
    make_cifar_folder(tmp_path / "cifar" / "cifar-10-batches-py", rows=400)
    out = run(tmp_path, "bn-stats", "--data-dir", str(tmp_path / "cifar"))
    md = (out / "report.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith(("| moving", "| PreciseBN"))
            and "%" in line]
    assert len(rows) == 4 and all(line.count("%") == 2 for line in rows)
    assert sum("adaptive" in line for line in rows) == 2


def test_seeds_give_mean_and_std(tmp_path: Path) -> None:
    out = run(tmp_path, "bn-placement", "--dataset", "synthetic", "--seeds", "2", "--jobs", "2")
    md = (out / "report.md").read_text()
    assert "±" in md and "| 0,1 |" in md


def test_all_has_the_summary_in_report_order(tmp_path: Path) -> None:
    out = tmp_path / "all"
    r = subprocess.run([sys.executable, "-m", "klayer", "experiment", "all", "--dataset",
                        "synthetic", "--quick", "--jobs", "2", "--out", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    md = (out / "report.md").read_text()
    order = [md.index(f"## {t}") for t in ["Summary: the report items",
                                           *(EXPERIMENTS[k][0] for k in ASSIGNMENT)]]
    assert order == sorted(order)
    assert f"## {EXPERIMENTS['best'][0]}" not in md  # best is long: not part of all
    for item in ("i. How were the gradients checked?", "ii. 3- and 9-layer", "iii. Lambda search",
                 "iv. Sensitivity to initialization"):
        assert item in md


def test_usage_errors(tmp_path: Path) -> None:
    assert main(["experiment", "bn-depth", "--seeds", "0", "--out", str(tmp_path / "x")]) == 2
    assert main(["experiment", "bn-depth", "--data-dir", str(tmp_path / "none"), "--quick",
                 "--out", str(tmp_path / "y")]) == 4
    assert not (tmp_path / "y").exists()  # refused before its folder was made


def test_the_gradient_check_needs_no_data(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    assert main(["experiment", "gradcheck", "--data-dir", str(tmp_path / "empty"), "--quick",
                 "--out", str(tmp_path / "rep")]) == 0
    assert (tmp_path / "rep" / "report.md").is_file()


def test_a_diverged_training_is_a_result_not_a_crash() -> None:
    from klayer.runner import Context, RunSpec, fmt_pct, values

    ctx = Context({"dataset": "synthetic"}, quick=True)
    spec = RunSpec("huge eta", {"hidden": [20], "schedule": "constant", "eta": 1e6})
    [outcome] = ctx.run([spec])
    assert "smaller eta" in outcome.summary["diverged"]
    assert fmt_pct(values([outcome], "test_accuracy")) == "diverged"
    assert fmt_pct([0.5, float("nan")]) == "50.00 % (1 diverged)"


def test_the_cli_knows_every_experiment_without_importing_them() -> None:
    from klayer.cli_experiment import EXPERIMENT_NAMES

    assert EXPERIMENT_NAMES == tuple(EXPERIMENTS)
    r = subprocess.run([sys.executable, "-c", "import sys, klayer.cli; klayer.cli.build_parser();"
                        "print('matplotlib' in sys.modules)"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr


def test_the_best_recipe_is_valid_and_its_ablation_ends_at_it() -> None:
    from klayer.best import ALWAYS, BASELINE, ablation_specs, load_recipe
    from klayer.config import TrainConfig

    recipe = load_recipe()
    TrainConfig.from_dict(recipe)  # every key a valid training setting
    specs = ablation_specs(recipe)
    assert specs[0].label == BASELINE and specs[0].overrides == {}
    assert specs[-1].overrides == {k: v for k, v in recipe.items() if k not in ALWAYS}
    assert all(a.overrides.items() < b.overrides.items() for a, b in itertools.pairwise(specs))
    without = ablation_specs({k: v for k, v in recipe.items() if k != "label_smoothing"})
    assert len(without) == len(specs) - 1  # a left-out ingredient gets no row
    with pytest.raises(ValueError, match="no ingredient"):
        ablation_specs({**recipe, "skip": True})


def test_every_parallel_worker_gets_its_share_of_blas_threads(monkeypatch: pytest.MonkeyPatch,
                                                              tmp_path: Path) -> None:
    # The pool starts workers on demand: the second one starts while the first is busy,
    # and must still see the thread limit (else 2 jobs x all cores oversubscribe).
    import os
    import time

    from klayer.runner import BLAS_VARS, Context

    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    for v in BLAS_VARS:
        monkeypatch.delenv(v, raising=False)
    ctx = Context(base={}, jobs=2, out=tmp_path)
    pool = ctx._executor()
    busy = pool.submit(time.sleep, 1.0)
    second = pool.submit(os.getenv, "OPENBLAS_NUM_THREADS")
    assert second.result(timeout=60) == "2"
    busy.result(timeout=60)
    ctx.close()
    assert all(v not in os.environ for v in BLAS_VARS)  # restored after the pool
