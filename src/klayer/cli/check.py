"""``klayer check case|compare|step``: a student's own gradients against the exact ones."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from klayer.cli.common import (
    EXIT_CHECK_FAILED,
    EXIT_OK,
    Command,
    UsageError,
    as_usage,
    at_least,
    parse_widths,
)

EXAMPLE = """\
example:
  klayer check case --out case.mat --hidden 50,50 --batch-norm
  (load case.mat in MATLAB or Python, run your ComputeGradients, save grad_W1, grad_b1, ...)
  klayer check compare case.mat mine.mat
"""


def add_check_args(p: argparse.ArgumentParser) -> None:
    p.epilog, p.formatter_class = EXAMPLE, argparse.RawDescriptionHelpFormatter
    sub = p.add_subparsers(dest="check_command", metavar="ACTION", required=True)
    case = sub.add_parser("case", help="write a small problem in the course's convention")
    case.add_argument("--out", required=True, metavar="CASE.npz|CASE.mat",
                      help="the case file; .mat also holds the cell arrays W, b, gamma, beta")
    case.add_argument("--d", type=int, default=10, help="input dimension (default 10)")
    case.add_argument("--n", type=int, default=20, help="examples (default 20)")
    case.add_argument("--hidden", type=parse_widths, default=(8, 8),
                      help="hidden widths, comma-separated (default 8,8)")
    case.add_argument("--batch-norm", action=argparse.BooleanOptionalAction, default=True,
                      help="batch norm in the hidden layers (default on)")
    case.add_argument("--lambda", dest="lam", type=float, default=0.01,
                      help="L2 regularization lambda (default 0.01)")
    case.add_argument("--eps", type=float, default=1e-12, help="batch-norm epsilon (default 1e-12)")
    case.add_argument("--seed", type=int, default=0, help="seed of data and parameters")
    case.add_argument("--dataset", choices=("synthetic", "cifar10"), default="synthetic",
                      help="random X (default) or the first n CIFAR-10 training images "
                      "(standardized, their first d dimensions)")
    case.add_argument("--data-dir", help="folder holding CIFAR-10 (or set $KLAYER_DATA_DIR)")
    cmp = sub.add_parser("compare", help="compare your gradients with the exact ones and "
                         "diagnose what differs (exit 0 agree, 1 differ)")
    cmp.add_argument("case", metavar="CASE", help="the case file (klayer check case)")
    cmp.add_argument("mine", metavar="MINE", help=".npz or .mat with grad_W1, grad_b1, "
                     "grad_gamma1, grad_beta1, ... (or cell arrays); optionally forward "
                     "values S1, S_hat1, mu1, v1, X1, ..., P, J")
    cmp.add_argument("--json", action="store_true", help="print one JSON object")
    cmp.add_argument("--eps", type=float, help="compare at this batch-norm epsilon")
    cmp.add_argument("--layout", choices=("auto", "columns", "rows"), default="auto",
                     help="columns: the course's X d x n; rows: X n x d (default: from shapes)")
    step = sub.add_parser("step", help="check one plain SGD step of your parameters")
    step.add_argument("case", metavar="CASE")
    step.add_argument("before", metavar="BEFORE", help="parameters (and grad_*) before")
    step.add_argument("after", metavar="AFTER", help="parameters after the step")
    step.add_argument("--eta", type=float, required=True, help="the step's learning rate")


def run_check(args: argparse.Namespace) -> int:
    return {"case": _case, "compare": _compare, "step": _step}[args.check_command](args)


def _case(args: argparse.Namespace) -> int:
    from klayer.check.files import make_case, save_case

    if Path(args.out).suffix not in (".npz", ".mat"):
        raise UsageError(f"--out must end in .npz or .mat, got {args.out}")
    at_least(args, d=1, n=2, seed=0)
    if not (args.lam >= 0 and args.eps >= 0):
        raise UsageError("--lambda and --eps must be >= 0")
    X = y = None
    if args.dataset == "cifar10":
        X, y = _cifar_columns(args)
    with as_usage():
        case = make_case(args.d, args.n, args.hidden, batch_norm=args.batch_norm, lam=args.lam,
                         eps=args.eps, seed=args.seed, X=X, y=y)
    save_case(case, args.out)
    print(f"wrote {args.out}: X {case.X.shape[0]} x {case.n}, k = {case.k}, "
          f"{'with' if case.batch_norm else 'without'} batch norm, lambda {case.lam:g}, "
          f"eps {case.eps:g}, seed {args.seed}")
    return EXIT_OK


def _cifar_columns(args: argparse.Namespace) -> tuple[Any, Any]:
    import numpy as np

    from klayer.data.datasets import load_cifar10
    from klayer.data.fetch import locate_cifar10

    data = load_cifar10(locate_cifar10(args.data_dir))
    if args.d > data.d or args.n > len(data.train.y):
        raise UsageError(f"--d and --n must be at most {data.d} and {len(data.train.y)}")
    X = data.standardize(data.train.X[: args.n], dtype=np.float64)[:, : args.d]
    return X.T, np.asarray(data.train.y[: args.n])


def _compare(args: argparse.Namespace) -> int:
    from klayer.check.diagnose import compare
    from klayer.check.files import load_arrays, load_case

    case, mine = load_case(args.case), load_arrays(args.mine)  # exit 4 if unreadable
    with as_usage():
        report = compare(case, mine, args.layout, args.eps)
    print(json.dumps(report.to_json(), indent=2) if args.json else report.text())
    return EXIT_OK if report.ok else EXIT_CHECK_FAILED


def _step(args: argparse.Namespace) -> int:
    from klayer.check.files import load_arrays, load_case
    from klayer.check.step import check_step

    lines = check_step(load_case(args.case), load_arrays(args.before), load_arrays(args.after),
                       args.eta)
    print("\n".join(lines))
    return EXIT_OK if all(": ok" in line for line in lines) else EXIT_CHECK_FAILED


COMMANDS: dict[str, Command] = {
    "check": ("check your own gradients (the course's convention) and say what is wrong",
              add_check_args, run_check),
}
