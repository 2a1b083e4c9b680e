"""Run an experiment's trainings over seeds, in parallel processes, quick or full; and
the pieces of its report section.

An experiment describes its trainings as ``RunSpec``s: a label and overrides of the
default configuration. ``Context.run`` expands them over the seeds, trains them in
``jobs`` spawned processes (each with cores // jobs BLAS threads, so the cores are not
oversubscribed) and returns one ``Outcome`` per (spec, seed). With ``keep_models`` each
worker also saves its network as ``OUT/models/<experiment>/<label>-seed<S>.npz``
(``klayer train``'s model format, for ``klayer evaluate``).
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import signal
import statistics
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from klayer.core.config import TrainConfig
from klayer.data.datasets import Data, Split
from klayer.data.files import ModelFileError
from klayer.experiments import jobcache
from klayer.experiments.jobcache import Outcome
from klayer.report.html import Figure, Section, Table
from klayer.report.plots import plot_spread, save_panels
from klayer.training import modelfile

# --quick: a slice of the data and short runs, so any experiment ends within ~2 minutes.
QUICK_SIZES = (4000, 1000, 2000)  # train, val, test
QUICK_OVERRIDES: dict[str, Any] = {"n_s": 40, "val_size": 1000, "evals_per_cycle": 4,
                                   "precise_examples": 2000, "checkpoint_every": 0}
ACCURACIES = ("test_accuracy", "val_accuracy", "train_accuracy")
BLAS_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
MODELS = "models"  # the report folder's subfolder for the kept networks (--keep-models)
# where a worker saves its trained network, and the metadata the file gets
ModelTarget = tuple[str, dict[str, Any]]


@dataclass(frozen=True)
class RunSpec:
    """One training of an experiment: overrides of the base configuration."""

    label: str
    overrides: dict[str, Any]
    # an extra evaluation of the trained network (in the worker, so at module level)
    post: jobcache.PostEvaluation | None = None
    seeds: Sequence[int] | None = None  # default: Context.seed_range()


@dataclass
class Context:
    """Settings shared by all trainings of one ``klayer experiment`` call."""

    base: dict[str, Any]  # TOML-style keys: dataset, data_dir, ...
    seeds: int = 1
    jobs: int = 1
    quick: bool = False
    out: Path = Path(".")
    log: Callable[[str], None] = print
    keep: bool = False  # keep each finished training in OUT/trainings, read back on a re-run
    keep_models: bool = False  # save each trained network in OUT/models (--keep-models)
    experiment: str = ""  # the experiment running now: the models' subfolder
    pruner: str = "sha"  # the pruner of the experiments that search (lambda-search)
    identity: dict[str, Any] = field(default_factory=dict)  # jobcache.identity, for the keys
    # this run's kept trainings (read back, or written or being written: count those that
    # exist), and the model files it has named (path -> job key)
    kept: set[Path] = field(default_factory=set, repr=False)
    _model_owners: dict[Path, str] = field(default_factory=dict, repr=False)
    _workers: Workers | None = field(default=None, repr=False)

    def config(self, overrides: dict[str, Any], seed: int) -> dict[str, Any]:
        values = {**self.base, **(QUICK_OVERRIDES if self.quick else {}), **overrides}
        values["seed"] = seed
        TrainConfig.from_dict(values)  # validate now, in the parent, with the key named
        return values

    def length(self, full: dict[str, Any], quick: dict[str, Any]) -> dict[str, Any]:
        """Training-length overrides for full and for quick runs."""
        return quick if self.quick else full

    def seed_range(self, n: int | None = None) -> range:
        """``n`` seeds (default ``seeds``) from the base seed up: --seed S --seeds N gives
        S .. S + N - 1."""
        first = int(self.base.get("seed", 0))
        return range(first, first + (self.seeds if n is None else n))

    def run(self, specs: Sequence[RunSpec]) -> list[Outcome]:
        """Train every spec with each of its seeds; the outcomes in spec order."""
        return self.map_jobs([(s.label, self.config(s.overrides, seed), s.post, self.quick)
                              for s in specs for seed in (s.seeds or self.seed_range())])

    def map_jobs(self, jobs: Sequence[jobcache.Job]) -> list[Outcome]:
        """Run (label, config values, post, quick) jobs, in parallel when jobs > 1.

        With ``keep``, each finished training is kept in OUT/trainings (``jobcache``) as
        soon as it ends, and one kept there by an earlier run is read back instead of
        trained again. With ``keep_models`` the workers save the trained networks.
        """
        start = time.perf_counter()
        folder = self.out / jobcache.FOLDER
        outcomes = self._read_back(jobs, folder)
        todo = [i for i in range(len(jobs)) if i not in outcomes]
        if self.jobs == 1 or len(todo) <= 1:
            done = ((i, _job(jobs[i], self._model_target(jobs[i]))) for i in todo)
        else:
            futures = {self._executor().submit(_job, jobs[i], self._model_target(jobs[i])): i
                       for i in todo}
            done = ((futures[f], f.result()) for f in as_completed(futures))  # as they end
        for i, outcome in done:
            if self.keep:  # noted first: a stop during the write counts it if it landed
                self.kept.add(jobcache.path_for(folder, jobs[i], self.identity))
                jobcache.save(folder, jobs[i], self.identity, outcome)
            outcomes[i] = outcome
            self._progress(outcome, len(outcomes), len(jobs))
        read = f" ({len(jobs) - len(todo)} read back)" if len(todo) < len(jobs) else ""
        self.log(f"  {len(jobs)} training(s) in {time.perf_counter() - start:.0f} s{read}")
        return [outcomes[i] for i in range(len(jobs))]

    def _read_back(self, jobs: Sequence[jobcache.Job], folder: Path) -> dict[int, Outcome]:
        """The jobs' trainings kept in ``folder`` by an earlier run (with ``keep``), by
        index; one without the model ``keep_models`` wants is left out (trained again)."""
        outcomes: dict[int, Outcome] = {}
        for i, j in enumerate(jobs if self.keep else ()):
            kept = jobcache.load(folder, j, self.identity,
                                 lambda m: self.log(f"  warning: {m}"))
            if kept is not None and not self._has_model(j, kept):
                self.log(f"  {kept.label}, seed {kept.seed}: kept without its model (no "
                         "--keep-models before, or the file changed); training it again")
            elif kept is not None:
                outcomes[i] = kept
                self.kept.add(jobcache.path_for(folder, j, self.identity))
                self._progress(kept, len(outcomes), len(jobs), "read back: trained before")
        return outcomes

    def _model_target(self, job: jobcache.Job) -> ModelTarget | None:
        """With ``keep_models``: where the job's network goes, OUT/models/<experiment>/
        <label>-seed<S>.npz (its key appended if another job of this run has that name),
        and the metadata that ties the file to the job."""
        if not self.keep_models:
            return None
        key = jobcache.key(job, self.identity)
        folder = self.out / MODELS / self.experiment
        path = folder / f"{jobcache.stem(job)}.npz"
        if self._model_owners.setdefault(path, key) != key:
            path = folder / f"{jobcache.stem(job)}-{key}.npz"
        config = json.loads(json.dumps(job[1], default=str))  # its settings, as JSON
        return str(path), {"label": job[0], "experiment": self.experiment, "training": key,
                           "config": config}

    def _has_model(self, job: jobcache.Job, outcome: Outcome) -> bool:
        """Whether a training read back has all ``keep_models`` asks for: its own model
        file, readable (a diverged training has none)."""
        target = self._model_target(job)
        if target is None or "diverged" in outcome.summary:
            return True
        try:
            meta = modelfile.load(target[0])[1]
        except (ModelFileError, OSError):
            return False
        return bool(meta.get("training") == target[1]["training"])

    def _progress(self, o: Outcome, k: int, n: int, note: str = "") -> None:
        if n > 1:
            note = note or f"{o.summary.get('wall_seconds', float('nan')):.0f} s"
            self.log(f"  [{k}/{n}] {o.label}, seed {o.seed}: test "
                     f"{fmt_pct([o.summary.get('test_accuracy', float('nan'))])} ({note})")

    def _executor(self) -> ProcessPoolExecutor:
        self._workers = self._workers or Workers(self.jobs)
        return self._workers.pool

    def close(self, abort: bool = False) -> None:
        """Shut the worker processes down: after their work, or (``abort``, on a stop)
        at once, the queued trainings dropped and the running ones killed."""
        workers, self._workers = self._workers, None
        if workers is not None:
            workers.close(abort)


class Workers:
    """A pool of ``n`` spawned processes that ignore Ctrl-C (the parent's to handle), each
    with cores // n BLAS threads."""

    def __init__(self, n: int) -> None:
        # Spawned workers read the BLAS variables when they import NumPy, and the pool
        # starts them on demand, so the variables stay set until close(); NumPy in this
        # process was loaded before and keeps its threads.
        self.saved_env = {v: os.environ.get(v) for v in BLAS_VARS}
        os.environ.update(dict.fromkeys(BLAS_VARS, str(max(1, (os.cpu_count() or 1) // n))))
        self.others = set(multiprocessing.active_children())  # not the pool's
        self.pool = ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("spawn"),
                                        initializer=signal.signal,
                                        initargs=(signal.SIGINT, signal.SIG_IGN))

    def close(self, abort: bool) -> None:
        try:
            if abort:
                self.stop()
            self.pool.shutdown()
        except BaseException:  # interrupted while waiting: stop them all the same
            self.stop()
            raise
        finally:
            for v, old in self.saved_env.items():
                if old is None:
                    os.environ.pop(v, None)
                else:
                    os.environ[v] = old

    def stop(self) -> None:
        """Drop the queued trainings and end the processes (SIGTERM, then SIGKILL)."""
        self.pool.shutdown(wait=False, cancel_futures=True)
        workers = [w for w in multiprocessing.active_children() if w not in self.others]
        for w in workers:
            w.terminate()
        for w in workers:
            w.join(5)
            if w.is_alive():  # SIGTERM not honoured in time
                w.kill()
                w.join(5)


# --- the worker side ---------------------------------------------------------------------

_DATA_CACHE: dict[tuple[Any, ...], Data] = {}


def load_data_for(cfg: TrainConfig, quick: bool) -> Data:
    """The dataset of ``cfg`` (cached per process); for quick runs the first QUICK_SIZES
    rows of each split, standardized with the slice's statistics."""
    key = (cfg.dataset, cfg.data_dir, cfg.split, cfg.val_size, cfg.n_train, cfg.strict_checksums,
           cfg.seed if cfg.dataset != "cifar10" else 0, quick)
    if key not in _DATA_CACHE:
        from klayer.training.plan import load_data

        data = load_data(cfg)
        if quick:
            train, val, test = (Split(np.asarray(s.X[:n]), np.asarray(s.y[:n])) for s, n in
                                zip((data.train, data.val, data.test), QUICK_SIZES, strict=True))
            data = Data(train, val, test, data.num_classes, data.name, data.image_shape,
                        classes=data.classes)
        _DATA_CACHE[key] = data
    return _DATA_CACHE[key]


def _job(job: jobcache.Job, model: ModelTarget | None = None) -> Outcome:
    """Train one job (in a worker process); save its network to ``model``'s path when
    given (a diverged one has none), then run its post-evaluation."""
    label, values, post, quick = job
    import warnings

    from klayer.data.fetch import ChecksumWarning
    from klayer.training.trainer import Diverged, Trainer

    warnings.simplefilter("ignore", ChecksumWarning)  # the parent process warned already
    cfg = TrainConfig.from_dict(values)
    data = load_data_for(cfg, quick)
    trainer, start = Trainer(cfg, data), time.perf_counter()
    try:
        result = trainer.run()
    except Diverged as e:  # a result too: e.g. no BN at a large eta (the eta study)
        summary = {"diverged": str(e), "wall_seconds": time.perf_counter() - start,
                   **dict.fromkeys(ACCURACIES, float("nan"))}
        if model is not None:  # no model, nor an earlier run's under its name
            Path(model[0]).unlink(missing_ok=True)
        return Outcome(label, cfg.seed, values, summary, trainer.rows)
    if model is not None:
        _save_model(result, Path(model[0]), model[1])
    extra = post(result) if post else {}
    return Outcome(label, cfg.seed, values, result.summary, result.rows, extra)


def _save_model(result: Any, path: Path, meta: dict[str, Any]) -> None:
    """Save the trained network as ``klayer train`` does (metadata and the input
    standardization), atomically; OutputError naming the file if it cannot be."""
    from klayer.training.runfolder import OutputError, cannot_write

    data = result.data
    meta = {**meta, "dataset": data.name, "seed": result.config.seed,
            "image_shape": list(data.image_shape) if data.image_shape else None}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        modelfile.save(result.net, path, metadata=meta,
                       extras=data.transform_arrays())
    except OSError as e:
        raise OutputError(cannot_write(path, e)) from None


# --- aggregation and report pieces -----------------------------------------------------------


def by_label(outcomes: Sequence[Outcome]) -> dict[str, list[Outcome]]:
    groups: dict[str, list[Outcome]] = {}
    for o in outcomes:
        groups.setdefault(o.label, []).append(o)
    return groups


def values(outcomes: Sequence[Outcome], key: str) -> list[float]:
    """A summary (or extra) value of each outcome."""
    return [float(o.extra[key] if key in o.extra else o.summary[key]) for o in outcomes]


def mean_std(xs: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def fmt_pct(xs: Sequence[float]) -> str:
    """'53.49 %' for one seed, '53.49 ± 0.21 %' for several; NaN marks a diverged run."""
    ok = [x for x in xs if math.isfinite(x)]
    if not ok:
        return "diverged"
    m, s = mean_std(ok)
    text = f"{100 * m:.2f} %" if len(ok) == 1 else f"{100 * m:.2f} ± {100 * s:.2f} %"
    return text if len(ok) == len(xs) else f"{text} ({len(xs) - len(ok)} diverged)"


def _show(v: Any) -> str:
    return ",".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)


def curves(ctx: Context, name: str, groups: dict[str, list[Outcome]],
           panels: Sequence[tuple[str, Sequence[str], str]]) -> Figure:
    """One figure: a panel per (title, labels, metric) with the training and validation
    curves, mean and spread over seeds."""
    def draw(labels: Sequence[str], metric: str) -> Callable[[Any], None]:
        return lambda ax: plot_spread(ax, [(lb, [o.rows for o in groups[lb]]) for lb in labels],
                                      metric, ("train", "val"))
    path = ctx.out / "figures" / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_panels(path, [(t, draw(lbs, m)) for t, lbs, m in panels])
    spread = " Shaded: min-max over seeds." if ctx.seeds > 1 else ""
    return Figure(f"{'; '.join(t for t, _, _ in panels)}. Dashed: training, solid: "
                  f"validation.{spread}", path)


def mean_of(groups: dict[str, list[Outcome]], label: str, key: str = "test_accuracy") -> float:
    return mean_std(values(groups[label], key))[0]


def finish(key: str, specs: Sequence[RunSpec], groups: dict[str, list[Outcome]],
           tables: list[Table] | None = None, **parts: Any) -> Section:
    """A report section with the table of what was trained behind it (overrides of the
    defaults, seeds and wall time per configuration); ``tables`` by default the final
    accuracies."""
    if tables is None:
        tables = [Table("Final accuracy", ["configuration", "test", "validation", "training"],
                        [[lb, *(fmt_pct(values(os, k)) for k in ACCURACIES)]
                         for lb, os in groups.items()])]
    rows = [[s.label, ", ".join(f"{k}={_show(v)}" for k, v in s.overrides.items())
             or "(defaults)", ",".join(str(o.seed) for o in groups[s.label]),
             f"{mean_of(groups, s.label, 'wall_seconds'):.1f} s"] for s in specs]
    runs = Table("Trainings (overrides of the default configuration)",
                 ["configuration", "overrides", "seeds", "wall time / run"], rows)
    return Section(key, tables=tables, runs=runs, **parts)
