"""``klayer experiment NAME``: the assignment report's experiments and their report."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from klayer.cli import common
from klayer.cli.common import EXIT_OK, Command, UsageError, command_line
from klayer.training.stop import Stopped, StopSignals

if TYPE_CHECKING:
    from klayer.experiments.runner import Context

# experiments.EXPERIMENTS' keys, spelled out so that building the parser does not import
# matplotlib (a test checks the two agree).
EXPERIMENT_NAMES = ("gradcheck", "bn-depth", "lambda-search", "init-sensitivity", "eta-study",
                    "optimizers", "bn-stats", "bn-placement", "skip", "best")


def add_experiment_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", choices=[*EXPERIMENT_NAMES, "all"], help="the experiment; 'all' "
                   "runs the assignment's (all but 'best') into one combined report")
    p.add_argument("--data-dir", help="folder holding CIFAR-10 (or set $KLAYER_DATA_DIR)")
    p.add_argument("--dataset", choices=("cifar10", "digits", "synthetic"), default="cifar10",
                   help="dataset (default cifar10)")
    p.add_argument("--seeds", type=int, default=1,
                   help="seeds per configuration; numbers become mean ± std (default 1)")
    p.add_argument("--seed", type=int, default=0, help="first seed / search base seed")
    p.add_argument("--jobs", type=int, default=1,
                   help="trainings in parallel, each with cores/jobs BLAS threads (default 1)")
    p.add_argument("--quick", action="store_true",
                   help="a slice of the data and short runs (~1-2 min); marked in the report")
    p.add_argument("--out", metavar="DIR",
                   help="report folder (default runs/experiment-<name>-<timestamp>)")
    p.add_argument("--pruner", choices=("none", "median", "sha", "hyperband"), default="sha",
                   help="lambda-search: the pruner of its two search stages (default sha)")
    p.add_argument("--keep-models", action="store_true",
                   help="also save every trained network as OUT/models/<experiment>/"
                   "<configuration>-seed<S>.npz, for klayer evaluate (default: none)")


def run_experiment_cmd(args: argparse.Namespace) -> int:
    """Check everything, run the experiments, write the report.

    SIGINT and SIGTERM stop it at any point after the checks: the worker processes are
    stopped at once (the trainings they were running are lost, the finished ones are
    kept in OUT/trainings) and the command that continues is printed; exit 130 / 143.
    """
    from klayer.experiments.runner import Context

    common.at_least(args, seeds=1, jobs=1, seed=0)
    out = Path(args.out) if args.out else Path("runs") / (
        f"experiment-{args.name}-" + time.strftime("%Y%m%d-%H%M%S"))
    base = {"dataset": args.dataset, "seed": args.seed,
            **({"data_dir": args.data_dir} if args.data_dir else {})}
    ctx = Context(base=base, seeds=args.seeds, jobs=args.jobs, quick=args.quick, out=out,
                  log=lambda m: print(m, flush=True), keep=True, keep_models=args.keep_models,
                  pruner=args.pruner)
    with StopSignals() as stop, ExitStack() as held:
        try:
            with stop.armed():
                _check(args, ctx, out)
                held.callback(common.lock_run_folder(out, "--out").release)  # released last
                _run(args, ctx, out)
            with stop.held():  # done: a signal now changes nothing
                ctx.close()
        except BaseException as e:  # workers must not outlive the command, whatever stops it
            with stop.held():
                ctx.close(abort=True)
            if isinstance(e, Stopped):
                return _stopped(args, out, e, sum(p.is_file() for p in ctx.kept))
            if isinstance(e, ValueError):
                raise UsageError(str(e)) from None
            raise
    return EXIT_OK


def _check(args: argparse.Namespace, ctx: Context, out: Path) -> None:
    """Validate before any work: the configuration, the data, the report folder. What
    identifies the data and the code goes into the kept trainings' keys."""
    from klayer.data.fetch import locate_cifar10
    from klayer.experiments.jobcache import identity

    ctx.config({}, args.seed)  # the base configuration is valid
    # find CIFAR-10 before any work (exit 4); the gradient check runs on random data
    needs_cifar = args.dataset == "cifar10" and args.name != "gradcheck"
    ctx.identity = identity(locate_cifar10(args.data_dir) if needs_cifar else None)
    common.check_writable(out)  # after the checks: a refused run leaves no folder


def _run(args: argparse.Namespace, ctx: Context, out: Path) -> None:
    """The experiments, then results.json (first: the smallest file, and the one to keep),
    the tables (tables/*.csv and *.tex), report.md and report.html (each file atomic)."""
    from klayer.experiments.registry import ASSIGNMENT, EXPERIMENTS, run_experiment, summary_section
    from klayer.experiments.runner import MODELS
    from klayer.report.html import TABLES, Report, to_html, to_markdown, write_tables
    from klayer.training.runfolder import write_text

    every = args.name == "all"
    sections = [run_experiment(n, ctx) for n in (ASSIGNMENT if every else [args.name])]
    if every:
        sections.insert(0, summary_section(sections))
    title = ("DD2424 Assignment 3: k-layer networks with batch normalization" if every
             else f"klayer experiment {args.name}: {EXPERIMENTS[args.name][0]}")
    report = Report(title, sections, args.quick, command_line(),
                    args.seeds, time.strftime("%Y-%m-%d %H:%M:%S"))
    write_text(out / "results.json", json.dumps(
        [{k: v for k, v in asdict(s).items() if k != "figures"} for s in sections],
        indent=2, default=str) + "\n")
    write_tables(report, out)
    write_text(out / "report.md", to_markdown(report, out))
    write_text(out / "report.html", to_html(report))
    print(f"\nreport: {out / 'report.html'} (and report.md; tables as CSV and LaTeX in "
          f"{out / TABLES})")
    if args.keep_models:
        print(f"models: {out / MODELS}")


def _stopped(args: argparse.Namespace, out: Path, e: Stopped, kept: int) -> int:
    """Report a stopped experiment (its ``kept`` finished trainings are); 130 or 143."""
    from klayer.experiments.jobcache import FOLDER

    again = command_line() + ("" if args.out else f" --out {shlex.quote(str(out))}")
    saved = (f"the {kept} finished training(s) in {out / FOLDER} are kept" if kept
             else "no training had finished")
    print(f"\nklayer experiment: stopped by {e.name}; {saved}\ncontinue with: {again}",
          file=sys.stderr, flush=True)
    return e.exit_code


COMMANDS: dict[str, Command] = {
    "experiment": ("run a named experiment of the assignment report into an HTML report",
                   add_experiment_args, run_experiment_cmd),
}
