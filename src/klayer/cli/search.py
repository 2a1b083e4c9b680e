"""``klayer search``: studies on Optuna (init, worker, status, reap, delete, best)."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from contextlib import ExitStack, closing
from pathlib import Path
from typing import TYPE_CHECKING, Any

from klayer.cli import common
from klayer.cli.common import EXIT_OK, Command, UsageError, read_toml
from klayer.core.config import TrainConfig
from klayer.training.stop import Stopped, StopSignals

if TYPE_CHECKING:
    import optuna

    from klayer.search.storage import StudyInfo


def _study_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--study", required=True, help="the study's name")
    p.add_argument("--storage", metavar="URL|FILE",
                   help="a postgresql+psycopg://user:password@host/db URL (many machines) or a "
                   "journal file (default $KLAYER_STORAGE, else RUNS/search/STUDY/journal.log)")
    p.add_argument("--runs-dir", default="runs", metavar="RUNS",
                   help="folder of run folders (default runs)")


def _show_test_flag(p: argparse.ArgumentParser, what: str) -> None:
    """--show-test: test accuracies stay hidden during a search unless asked for, since
    seeing them invites choosing hyperparameters on the test set."""
    p.add_argument("--show-test", action="store_true", help=f"{what}; by default only "
                   "validation accuracies are shown, so that nothing is chosen on the test set")


def add_search_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="search_command", metavar="ACTION", required=True)
    for add, name, run, help_text, description in _ACTIONS:
        q = sub.add_parser(name, help=help_text, description=description)
        _study_flags(q)
        add(q)
        q.set_defaults(search_run=run)


def _add_init(q: argparse.ArgumentParser) -> None:
    q.add_argument("--space", metavar="SPACE.toml",
                   help="search space: one table per key, e.g. [lambda] low = 1e-5 "
                   "high = 1e-1 log = true; or choices = [...]")
    q.add_argument("--param", action="append", default=[], metavar="KEY=SPEC",
                   help="a search-space entry: KEY=LOW..HIGH[:log][:step=S][:points=N] or "
                   "KEY=A|B|C (repeatable; overrides --space)")
    q.add_argument("--trials", type=int, help="trials (COMPLETE or PRUNED) the workers stop "
                   "at (default 16; a grid study runs each of its points once instead)")
    q.add_argument("--sampler", choices=("random", "tpe", "grid"), default="random",
                   help="Optuna sampler (default random); grid: every point of the grid is "
                   "queued once and the workers stop when all have run")
    q.add_argument("--grid-points", type=int, default=5,
                   help="grid sampler: values per range without points (default 5)")
    q.add_argument("--pruner", choices=("none", "median", "sha", "hyperband"),
                   help="stop hopeless trials at an evaluation (default sha: successive "
                   "halving, ASHA); every worker prunes the same way")
    q.add_argument("--min-resource", type=int, metavar="STEPS",
                   help="pruner: training steps before a trial can be pruned (default: half "
                   "of the base training)")
    q.add_argument("--reduction-factor", type=int, metavar="R",
                   help="sha, hyperband: 1/R of the trials at a rung go on (default 4)")
    q.add_argument("--parent", metavar="STUDY",
                   help="coarse to fine: ranges from the top trials of this study")
    q.add_argument("--parent-storage", metavar="URL|FILE",
                   help="the parent's storage (default: --storage, else the parent's journal)")
    q.add_argument("--top-k", type=int, default=5, help="--parent: trials to take (default 5)")
    q.add_argument("--margin", type=float, default=0.25,
                   help="--parent: widen each range by this fraction of its span (default 0.25)")
    _fault_timing(q, "the study's, the same for every worker")
    common.add_config_flags(q)


def _fault_timing(p: argparse.ArgumentParser, whose: str) -> None:
    p.add_argument("--heartbeat-interval", type=int, help="PostgreSQL: seconds between "
                   f"heartbeats of a running trial ({whose}; 60 at init)")
    p.add_argument("--grace-period", type=int, help="PostgreSQL, and a journal's trials "
                   "without a worker label: seconds without a sign of life before a trial is "
                   f"failed and retried ({whose}; 300 at init)")


def _add_worker(w: argparse.ArgumentParser) -> None:
    w.add_argument("--jobs", type=int, default=1, help="worker processes (default 1)")
    w.add_argument("--threads", type=int, default=1,
                   help="BLAS threads per worker process (default 1)")
    w.add_argument("--batch-trials", type=int, default=1, metavar="T",
                   help="ask for T trials at once and train them together in one vectorized "
                   "pass (same architecture; lambda and learning rates differ)")
    w.add_argument("--sampler-seed", type=int, help="seed of this worker's sampler (default: "
                   "from host, pid and time; give every machine a different one)")
    _fault_timing(w, "must equal the study's, set by search init; default: the study's")
    w.add_argument("--poll", type=float, default=5.0,
                   help="seconds between looks at the study while others finish (default 5)")
    w.add_argument("--storage-timeout", type=float, default=600.0, metavar="SECONDS",
                   help="ride out a storage outage this long, retrying with backoff, then "
                   "exit 6 (default 600)")
    w.add_argument("--max-failures", type=int, default=10,
                   help="stop after this many failed trials in a row (default 10)")
    w.add_argument("--quiet", action="store_true", help="no line per trial")
    _show_test_flag(w, "print each trial's test accuracy too")
    common.add_config_flags(w)


def _add_status(s: argparse.ArgumentParser) -> None:
    s.add_argument("--stuck-after", metavar="DURATION", help="warn about trials RUNNING longer "
                   "than this (default 3x the median trial, at least 5m)")
    s.add_argument("--json", action="store_true", help="the trials as JSON")
    s.add_argument("--plot", metavar="FILE.png", help="also draw best-so-far validation "
                   "accuracy against wall time and against trials, pruned trials marked")
    _show_test_flag(s, "show the trials' test accuracies (and test losses in --json) too")


def _add_reap(r: argparse.ArgumentParser) -> None:
    r.add_argument("--older-than", required=True, metavar="DURATION",
                   help="trials RUNNING longer than this, e.g. 30m, 2h, 1d")
    r.add_argument("--no-retry", action="store_true", help="do not queue the reaped trials again")


def _add_delete(d: argparse.ArgumentParser) -> None:
    d.add_argument("--yes", action="store_true",
                   help="do not ask: delete at once (for scripts)")


def run_delete(args: argparse.Namespace) -> int:
    """Delete a study after the user types its name (or with --yes)."""
    from klayer.search import backend, storage

    where = _storage(args)
    if not args.yes:
        try:
            answer = input(f"delete study {args.study!r} and all its trials from "
                           f"{backend.masked(where)}? type its name to confirm: ")
        except EOFError:  # nothing to answer from: nothing is deleted
            answer = ""
        if answer.strip() != args.study:
            print("not deleted (type the study's name, or give --yes)")
            return EXIT_OK
    n = storage.delete_study(args.study, where)  # SearchError: exit 2, naming the study
    print(f"deleted study {args.study} ({n} trials); its run folders, if any, are kept")
    return EXIT_OK


def _add_best(b: argparse.ArgumentParser) -> None:
    b.add_argument("--retrain", action="store_true",
                   help="train the best configuration again and report its test accuracy")
    b.add_argument("--cycles", type=float, help="--retrain: cycles of the cyclic schedule")
    b.add_argument("--seeds", type=int, metavar="N",
                   help="--retrain: train N times (the trial's seed, then SeedSequence([seed, "
                   "i])) into OUT/seed-S and report the mean test accuracy (default 1)")
    b.add_argument("--data-dir", help="folder holding CIFAR-10 (or set $KLAYER_DATA_DIR)")
    b.add_argument("--out", metavar="DIR",
                   help="--retrain: run folder (default RUNS/search/STUDY/best-trial-N, with "
                   "-Ccycles appended when --cycles C is given)")
    b.add_argument("--quiet", action="store_true", help="no progress output")
    _show_test_flag(b, "show the best trial's test accuracy from the search too (--retrain "
                    "always reports the retraining's)")


def run_search(args: argparse.Namespace) -> int:
    from klayer.search.space import SearchError

    try:
        return int(args.search_run(args))
    except SearchError as e:
        raise UsageError(str(e)) from None


def _storage(args: argparse.Namespace) -> str:
    from klayer.search.storage import resolve_storage

    return resolve_storage(args.study, args.storage, args.runs_dir)


def explicit_values(args: argparse.Namespace) -> dict[str, Any]:
    """The training settings this command was given (--config file, then flags)."""
    return {**(read_toml(args.config) if args.config else {}), **common.flag_values(args)}


def run_init(args: argparse.Namespace) -> int:
    from klayer.search import pruning, space, status, storage
    from klayer.training import plan

    where = _storage(args)
    raw: dict[str, Any] = dict(read_toml(args.space, "--space")) if args.space else {}
    prune = {k: raw.pop(k) for k in pruning.KEYS if k in raw}  # the file's pruner keys
    prune.update({k: getattr(args, k) for k in pruning.KEYS if getattr(args, k) is not None})
    raw.update(space.parse_param(text) for text in args.param)
    parent, parent_fp = None, None
    if args.parent:
        raw, base, parent, parent_fp = _from_parent(args, raw)
    else:
        base = common.resolve_config(args)
    with common.as_usage():
        plan.validate(base)
    common.at_least(args, grid_points=2, heartbeat_interval=1, grace_period=1)
    searched = space.normalize_space(raw, base)
    if args.sampler == "grid":
        for spec in searched.values():
            if "choices" not in spec:
                spec.setdefault("points", args.grid_points)
    data = plan.load_data(base)
    pruner = pruning.pruner_settings(prune.get("pruner"), prune.get("min_resource"),
                                     prune.get("reduction_factor"),
                                     plan.make_plan(base, len(data.train.y)).total_steps)
    if parent_fp is not None and storage.data_fingerprint(data) != parent_fp:
        raise UsageError(f"--parent {args.parent} was searched on other data "
                         f"({parent_fp[:19]}...); use the same data set")
    trials = 16 if args.trials is None else args.trials
    timing = {k: v for k, v in (("heartbeat_interval", args.heartbeat_interval),
                                ("grace_period", args.grace_period)) if v is not None}
    info = storage.create_study(args.study, where, base, data, searched, trials, args.sampler,
                                parent, pruner=pruner, **timing)
    print(status.created_text(info, args.trials, args.top_k, args.parent,
                              storage_given=bool(args.storage)))
    return EXIT_OK


def _from_parent(args: argparse.Namespace, raw: dict[str, Any]) -> tuple[
        dict[str, Any], TrainConfig, dict[str, Any], str]:
    """--parent: the space narrowed to its top trials (``raw`` entries win), its base
    configuration with this command's settings, the parent attribute, its data fingerprint."""
    from klayer.search import backend, space, storage

    common.at_least(args, top_k=1)
    where = storage.resolve_storage(args.parent, args.parent_storage or args.storage,
                                    args.runs_dir)
    p_study, p_info = storage.load_study(args.parent, where)
    top = storage.top_trials(p_study, args.top_k)
    if not top:
        raise UsageError(f"--parent {args.parent}: no COMPLETE trial to narrow from")
    base = common.config_from({**p_info.config.to_dict(), **explicit_values(args)})
    parent = {"study": args.parent, "storage": backend.masked(where), "top_k": args.top_k,
              "margin": args.margin, "trials": [t.number for t in top],
              "best_value": top[0].value, "space": p_info.space}
    return ({**space.child_space(p_info.space, top, args.margin), **raw}, base, parent,
            p_info.fingerprint)


