"""``klayer experiment NAME``: the assignment report's experiments and their report."""

from __future__ import annotations

import argparse
import json
import shlex
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict
from pathlib import Path

from .cli_common import EXIT_OK, Command, UsageError, check_writable
from .cli_train import lock_run_folder

# experiments.EXPERIMENTS' keys, spelled out so that building the parser does not import
# matplotlib (a test checks the two agree).
EXPERIMENT_NAMES = ("gradcheck", "bn-depth", "lambda-search", "init-sensitivity", "eta-study",
                    "optimizers", "bn-stats", "bn-placement", "skip", "best")


def add_experiment_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", choices=[*EXPERIMENT_NAMES, "all"],
                   help="the experiment; 'all' runs the assignment's (all but 'best') into one "
                        "combined report")
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


def run_experiment_cmd(args: argparse.Namespace) -> int:
    from .experiments import ASSIGNMENT, EXPERIMENTS, run_experiment, summary_section
    from .report import Report, to_html, to_markdown
    from .runner import Context

    for flag, value in (("--seeds", args.seeds), ("--jobs", args.jobs)):
        if value < 1:
            raise UsageError(f"{flag} must be >= 1, got {value}")
    if args.seed < 0:
        raise UsageError(f"--seed must be >= 0, got {args.seed}")
    out = Path(args.out) if args.out else Path("runs") / (
        f"experiment-{args.name}-" + time.strftime("%Y%m%d-%H%M%S"))
    base = {"dataset": args.dataset, "seed": args.seed}
    if args.data_dir:
        base["data_dir"] = args.data_dir
    ctx = Context(base=base, seeds=args.seeds, jobs=args.jobs, quick=args.quick, out=out,
                  log=lambda m: print(m, flush=True), keep=True)
    names = list(ASSIGNMENT) if args.name == "all" else [args.name]
    try:
        with ExitStack() as held:
            ctx.config({}, args.seed)  # the base configuration is valid
            needs_data = names != ["gradcheck"]  # the gradient check runs on random data
            if args.dataset == "cifar10" and needs_data:  # find it before any work (exit 4)
                from .fetch import locate_cifar10

                locate_cifar10(args.data_dir)
            check_writable(out)  # after the checks: a refused run leaves no folder
            held.callback(lock_run_folder(out, "--out").release)
            held.enter_context(_sigterm_raises())
            sections = [run_experiment(n, ctx) for n in names]
    except ValueError as e:
        raise UsageError(str(e)) from None
    except (KeyboardInterrupt, _Terminated) as e:
        ctx.close(abort=True)
        return _stopped(args, out, signal.SIGTERM if isinstance(e, _Terminated) else signal.SIGINT)
    finally:
        ctx.close()
    if args.name == "all":
        sections.insert(0, summary_section(sections))
    title = ("DD2424 Assignment 3: k-layer networks with batch normalization" if args.name == "all"
             else f"klayer experiment {args.name}: {EXPERIMENTS[args.name][0]}")
    report = Report(title, sections, args.quick, "klayer " + shlex.join(sys.argv[1:]),
                    args.seeds, time.strftime("%Y-%m-%d %H:%M:%S"))
    from .train import write_text

    # the results first (the smallest file, and the one to keep); each write is atomic
    write_text(out / "results.json", json.dumps(
        [{k: v for k, v in asdict(s).items() if k not in ("figures",)} for s in sections],
        indent=2, default=str) + "\n")
    write_text(out / "report.md", to_markdown(report, out))
    write_text(out / "report.html", to_html(report))
    print(f"\nreport: {out / 'report.html'} (and report.md)")
    return EXIT_OK


class _Terminated(Exception):
    """SIGTERM arrived: stop like Ctrl-C."""


@contextmanager
def _sigterm_raises() -> Iterator[None]:
    """While active, SIGTERM raises _Terminated in the main thread (as SIGINT raises
    KeyboardInterrupt), so the workers are stopped and the stop reported."""
    def handle(signum: int, frame: object) -> None:
        raise _Terminated

    old = signal.signal(signal.SIGTERM, handle)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _stopped(args: argparse.Namespace, out: Path, signum: int) -> int:
    """Report a stopped experiment (the trainings it finished are kept); 130 or 143."""
    from .jobcache import FOLDER

    kept = len(list((out / FOLDER).glob("*.json")))
    again = shlex.join(["klayer", *sys.argv[1:]]) + (
        "" if args.out else f" --out {shlex.quote(str(out))}")
    print(f"\nklayer experiment: stopped by {signal.Signals(signum).name}; {kept} finished "
          f"training(s) are kept in {out / FOLDER}\ncontinue with: {again}",
          file=sys.stderr, flush=True)
    return 128 + signum


COMMANDS: dict[str, Command] = {
    "experiment": ("run a named experiment of the assignment report into an HTML report",
                   add_experiment_args, run_experiment_cmd),
}
