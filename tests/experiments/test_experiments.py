"""`klayer experiment NAME --quick` for every experiment, and the report it writes."""

from __future__ import annotations

import itertools
import math
import re
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
from conftest_data_helpers import make_cifar_folder

from klayer.cli.main import main
from klayer.experiments.registry import ASSIGNMENT, EXPERIMENTS
from klayer.experiments.runner import RunSpec


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
    tables = re.findall(r"\]\((tables/[^)]+)\.csv\) or \[LaTeX\]\(\1\.tex\)", md)
    assert len(tables) == md.count("\n|---|") > 0  # every table, as CSV and as LaTeX
    assert all((out / f"{t}.csv").is_file() and (out / f"{t}.tex").is_file() for t in tables)
    assert not (out / "models").exists()  # only with --keep-models


def test_bn_stats_on_images_reports_the_2x2x2_table(tmp_path: Path) -> None:
    make_cifar_folder(tmp_path / "cifar" / "cifar-10-batches-py", rows=400)
    out = run(tmp_path, "bn-stats", "--data-dir", str(tmp_path / "cifar"))
    md = (out / "report.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith(("| moving", "| PreciseBN"))
            and "%" in line]
    assert len(rows) == 4 and all(line.count("%") == 2 for line in rows)
    assert sum("adaptive" in line for line in rows) == 2
    figure = out / "figures" / "bn-stats.png"  # running vs precise, accuracy per setting
    assert figure.stat().st_size > 10_000 and "figures/bn-stats.png" in md
    assert "test accuracy with the statistics from training" in md


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


def test_a_diverged_training_is_a_result_not_a_crash(tmp_path: Path) -> None:
    from klayer.experiments.runner import Context, RunSpec, fmt_pct, values

    ctx = Context({"dataset": "synthetic"}, quick=True, out=tmp_path, keep_models=True)
    stale = tmp_path / "models" / "huge-eta-seed0.npz"  # an earlier run's model of that name
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"x")
    spec = RunSpec("huge eta", {"hidden": [20], "schedule": "constant", "eta": 1e6})
    [outcome] = ctx.run([spec])
    assert "smaller eta" in outcome.summary["diverged"]
    assert not stale.exists()  # a diverged training has no model
    assert fmt_pct(values([outcome], "test_accuracy")) == "diverged"
    assert fmt_pct([0.5, float("nan")]) == "50.00 % (1 diverged)"


