"""``klayer search``: hyperparameter studies on Optuna (init, worker, status, reap, best)."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from contextlib import ExitStack, closing
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from klayer.cli.common import (
    EXIT_OK,
    Command,
    UsageError,
    add_config_flags,
    check_writable,
    command_line,
    read_toml,
    resolve_config,
)

if TYPE_CHECKING:
    import optuna

    from klayer.core.config import TrainConfig
    from klayer.search.storage import StudyInfo


def _study_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--study", required=True, help="the study's name")
    p.add_argument("--storage", metavar="URL|FILE",
                   help="a postgresql+psycopg://user:password@host/db URL (many machines) or a "
                        "journal file (default $KLAYER_STORAGE, else "
                        "RUNS/search/STUDY/journal.log)")
    p.add_argument("--runs-dir", default="runs", metavar="RUNS",
                   help="folder of run folders (default runs)")


def add_search_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="search_command", metavar="ACTION", required=True)
    for add in (_add_init, _add_worker, _add_status, _add_reap, _add_best):
        add(sub)


def _add_init(sub: Any) -> None:
    q = sub.add_parser("init", help="create a study (once; workers never create one)",
                       description="Create a study: its search space, trial budget, sampler "
                       "and base configuration (the training flags below), with a fingerprint "
                       "of the data and the klayer version.")
    _study_flags(q)
    q.add_argument("--space", metavar="SPACE.toml",
                   help="search space: one table per key, e.g. [lambda] low = 1e-5 "
                        "high = 1e-1 log = true; or choices = [...]")
    q.add_argument("--param", action="append", default=[], metavar="KEY=SPEC",
                   help="a search-space entry: KEY=LOW..HIGH[:log][:step=S][:points=N] or "
                        "KEY=A|B|C (repeatable; overrides --space)")
    q.add_argument("--trials", type=int,
                   help="COMPLETE trials the workers stop at (default 16; a grid study runs "
                        "each of its points once instead)")
    q.add_argument("--sampler", choices=("random", "tpe", "grid"), default="random",
                   help="Optuna sampler (default random); grid: every point of the grid is "
                        "queued once and the workers stop when all have run")
    q.add_argument("--grid-points", type=int, default=5,
                   help="grid sampler: values per range without points (default 5)")
    q.add_argument("--parent", metavar="STUDY",
                   help="coarse to fine: ranges from the top trials of this study")
    q.add_argument("--parent-storage", metavar="URL|FILE",
                   help="the parent's storage (default: --storage, else the parent's journal)")
    q.add_argument("--top-k", type=int, default=5, help="--parent: trials to take (default 5)")
    q.add_argument("--margin", type=float, default=0.25,
                   help="--parent: widen each range by this fraction of its span (default 0.25)")
    add_config_flags(q)
    q.set_defaults(search_run=run_init)


def _add_worker(sub: Any) -> None:
    w = sub.add_parser("worker", help="train trials of a study until its budget is met",
                       description="Join a study and train its trials until it has the "
                       "requested number of COMPLETE trials (a grid study: until each of its "
                       "queued points has run once). Each trial's line shows its validation "
                       "accuracy (--show-test adds the test accuracy). Training flags, if "
                       "given, must equal the study's (only --data-dir may differ).")
    _study_flags(w)
    w.add_argument("--jobs", type=int, default=1, help="worker processes (default 1)")
    w.add_argument("--threads", type=int, default=1,
                   help="BLAS threads per worker process (default 1)")
    w.add_argument("--batch-trials", type=int, default=1, metavar="T",
                   help="ask for T trials at once and train them together in one vectorized "
                        "pass (same architecture; lambda and learning rates differ)")
    w.add_argument("--sampler-seed", type=int,
                   help="seed of this worker's sampler (default: from host, pid and time; "
                        "give every machine a different one)")
    w.add_argument("--heartbeat-interval", type=int, default=60,
                   help="PostgreSQL: seconds between heartbeats of a running trial (default 60)")
    w.add_argument("--grace-period", type=int, default=300,
                   help="PostgreSQL: seconds without heartbeat before a trial is failed and "
                        "retried (default 300)")
    w.add_argument("--poll", type=float, default=5.0,
                   help="seconds between looks at the study while others finish (default 5)")
    w.add_argument("--max-failures", type=int, default=10,
                   help="stop after this many failed trials in a row (default 10)")
    w.add_argument("--quiet", action="store_true", help="no line per trial")
    _show_test_flag(w, "print each trial's test accuracy too")
    add_config_flags(w)
    w.set_defaults(search_run=run_worker)


def _add_status(sub: Any) -> None:
    s = sub.add_parser("status", help="the trials of a study, its best trial, stuck trials",
                       description="A study's trials with their validation accuracies, its "
                       "best trial, trials stuck in RUNNING and, for a grid study, each grid "
                       "point with its state (done / running / waiting / failed).")
    _study_flags(s)
    s.add_argument("--stuck-after", metavar="DURATION",
                   help="warn about trials RUNNING longer than this (default 3x the median "
                        "trial, at least 5m)")
    s.add_argument("--json", action="store_true", help="the trials as JSON")
    _show_test_flag(s, "show the trials' test accuracies (and test losses in --json) too")
    s.set_defaults(search_run=run_status)


def _add_reap(sub: Any) -> None:
    r = sub.add_parser("reap", help="mark abandoned RUNNING trials FAIL (and queue them again)")
    _study_flags(r)
    r.add_argument("--older-than", required=True, metavar="DURATION",
                   help="trials RUNNING longer than this, e.g. 30m, 2h, 1d")
    r.add_argument("--no-retry", action="store_true", help="do not queue the reaped trials again")
    r.set_defaults(search_run=run_reap)


def _add_best(sub: Any) -> None:
    b = sub.add_parser("best", help="the best trial; --retrain trains it again and tests it")
    _study_flags(b)
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
    b.set_defaults(search_run=run_best)


def _show_test_flag(p: argparse.ArgumentParser, what: str) -> None:
    """--show-test: test accuracies stay hidden during a search unless asked for, since
    seeing them invites choosing hyperparameters on the test set."""
    p.add_argument("--show-test", action="store_true",
                   help=f"{what}; by default only validation accuracies are shown, so that "
                        "nothing is chosen on the test set")


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
    from klayer.core.config import TrainConfig, key_name

    values: dict[str, Any] = dict(read_toml(args.config)) if args.config else {}
    for f in fields(TrainConfig):
        given = getattr(args, f.name, None)
        if given is not None:
            values[key_name(f)] = list(given) if isinstance(given, tuple) else given
    return values


# --- init ------------------------------------------------------------------------------------


def run_init(args: argparse.Namespace) -> int:
    from klayer.search import space as search_space
    from klayer.search import storage as search_storage
    from klayer.training.plan import load_data, validate

    storage = _storage(args)
    raw: dict[str, Any] = dict(read_toml(args.space, "--space")) if args.space else {}
    for text in args.param:
        key, spec = search_space.parse_param(text)
        raw[key] = spec
    parent, parent_fp = None, None
    if args.parent:
        raw, base, parent, parent_fp = _from_parent(args, raw)
    else:
        base = resolve_config(args)
    try:
        validate(base)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.grid_points < 2:
        raise UsageError(f"--grid-points must be >= 2, got {args.grid_points}")
    trials = 16 if args.trials is None else args.trials
    space = search_space.normalize_space(raw, base)
    if args.sampler == "grid":
        for spec in space.values():
            if "choices" not in spec:
                spec.setdefault("points", args.grid_points)
    data = load_data(base)
    if parent_fp is not None and search_storage.data_fingerprint(data) != parent_fp:
        raise UsageError(f"--parent {args.parent} was searched on other data "
                         f"({parent_fp[:19]}...); use the same data set")
    info = search_storage.create_study(args.study, storage, base, data, space, trials,
                               args.sampler, parent)
    _print_created(args, info)
    return EXIT_OK


def _print_created(args: argparse.Namespace, info: StudyInfo) -> None:
    """What ``search init`` made, with a note when a grid overrides --trials."""
    from klayer.search import space as search_space
    from klayer.search import storage as search_storage

    storage = search_storage.masked(info.storage)
    print(f"created study {info.name} in {storage}")
    if info.grid is not None:
        print(f"  grid of {len(info.grid)} points, each queued once, sampler grid")
        if args.trials is not None and args.trials != len(info.grid):
            print(f"  note: grid has {len(info.grid)} points: the study runs "
                  f"{len(info.grid)} trials, not the {args.trials} asked")
    else:
        print(f"  {info.n_trials} COMPLETE trials wanted, sampler {info.sampler}")
    print(f"  space: {search_space.describe_space(info.space)}")
    if info.parent is not None:
        print(f"  from the top {args.top_k} trials of {args.parent}: {info.parent['trials']}")
    print(f"  data {info.fingerprint[:23]}..., klayer {info.version}")
    hint = "" if not args.storage else f" --storage {storage}"
    print(f"next: klayer search worker --study {info.name}{hint} --jobs 2")


def _from_parent(args: argparse.Namespace, raw: dict[str, Any]) -> tuple[
        dict[str, Any], TrainConfig, dict[str, Any], str]:
    """--parent: the space narrowed to its top trials (``raw`` entries win), its base
    configuration with this command's settings, the parent attribute, its data fingerprint."""
    from klayer.core.config import TrainConfig
    from klayer.search import space as search_space
    from klayer.search import storage as search_storage

    if args.top_k < 1:
        raise UsageError(f"--top-k must be >= 1, got {args.top_k}")
    p_storage = search_storage.resolve_storage(args.parent, args.parent_storage or args.storage,
                                       args.runs_dir)
    p_study, p_info = search_storage.load_study(args.parent, p_storage)
    top = search_storage.top_trials(p_study, args.top_k)
    if not top:
        raise UsageError(f"--parent {args.parent}: no COMPLETE trial to narrow from")
    space = search_space.child_space(p_info.space, top, args.margin)
    space.update(raw)  # explicit entries win
    base_values = {**p_info.config.to_dict(), **explicit_values(args)}
    try:
        base = TrainConfig.from_dict(base_values)
    except (ValueError, TypeError) as e:
        raise UsageError(str(e)) from None
    parent = {"study": args.parent, "storage": search_storage.masked(p_storage),
              "top_k": args.top_k, "margin": args.margin,
              "trials": [t.number for t in top], "best_value": top[0].value,
              "space": p_info.space}
    return space, base, parent, p_info.fingerprint