def run_worker(args: argparse.Namespace) -> int:
    from klayer.search import pool, worker

    common.at_least(args, jobs=1, threads=1, batch_trials=1, heartbeat_interval=1,
                    grace_period=1, max_failures=1)
    if args.sampler_seed is not None and not 0 <= args.sampler_seed < 2**32:
        raise UsageError(f"--sampler-seed must be in [0, 2^32), got {args.sampler_seed}")
    if not 0 < args.storage_timeout < 10**7:  # NaN fails too
        raise UsageError(f"--storage-timeout must be > 0 seconds, got {args.storage_timeout}")
    if not 0 < args.poll < 86400:  # NaN fails too
        raise UsageError(f"--poll must be a number of seconds in (0, 86400), got {args.poll}")
    overrides = explicit_values(args)
    opts = worker.WorkerOptions(
        study=args.study, storage=_storage(args), batch_trials=args.batch_trials,
        sampler_seed=args.sampler_seed, data_dir=overrides.pop("data_dir", None),
        overrides=overrides, heartbeat_interval=args.heartbeat_interval,
        grace_period=args.grace_period, poll=args.poll, max_failures=args.max_failures,
        storage_timeout=args.storage_timeout,
        quiet=args.quiet, show_test=args.show_test)
    return pool.run_workers(opts, jobs=args.jobs, threads=args.threads)


