"""``klayer gradcheck``: analytic against numerical gradients on a random problem.

Ends with a PASS / FAIL verdict against ``--tol`` and exits 1 on FAIL, so scripts and
CI can use it as a test.
"""

from __future__ import annotations

import argparse
import json

from klayer.cli.common import (
    EXIT_CHECK_FAILED,
    EXIT_OK,
    Command,
    UsageError,
    as_usage,
    at_least,
    parse_widths,
)
from klayer.core import gradcheck
from klayer.core.config import NetConfig


def add_gradcheck_args(p: argparse.ArgumentParser) -> None:
    """The gradcheck flags; the network ones default as in ``klayer train`` (batch norm on)."""
    p.epilog = ("exit codes: 0 PASS, 1 FAIL (some tensor's max relative error exceeds "
                "--tol), 2 usage")
    p.add_argument("--hidden", type=parse_widths, default=(50, 50),
                   help="hidden widths, comma-separated (default 50,50; '' for a linear net)")
    p.add_argument("--batch-norm", action=argparse.BooleanOptionalAction, default=True,
                   help="batch norm in every hidden layer (default on, as in klayer train)")
    p.add_argument("--bn-position", choices=("before", "after"), default="before",
                   help="batch norm before (assignment) or after the ReLU")
    p.add_argument("--skip", action="store_true", help="residual skip connections")
    p.add_argument("--dropout", type=float, default=0.0,
                   help="dropout probability (a fixed mask is used for the check)")
    p.add_argument("--dim", type=int, default=20, help="input dimension d (default 20)")
    p.add_argument("--n", type=int, default=10, help="number of examples (default 10)")
    p.add_argument("--classes", type=int, default=10, help="number of classes K (default 10)")
    p.add_argument("--lambda", dest="lam", type=float, default=0.01,
                   help="L2 regularization lambda (default 0.01)")
    p.add_argument("--sample", type=int, default=None,
                   help="check this many random elements per tensor instead of all")
    p.add_argument("--h", type=float, default=None,
                   help="finite-difference step (default 2e-6, 1e-5 where longdouble is float64)")
    p.add_argument("--tol", type=float, default=None,
                   help="largest max relative error that passes (default 1e-6; 1e-3 where "
                   "longdouble is float64)")
    p.add_argument("--seed", type=int, default=0, help="seed for weights, data and sample")
    p.add_argument("--json", action="store_true", help="print a JSON document instead of a table")


def _check_args(args: argparse.Namespace) -> None:
    """UsageError naming the flag for any value the check cannot use."""
    if args.n < 2 and args.batch_norm and args.hidden:
        raise UsageError("--n must be at least 2 with batch norm (batch statistics); "
                         "or pass --no-batch-norm")
    at_least(args, dim=1, n=1, classes=2, sample=1, seed=0)
    if not 0 <= args.lam < float("inf"):  # NaN fails too
        raise UsageError(f"--lambda must be a finite number >= 0, got {args.lam}")
    if args.h is not None and not 0 < args.h < 1:
        raise UsageError(f"--h must be a small positive step, in (0, 1), got {args.h}")
    if args.tol is not None and not 0 < args.tol < float("inf"):
        raise UsageError(f"--tol must be a positive number, got {args.tol}")


def run_gradcheck(args: argparse.Namespace) -> int:
    """Check every tensor (or ``--sample`` elements of each), print the table and verdict."""
    _check_args(args)
    with as_usage():  # a bad combination of the network flags
        cfg = NetConfig(d=args.dim, num_classes=args.classes, hidden=args.hidden,
                        batch_norm=args.batch_norm, bn_position=args.bn_position,
                        skip=args.skip, dropout=args.dropout, dtype="float64")
    net, X, y = gradcheck.make_check_problem(cfg, n=args.n, seed=args.seed)
    h = args.h if args.h is not None else gradcheck.default_step()
    rows = gradcheck.check_gradients(net, X, y, lam=args.lam, h=h, sample=args.sample,
                                     seed=args.seed)
    verdict = gradcheck.judge(rows, args.tol if args.tol is not None else gradcheck.default_tol())
    if args.json:
        print(json.dumps({
            "config": json.loads(cfg.to_json()), "n": args.n, "lambda": args.lam,
            "seed": args.seed, "h": h, "tol": verdict.tol,
            "max_rel_error": verdict.max_rel_error, "worst": verdict.worst,
            "verdict": "PASS" if verdict.passed else "FAIL",
            "params": [r.as_dict() for r in rows]}, indent=2))
    else:
        print(gradcheck.format_table(rows))
        print(f"\nmax relative error over all parameters: {verdict.max_rel_error:.3e} "
              f"(h = {h:g})")
        print(verdict.line())
    return EXIT_OK if verdict.passed else EXIT_CHECK_FAILED


COMMANDS: dict[str, Command] = {
    "gradcheck": ("compare analytic and numerical gradients on a random problem",
                  add_gradcheck_args, run_gradcheck),
}