# --- worker ----------------------------------------------------------------------------------


def run_worker(args: argparse.Namespace) -> int:
    from klayer.search import pool, worker

    for flag, value, low in (("--jobs", args.jobs, 1), ("--threads", args.threads, 1),
                             ("--batch-trials", args.batch_trials, 1),
                             ("--heartbeat-interval", args.heartbeat_interval, 1),
                             ("--grace-period", args.grace_period, 1),
                             ("--max-failures", args.max_failures, 1)):
        if value < low:
            raise UsageError(f"{flag} must be >= {low}, got {value}")
    if args.grace_period <= args.heartbeat_interval:
        raise UsageError("--grace-period must exceed --heartbeat-interval")
    if args.sampler_seed is not None and not 0 <= args.sampler_seed < 2**32:
        raise UsageError(f"--sampler-seed must be in [0, 2^32), got {args.sampler_seed}")
    if not 0 < args.poll < 86400:  # NaN fails too
        raise UsageError(f"--poll must be a number of seconds in (0, 86400), got {args.poll}")
    overrides = explicit_values(args)
    data_dir = overrides.pop("data_dir", None)
    opts = worker.WorkerOptions(
        study=args.study, storage=_storage(args), batch_trials=args.batch_trials,
        sampler_seed=args.sampler_seed, data_dir=data_dir, overrides=overrides,
        heartbeat_interval=args.heartbeat_interval, grace_period=args.grace_period,
        poll=args.poll, max_failures=args.max_failures, quiet=args.quiet,
        show_test=args.show_test)
    return pool.run_workers(opts, jobs=args.jobs, threads=args.threads)