def run_status(args: argparse.Namespace) -> int:
    from klayer.search import status, storage

    if args.plot and Path(args.plot).suffix.lower() not in (".png", ".pdf", ".svg"):
        raise UsageError(f"--plot {args.plot}: give a .png, .pdf or .svg file name")
    study, info = storage.load_study(args.study, _storage(args))
    if args.json:
        print(json.dumps(status.trials_json(study, args.show_test), indent=1, default=str))
    else:
        stuck = status.parse_duration(args.stuck_after) if args.stuck_after else None
        print(status.status_text(study, info, stuck, args.show_test))
    if args.plot:
        print(f"wrote {status.save_progress_plot(study, info, Path(args.plot))}",
              file=sys.stderr if args.json else sys.stdout)
    return EXIT_OK


def run_reap(args: argparse.Namespace) -> int:
    from klayer.search import status, storage

    older = status.parse_duration(args.older_than)
    study, info = storage.load_study(args.study, _storage(args))
    reaped = status.reap(study, info.store, older, retry=not args.no_retry)
    if not reaped:
        print(f"no trial of {info.name} has been RUNNING for more than "
              f"{status.fmt_duration(older)}")
    for t in reaped:
        again = "" if args.no_retry else ", queued again"
        print(f"#{t.number} ({t.user_attrs.get('worker', '?')}) marked FAIL{again}")
    return EXIT_OK


