"""What acts on a whole study: its best trial's configuration, retraining it over seeds,
and ``run_study``, which creates a study and works it to its budget from Python.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.trial import FrozenTrial

from klayer.core.config import TrainConfig, to_toml
from klayer.data.datasets import Data
from klayer.search.pool import run_workers
from klayer.search.pruning import pruner_settings
from klayer.search.space import SearchError, Space, child_space, config_for, normalize_space
from klayer.search.storage import (
    StudyInfo,
    check_data,
    create_study,
    load_study,
    resolve_storage,
    retrain_seeds,
    seed_of,
    top_trials,
)
from klayer.search.worker import WorkerOptions
from klayer.training import runfolder
from klayer.training import trainer as train
from klayer.training.checkpoint import FORMAT as CHECKPOINT_FORMAT
from klayer.training.checkpoint import CheckpointError
from klayer.training.plan import load_data, make_plan


def best_config(study: optuna.Study, info: StudyInfo, cycles: float | None = None,
                data_dir: str | None = None) -> tuple[FrozenTrial, TrainConfig]:
    """The best trial and its ``trial_config``."""
    best = top_trials(study, 1)
    if not best:
        raise SearchError(f"study {info.name!r} has no COMPLETE trial yet")
    return best[0], trial_config(best[0], info, cycles, data_dir)


def trial_config(trial: FrozenTrial, info: StudyInfo, cycles: float | None = None,
                 data_dir: str | None = None) -> TrainConfig:
    """A trial's configuration (optionally trained for ``cycles`` cycles): its seed, and
    the mini-batch order it trained on (``order_seed``: a batched trial's is its batch's
    first trial's seed), so a retraining sees the same mini-batches."""
    seed = int(trial.user_attrs.get("seed", seed_of(trial, info.config.seed)))
    cfg = config_for(info.config, trial.params, seed)
    order = trial.user_attrs.get("order_seed")
    if isinstance(order, int) and order != cfg.shuffle_seed:  # a batched trial's mini-batches
        cfg = replace(cfg, order_seed=order)
    if data_dir is not None:
        cfg = replace(cfg, data_dir=data_dir)
    if cycles is not None:
        if cfg.schedule != "cyclic":
            raise SearchError(f"--cycles needs the cyclic schedule; the study uses "
                              f"{cfg.schedule} (give --epochs or --steps instead)")
        cfg = replace(cfg, cycles=cycles, epochs=None, steps=None)
    return cfg


def load_study_data(info: StudyInfo, data_dir: str | None = None) -> Data:
    """The study's data (loaded with its base configuration: synthetic data follow its seed)."""
    return load_data(info.config if data_dir is None else replace(info.config, data_dir=data_dir))


def retrain_best(study: optuna.Study, info: StudyInfo, cycles: float | None, out: Path,
                 data_dir: str | None = None,
                 callback: Callable[[str, dict[str, float]], None] | None = None,
                 data: Data | None = None, seeds: int = 1,
                 should_stop: Callable[[], int | None] | None = None,
                 warn: Callable[[str], None] | None = None,
                 ) -> tuple[FrozenTrial, list[train.Result]]:
    """Train the best trial's configuration again (for ``cycles`` cycles) into ``out``.

    With ``seeds`` > 1 it trains that many times (``retrain_seeds``) into ``out/seed-S``,
    as one test accuracy carries a few tenths of a point of seed noise. The data must be
    the study's. The results are recorded as the study attribute ``retrain``.

    Each retraining is a run folder as ``klayer train`` writes it, checkpoints included:
    ``should_stop`` (as in ``Trainer.run``) makes it checkpoint and raise ``Stopped``, and
    calling this again continues every run where it stopped. A folder that holds another
    run raises SearchError before anything trains; ``warn`` hears of skipped checkpoints.
    """
    best, cfg = best_config(study, info, cycles, data_dir)
    if data is None:
        data = load_study_data(info, data_dir)
    check_data(info, data)
    results = []
    for trainer in _retrainers(cfg, info.config, data, out, seeds, callback, warn):
        assert trainer.run_dir is not None
        runfolder.write_text(trainer.run_dir / "config.toml", to_toml(trainer.cfg.to_dict()))
        result = trainer.run(should_stop)
        runfolder.save_run(result, trainer.run_dir)
        results.append(result)
    acc = {k: [r.summary[k] for r in results]
           for k in ("train_accuracy", "val_accuracy", "test_accuracy")}
    study.set_user_attr("retrain", {
        "trial": best.number, "cycles": cycles, "seeds": [r.config.seed for r in results],
        "out": str(out), **{k: float(np.mean(v)) for k, v in acc.items()},
        "test_accuracies": acc["test_accuracy"],
        "test_std": float(np.std(acc["test_accuracy"], ddof=1)) if seeds > 1 else 0.0})
    return best, results


def _retrainers(cfg: TrainConfig, base: TrainConfig, data: Data, out: Path, seeds: int,
                callback: Callable[[str, dict[str, float]], None] | None,
                warn: Callable[[str], None] | None) -> list[train.Trainer]:
    """One Trainer per retraining seed, each restored from the checkpoints its folder
    holds (if any): every folder is checked before anything trains."""
    trainers = []
    for i, seed in enumerate(retrain_seeds(cfg.seed, seeds)):
        run = cfg if i == 0 else replace(cfg, seed=seed, order_seed=base.order_seed)
        folder = out if seeds == 1 else out / f"seed-{seed}"
        trainer = train.Trainer(run, data, callback, run_dir=folder)
        try:
            found = trainer.resume(warn or (lambda message: None))
        except train.ResumeMismatch as e:
            raise SearchError(f"{folder} holds another run's checkpoints ({e}); choose "
                              "another --out") from None
        except CheckpointError as e:
            raise SearchError(f"{e}; move them away to train it from the start, or choose "
                              "another --out") from None
        left = [n for n in runfolder.FINISHED_FILES if (folder / n).exists()]
        if found is None and left:  # this klayer's retrainings keep their checkpoints
            raise SearchError(f"{folder} holds the {' and '.join(left)} of another run, "
                              f"without {CHECKPOINT_FORMAT} checkpoints (an earlier klayer's "
                              "retraining is not read); choose another --out")
        if found is not None and callback is not None:
            callback("resume", {"step": found[0], "steps": trainer.plan.total_steps,
                                "seed": seed})
        trainers.append(trainer)
    return trainers


def run_study(name: str, config: TrainConfig, space: dict[str, Any] | None = None,
              n_trials: int = 16, *, storage: str | None = None, runs_dir: str | Path = "runs",
              sampler: str = "random", parent: str | None = None, top_k: int = 5,
              margin: float = 0.25, jobs: int = 1, threads: int = 1, batch_trials: int = 1,
              pruner: str = "none", min_resource: int | None = None,
              reduction_factor: int | None = None, sampler_seed: int | None = None,
              data: Data | None = None, quiet: bool = True) -> tuple[optuna.Study, StudyInfo]:
    """``klayer search init`` (a child of ``parent`` if given; a study that exists already
    is joined as it is) then ``worker``, from Python: the study and its set-up. ``space``
    entries override the parent's; ``pruner`` and its settings are ``pruning``'s;
    ``sampler_seed`` seeds the (first) worker's sampler; ``data`` (used with jobs = 1)
    spares loading it again."""
    spec = resolve_storage(name, storage, runs_dir)
    if data is None:
        data = load_data(config)
    if not _exists(name, spec):
        raw: dict[str, Any] = {}
        parent_attr = None
        if parent is not None:
            raw, parent_attr = _from_parent(parent, resolve_storage(parent, storage, runs_dir),
                                            top_k, margin)
        raw.update(space or {})
        total = make_plan(config, len(data.train.y)).total_steps
        create_study(name, spec, config, data, normalize_space(raw, config), n_trials,
                     sampler, parent_attr, pruner=pruner_settings(
                         pruner, min_resource, reduction_factor, total))
    opts = WorkerOptions(study=name, storage=spec, batch_trials=batch_trials,
                         sampler_seed=sampler_seed, data_dir=config.data_dir, quiet=quiet,
                         poll=1.0)
    code = run_workers(opts, jobs=jobs, threads=threads, data=data if jobs <= 1 else None)
    if code:
        raise SearchError(f"the workers of study {name!r} stopped with exit code {code}")
    return load_study(name, spec)


def _exists(name: str, spec: str) -> bool:
    """Whether study ``name`` is in storage ``spec`` (a missing journal file: no)."""
    try:
        load_study(name, spec)
    except SearchError:
        return False
    return True


def _from_parent(parent: str, storage: str, top_k: int,
                 margin: float) -> tuple[Space, dict[str, Any]]:
    """Coarse to fine: the space narrowed to the parent's top trials, and the parent
    attribute that records where it came from."""
    p_study, p_info = load_study(parent, storage)
    top = top_trials(p_study, top_k)
    if not top:
        raise SearchError(f"parent study {parent!r} has no COMPLETE trial")
    attr = {"study": parent, "top_k": top_k, "margin": margin,
            "trials": [t.number for t in top], "best_value": top[0].value,
            "space": p_info.space}
    return child_space(p_info.space, top, margin), attr