# --- status, reap, best ----------------------------------------------------------------------


def run_status(args: argparse.Namespace) -> int:
    from klayer.search import status
    from klayer.search import storage as search_storage

    study, info = search_storage.load_study(args.study, _storage(args))
    if args.json:
        print(json.dumps(status.trials_json(study, args.show_test), indent=1, default=str))
        return EXIT_OK
    stuck = status.parse_duration(args.stuck_after) if args.stuck_after else None
    print(status.status_text(study, info, stuck, args.show_test))
    return EXIT_OK


def run_reap(args: argparse.Namespace) -> int:
    from klayer.search import status
    from klayer.search import storage as search_storage

    older = status.parse_duration(args.older_than)
    study, info = search_storage.load_study(args.study, _storage(args))
    reaped = status.reap(study, info.store, older, retry=not args.no_retry)
    if not reaped:
        print(f"no trial of {info.name} has been RUNNING for more than "
              f"{status.fmt_duration(older)}")
    for t in reaped:
        again = "" if args.no_retry else ", queued again"
        print(f"#{t.number} ({t.user_attrs.get('worker', '?')}) marked FAIL{again}")
    return EXIT_OK


def run_best(args: argparse.Namespace) -> int:
    from klayer.search import space as search_space
    from klayer.search import storage as search_storage
    from klayer.search import studies as search

    if args.cycles is not None and not args.cycles > 0:
        raise UsageError(f"--cycles must be > 0, got {args.cycles}")
    if args.seeds is not None and args.seeds < 1:
        raise UsageError(f"--seeds must be >= 1, got {args.seeds}")
    study, info = search_storage.load_study(args.study, _storage(args))
    best, cfg = search.best_config(study, info, args.cycles, args.data_dir)
    test = best.user_attrs.get("test_accuracy") if args.show_test else None
    print(f"best trial #{best.number}: val {best.value:.2%}"
          + (f", test {test:.2%}" if isinstance(test, float) else "")
          + f"  {search_space.fmt_params(best.params)}  (seed {cfg.seed})")
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
    from klayer.cli.train import STOP_NOTICE, Progress, lock_run_folder, print_summary
    from klayer.search import storage as search_storage
    from klayer.search import studies as search
    from klayer.training.plan import make_plan
    from klayer.training.stop import Stopped, StopSignals

    seeds = args.seeds or 1
    out = Path(args.out) if args.out else search_storage.study_dir(args.study, args.runs_dir) / (
        f"best-trial-{number}" + (f"-{args.cycles:g}cycles" if args.cycles else ""))
    data = search.load_study_data(info, args.data_dir)
    check_writable(out)
    plan = make_plan(cfg, len(data.train.y))
    with StopSignals(STOP_NOTICE.format(command="search best")) as stop, ExitStack() as held:
        held.callback(lock_run_folder(out, "--out").release)
        print(f"retraining #{number} for {plan.total_steps} steps"
              + (f" ({args.cycles:g} cycles)" if args.cycles else "")
              + (f" with {seeds} seeds" if seeds > 1 else "") + f" into {out}", flush=True)
        progress = held.enter_context(closing(Progress(plan.total_steps * seeds,
                                                       quiet=args.quiet)))
        progress.on_broken_pipe = lambda: stop.request(signal.SIGPIPE)

        def callback(kind: str, event: dict[str, float]) -> None:
            if kind == "resume" and not args.quiet:
                done = event["step"] >= event["steps"]
                print(f"seed {event['seed']:.0f}: " + ("trained before; its results are read "
                      "again" if done else f"continuing from its checkpoint at step "
                      f"{event['step']:.0f} of {event['steps']:.0f}"), flush=True)
            progress(kind, event)

        try:
            _, results = search.retrain_best(study, info, args.cycles, out, args.data_dir,
                                             callback=callback, data=data, seeds=seeds,
                                             should_stop=stop, warn=_warn)
        except Stopped as e:
            how = (f"interrupted by {e.name} after step {e.step} of {e.total}; checkpoint "
                   f"{e.checkpoint}" if e.step is not None else f"stopped at once by "
                   f"{e.name}; the checkpoints already written are intact")
            print(f"\nklayer search best: {how}\ncontinue with the same command: "
                  f"{command_line()}", file=sys.stderr, flush=True)
            return e.exit_code  # 130 SIGINT, 143 SIGTERM, 141 SIGPIPE
    for r in results:
        print_summary(r.summary)
    if seeds > 1:
        r = study.user_attrs["retrain"]
        print(f"\ntest accuracy over seeds {', '.join(map(str, r['seeds']))}: "
              f"{', '.join(f'{a:.2%}' for a in r['test_accuracies'])}; "
              f"mean {r['test_accuracy']:.2%} +- {r['test_std']:.2%}")
    print(f"run folder: {out}")
    return EXIT_OK


def _warn(message: str) -> None:
    print(f"klayer search: warning: {message}", file=sys.stderr, flush=True)


COMMANDS: dict[str, Command] = {
    "search": ("hyperparameter search on Optuna: init, worker, status, reap, best",
               add_search_args, run_search),
}