def run_best(args: argparse.Namespace) -> int:
    from klayer.search import space, storage, studies

    if args.cycles is not None and not args.cycles > 0:
        raise UsageError(f"--cycles must be > 0, got {args.cycles}")
    common.at_least(args, seeds=1)
    study, info = storage.load_study(args.study, _storage(args))
    best, cfg = studies.best_config(study, info, args.cycles, args.data_dir)
    test = best.user_attrs.get("test_accuracy") if args.show_test else None
    print(f"best trial #{best.number}: val {best.value:.2%}"
          + (f", test {test:.2%}" if isinstance(test, float) else "")
          + f"  {space.fmt_params(best.params)}  (seed {cfg.seed})")
    if not args.retrain:
        if args.cycles is not None or args.out or args.seeds is not None:
            raise UsageError("--cycles, --seeds and --out go with --retrain")
        return EXIT_OK
    return _retrain(args, study, info, best.number, cfg)


def _retrain(args: argparse.Namespace, study: optuna.Study, info: StudyInfo, number: int,
             cfg: TrainConfig) -> int:
    """``search best --retrain``: train the best configuration again, print the results.

    Its run folders checkpoint like ``klayer train``'s: SIGINT / SIGTERM (or a closed
    output pipe) stop at a step boundary with a checkpoint, and the same command run
    again continues from there.
    """
    from klayer.cli.train import STOP_NOTICE, Progress
    from klayer.search import storage, studies
    from klayer.training.plan import make_plan

    seeds, cycles = args.seeds or 1, f"{args.cycles:g}" if args.cycles else ""
    out = Path(args.out) if args.out else storage.study_dir(args.study, args.runs_dir) / (
        f"best-trial-{number}" + (f"-{cycles}cycles" if cycles else ""))
    data = studies.load_study_data(info, args.data_dir)
    common.check_writable(out)
    steps = make_plan(cfg, len(data.train.y)).total_steps
    with StopSignals(STOP_NOTICE.format(command="search best")) as stop, ExitStack() as held:
        held.callback(common.lock_run_folder(out, "--out").release)
        print(f"retraining #{number} for {steps} steps" + (f" ({cycles} cycles)" if cycles
              else "") + (f" with {seeds} seeds" if seeds > 1 else "") + f" into {out}",
              flush=True)
        progress = held.enter_context(closing(Progress(steps * seeds, quiet=args.quiet)))
        progress.on_broken_pipe = lambda: stop.request(signal.SIGPIPE)
        try:
            _, results = studies.retrain_best(study, info, args.cycles, out, args.data_dir,
                                              callback=progress, data=data, seeds=seeds,
                                              should_stop=stop, warn=_warn)
        except Stopped as e:
            how = common.how_stopped(e, "the checkpoints already written are intact")
            print(f"\nklayer search best: {how}\ncontinue with the same command: "
                  f"{common.command_line()}", file=sys.stderr, flush=True)
            return e.exit_code  # 130 SIGINT, 143 SIGTERM, 141 SIGPIPE
    _print_retrained(study, [r.summary for r in results], out)
    return EXIT_OK