def test_the_cli_knows_every_experiment_without_importing_them() -> None:
    from klayer.cli.experiment import EXPERIMENT_NAMES

    assert EXPERIMENT_NAMES == tuple(EXPERIMENTS)
    r = subprocess.run([sys.executable, "-c", "import sys, klayer.cli.main; "
                        "klayer.cli.main.build_parser();"
                        "print('matplotlib' in sys.modules)"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr


def test_rows_of_test_time_views_evaluate_the_row_above_as_retraining_would(
        tmp_path: Path) -> None:
    """The view rows (test-time flips, crops) train nothing: each takes the nearest
    training above it, and its post-evaluation gives exactly the test accuracy that
    training again with the views gives."""
    from klayer.core.config import TrainConfig
    from klayer.data.datasets import load_cifar10
    from klayer.experiments.best import (
        _view_key,
        ablation_specs,
        load_recipe,
        view_accuracies,
        view_sources,
        views_of,
    )
    from klayer.experiments.jobcache import post_name
    from klayer.training.trainer import Trainer

    specs = ablation_specs(load_recipe())
    sources = view_sources(specs)
    labels = [s.label for s in specs]
    assert sorted(sources) == ["+ test-time crops", "+ test-time flip averaging"]
    for view, source in sources.items():
        assert labels.index(source) == labels.index(view) - 1  # the row right above
    a, b, c = (RunSpec(x, o) for x, o in (("a", {"flip": True}),
                                           ("b", {"flip": True, "tta_flip": True}),
                                           ("c", {"flip": True, "tta_flip": True,
                                                  "tta_shift": 1})))
    assert view_sources([a, b, c]) == {"b": "a", "c": "a"}  # two view rows in a row

    make_cifar_folder(tmp_path / "cifar", rows=60)
    data = load_cifar10(tmp_path / "cifar", val_size=60)
    base = TrainConfig(hidden=(8,), n_batch=30, steps=12, flip=True, lam=0.001)
    wanted = tuple(views_of(s) for s in specs if s.label in sources)
    got = view_accuracies(Trainer(base, data).run(), wanted)
    for flips, crops in wanted:
        again = Trainer(TrainConfig(**{**base.__dict__, "tta_flip": flips,
                                       "tta_shift": crops}), data).run()
        assert got[_view_key((flips, crops))] == again.summary["test_accuracy"]
    # a source that diverged has no network: its view row is diverged too, not an error
    from klayer.experiments.best import _as_view_row
    from klayer.experiments.jobcache import Outcome

    dead = Outcome("a", 0, {}, {"diverged": "the cost became nan", "test_accuracy": math.nan},
                   [])
    row = _as_view_row(dead, c)
    assert row.label == "c" and math.isnan(row.summary["test_accuracy"])
    # the views are part of the post-evaluation's name, so of a kept training's key
    names = {post_name(partial(view_accuracies, views=v)) for v in (wanted, wanted[:1])}
    assert len(names) == 2


def test_the_best_recipe_is_valid_and_its_ablation_ends_at_it() -> None:
    from klayer.core.config import TrainConfig
    from klayer.experiments.best import ALWAYS, BASELINE, ablation_specs, load_recipe

    recipe = load_recipe()
    TrainConfig.from_dict(recipe)  # every key a valid training setting
    specs = ablation_specs(recipe)
    assert specs[0].label == BASELINE and specs[0].overrides == {}
    assert specs[-1].overrides == {k: v for k, v in recipe.items() if k not in ALWAYS}
    assert specs[-1].label.endswith("(the recipe)")
    for a, b in itertools.pairwise(specs):  # each row keeps every key and adds or changes some
        assert set(a.overrides) <= set(b.overrides) and a.overrides != b.overrides
    without = ablation_specs({k: v for k, v in recipe.items() if k != "label_smoothing"})
    assert len(without) == len(specs) - 1  # a left-out ingredient gets no row
    # a longer recipe trains its schedule row at the staged length, then a row of its own
    longer = ablation_specs({**recipe, "epochs": 100})
    staged = [s for s in longer if "epochs" in s.overrides]
    assert staged[0].overrides["epochs"] == 40 and staged[-1].overrides["epochs"] == 100
    assert len(longer) == len(ablation_specs({**recipe, "epochs": 40})) + 1
    with pytest.raises(ValueError, match="no ingredient"):
        ablation_specs({**recipe, "skip": True})


def test_every_parallel_worker_gets_its_share_of_blas_threads(monkeypatch: pytest.MonkeyPatch,
                                                              tmp_path: Path) -> None:
    # The pool starts workers on demand: the second one starts while the first is busy,
    # and must still see the thread limit (else 2 jobs x all cores oversubscribe).
    import os
    import time

    from klayer.experiments.runner import BLAS_VARS, Context

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


# --- issue 20: init-sensitivity's curves, --keep-models, tables as CSV and LaTeX ------------


def _fake_outcomes(specs: list, seeds: object = None) -> list:
    """One made-up training per spec (3 evaluations), instead of training."""
    from klayer.experiments.jobcache import Outcome

    rows = [{"step": float(s), **{f"{split}_{m}": 0.5 for split in ("train", "val")
                                  for m in ("loss", "cost", "accuracy")}} for s in range(3)]
    summary = {"test_accuracy": 0.5, "val_accuracy": 0.5, "train_accuracy": 0.5,
               "wall_seconds": 1.0}
    return [Outcome(s.label, 0, {}, summary, rows) for s in specs]


def test_init_sensitivity_draws_validation_curves_at_3_and_9_layers(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import matplotlib.pyplot as plt

    from klayer.experiments import runner
    from klayer.experiments.registry import INITS, NINE, init_sensitivity

    drawn: dict[str, list[list[tuple[str, str]]]] = {}  # figure -> per panel (label, style)

    def save_panels(path: Path, panels: list, **kw: object) -> Path:
        for _, draw in panels:
            fig, ax = plt.subplots()
            draw(ax)
            drawn.setdefault(path.stem, []).append(
                [(str(line.get_label()), str(line.get_linestyle())) for line in ax.get_lines()])
            plt.close(fig)
        return path

    monkeypatch.setattr(runner, "save_panels", save_panels)
    ctx = runner.Context({"dataset": "synthetic"}, quick=True, out=tmp_path)
    specs: list = []
    monkeypatch.setattr(ctx, "run", lambda s, seeds=None: specs.extend(s) or _fake_outcomes(s))
    section = init_sensitivity(ctx)
    for hidden in ([50, 50], list(NINE)):  # He and each sigma, with and without BN
        runs = [s.overrides for s in specs if s.overrides.get("hidden") == hidden]
        assert sorted((o["batch_norm"], o["init"], o.get("init_sigma", 0)) for o in runs) == \
            sorted((bn, o["init"], o.get("init_sigma", 0)) for bn in (True, False)
                   for _, o in INITS)
    assert len(section.figures) == len(drawn) == 2
    for fig in section.figures:  # the caption's promise, kept in every panel
        assert "solid: validation" in fig.caption and "Dashed: training" in fig.caption
        for lines in drawn[fig.path.stem]:
            assert sum(style == "-" and "(val)" in label for label, style in lines) == 4
            assert sum(style == "--" and "(train)" in label for label, style in lines) == 4
    assert [r[0] for r in section.tables[0].rows] == ["3-layer"] * 4 + ["9-layer"] * 4
    assert {"bn9_1e-4", "nobn9_1e-4", "bn_1e-4", "nobn_1e-4"} <= set(section.facts)


def test_keep_models_saves_loadable_nets_and_reads_them_back_only_with_them(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from klayer.training import modelfile

    args = ["experiment", "bn-placement", "--dataset", "synthetic", "--quick",
            "--out", str(tmp_path / "r")]
    assert main([*args, "--keep-models"]) == 0
    models = tmp_path / "r" / "models" / "bn-placement"
    files = sorted(models.glob("*.npz"))
    assert [p.name for p in files] == sorted(f"{d}-layer-BN-{pos}-ReLU-seed0.npz"
                                             for d in (3, 9) for pos in ("before", "after"))
    for p in files:
        net, meta, extras = modelfile.load(p)
        assert meta["experiment"] == "bn-placement" and meta["seed"] == 0
        assert meta["config"]["bn_position"] in p.name and {"mean", "std"} <= set(extras)
    assert main(["evaluate", str(files[0]), "--out", str(tmp_path / "ev")]) == 0
    # read back on a re-run, except a training whose model is gone or is another's
    files[0].unlink()
    files[1].write_bytes(files[2].read_bytes())
    capsys.readouterr()
    assert main([*args, "--keep-models"]) == 0
    log = capsys.readouterr().out
    assert log.count("kept without its model") == 2 and "(2 read back)" in log
    assert all(modelfile.load(p)[1]["label"].replace(", ", "-").replace(" ", "-")
               in p.name for p in files)
    assert main([*args]) == 0 and "(4 read back)" in capsys.readouterr().out


def test_every_table_is_also_csv_and_latex(tmp_path: Path) -> None:
    import csv

    from klayer.report.html import Report, Section, Table, to_markdown, write_tables

    odd = Table("100% & more", ["name_x", "acc #"],
                [["a_b", "53.49 ± 0.21 %"], ["c & d", "$5 {x} ~^\\"], ["σ = 1e-4", "λ, η"]])
    runs = Table("Trainings", ["configuration"], [["x|y"]])
    report = Report("t", [Section("sec", tables=[odd], runs=runs)], False, "cmd", 1, "now")
    written = write_tables(report, tmp_path)
    assert [p.name for p in written] == ["sec-100-more.csv", "sec-100-more.tex",
                                         "sec-trainings.csv", "sec-trainings.tex"]
    for table, (csv_path, tex_path) in ((odd, written[:2]), (runs, written[2:])):
        with open(csv_path, newline="") as f:
            assert list(csv.reader(f)) == [table.header, *table.rows]
        tex = tex_path.read_text()
        assert tex.count("\\\\\n") == 1 + len(table.rows)
        assert "\\toprule" in tex and "\\midrule" in tex and "\\bottomrule" in tex
    tex = written[1].read_text()
    for escaped in (r"name\_x & acc \#", r"a\_b & 53.49 $\pm$ 0.21 \%", r"c \& d",
                    r"\$5 \{x\} \textasciitilde{}\textasciicircum{}\textbackslash{}",
                    r"$\sigma$ = 1e-4 & $\lambda$, $\eta$"):
        assert escaped in tex
    md = to_markdown(report, tmp_path)
    assert "(tables/sec-100-more.csv)" in md and "(tables/sec-trainings.tex)" in md


def test_a_failed_table_write_leaves_no_part_of_a_file(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import errno
    import os

    from klayer.report.html import Report, Section, Table, write_tables
    from klayer.training.runfolder import OutputError

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    report = Report("t", [Section("sec", tables=[Table("T", ["a"], [["1"]])])], False, "c", 1,
                    "now")
    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OutputError, match="sec-t.csv"):
        write_tables(report, tmp_path)
    assert list((tmp_path / "tables").iterdir()) == []