def _print_retrained(study: optuna.Study, summaries: list[dict[str, Any]], out: Path) -> None:
    from klayer.cli.train import print_summary

    for summary in summaries:
        print_summary(summary)
    if len(summaries) > 1:
        r = study.user_attrs["retrain"]
        print(f"\ntest accuracy over seeds {', '.join(map(str, r['seeds']))}: "
              f"{', '.join(f'{a:.2%}' for a in r['test_accuracies'])}; "
              f"mean {r['test_accuracy']:.2%} +- {r['test_std']:.2%}")
    print(f"run folder: {out}")


def _warn(message: str) -> None:
    print(f"klayer search: warning: {message}", file=sys.stderr, flush=True)


_ACTIONS = (  # (its flags, name, run, help, description)
    (_add_init, "init", run_init, "create a study (once; workers never create one)",
     "Create a study: its search space, trial budget, sampler and base configuration (the "
     "training flags below), with a fingerprint of the data and the klayer version."),
    (_add_worker, "worker", run_worker, "train trials of a study until its budget is met",
     "Join a study and train its trials until it has the requested number of COMPLETE "
     "trials (a grid study: until each of its queued points has run once). Each trial's line "
     "shows its validation accuracy (--show-test adds the test accuracy). Training flags, if "
     "given, must equal the study's (only --data-dir may differ)."),
    (_add_status, "status", run_status, "the trials of a study, its best trial, stuck trials",
     "A study's trials with their validation accuracies, its best trial, trials stuck in "
     "RUNNING and, for a grid study, each grid point with its state (done / running / "
     "waiting / failed)."),
    (_add_reap, "reap", run_reap,
     "mark abandoned RUNNING trials FAIL (and queue them again)", None),
    (_add_delete, "delete", run_delete, "delete a study and its trials (asks first)", None),
    (_add_best, "best", run_best,
     "the best trial; --retrain trains it again and tests it", None),
)

COMMANDS: dict[str, Command] = {
    "search": ("hyperparameter search on Optuna: init, worker, status, reap, best",
               add_search_args, run_search),
}
