"""The ``klayer`` command line. The only module that exits; nothing imports it.

Exit codes: 0 ok, 2 usage (bad flag or config value), 3 diverged training,
4 data (missing, corrupt or foreign file), 130 / 143 interrupted by SIGINT / SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import __version__

if TYPE_CHECKING:
    from .config import TrainConfig

EXIT_OK, EXIT_USAGE, EXIT_DIVERGED, EXIT_DATA = 0, 2, 3, 4


class UsageError(Exception):
    """A flag or configuration value is invalid (exit code 2)."""


def parse_widths(text: str) -> tuple[int, ...]:
    """'50,30,20' -> (50, 30, 20); '' -> () (a linear classifier)."""
    if text.strip() == "":
        return ()
    try:
        widths = tuple(int(w) for w in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers like 50,50, got {text!r}"
        ) from None
    if any(w <= 0 for w in widths):
        raise argparse.ArgumentTypeError(f"every width must be a positive integer, got {text!r}")
    return widths


# --- gradcheck ------------------------------------------------------------------


def add_gradcheck_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--hidden",
        type=parse_widths,
        default=(50, 50),
        help="hidden widths, comma-separated (default 50,50; '' for a linear net)",
    )
    p.add_argument(
        "--batch-norm",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="batch norm in every hidden layer (default off)",
    )
    p.add_argument(
        "--bn-position",
        choices=("before", "after"),
        default="before",
        help="batch norm before (assignment) or after the ReLU",
    )
    p.add_argument("--skip", action="store_true", help="residual skip connections")
    p.add_argument(
        "--dropout",
        type=float,
        default=0.0,
        help="dropout probability (a fixed mask is used for the check)",
    )
    p.add_argument("--dim", type=int, default=20, help="input dimension d (default 20)")
    p.add_argument("--n", type=int, default=10, help="number of examples (default 10)")
    p.add_argument("--classes", type=int, default=10, help="number of classes K (default 10)")
    p.add_argument(
        "--lambda",
        dest="lam",
        type=float,
        default=0.01,
        help="L2 regularization lambda (default 0.01)",
    )
    p.add_argument(
        "--sample",
        type=int,
        default=None,
        help="check this many random elements per tensor instead of all",
    )
    p.add_argument("--h", type=float, default=None, help="finite-difference step")
    p.add_argument("--seed", type=int, default=0, help="seed for weights, data and sample")
    p.add_argument("--json", action="store_true", help="print a JSON document instead of a table")


def run_gradcheck(args: argparse.Namespace) -> int:
    from .config import NetConfig
    from .gradcheck import check_gradients, default_step, format_table, make_check_problem

    if args.n < 2 and args.batch_norm:
        raise UsageError("--n must be at least 2 with --batch-norm (batch statistics)")
    for flag, value, low in (
        ("--dim", args.dim, 1),
        ("--n", args.n, 1),
        ("--classes", args.classes, 2),
    ):
        if value < low:
            raise UsageError(f"{flag} must be >= {low}, got {value}")
    if args.lam < 0:
        raise UsageError(f"--lambda must be >= 0, got {args.lam}")
    try:
        cfg = NetConfig(
            d=args.dim,
            num_classes=args.classes,
            hidden=args.hidden,
            batch_norm=args.batch_norm,
            bn_position=args.bn_position,
            skip=args.skip,
            dropout=args.dropout,
            dtype="float64",
        )
    except ValueError as e:
        raise UsageError(str(e)) from None
    net, X, y = make_check_problem(cfg, n=args.n, seed=args.seed)
    h = args.h if args.h is not None else default_step()
    rows = check_gradients(net, X, y, lam=args.lam, h=h, sample=args.sample, seed=args.seed)
    worst = max(r.max_rel_error for r in rows)
    if args.json:
        doc = {
            "config": json.loads(cfg.to_json()),
            "n": args.n,
            "lambda": args.lam,
            "seed": args.seed,
            "h": h,
            "max_rel_error": worst,
            "params": [r.as_dict() for r in rows],
        }
        print(json.dumps(doc, indent=2))
    else:
        print(format_table(rows))
        print(f"\nmax relative error over all parameters: {worst:.3e} (h = {h:g})")
    return EXIT_OK


# --- train ----------------------------------------------------------------------


def add_config_flags(p: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig key (--n-batch for n_batch, --lambda for lam), default unset."""
    from dataclasses import MISSING, fields

    from .config import TrainConfig, key_name

    p.add_argument("--config", metavar="TOML",
                   help="read settings from a TOML file; flags override it")
    g = p.add_argument_group("settings (TOML keys are the flag names with _ for -)")
    for f in fields(TrainConfig):
        flag = "--" + key_name(f).replace("_", "-")
        default = f.default if f.default is not MISSING else None
        help_text = f"{f.metadata['help']} (default: {_show(default)})"
        kind = str(f.type).replace(" | None", "")
        common: dict[str, Any] = {"dest": f.name, "default": None, "help": help_text}
        if kind == "bool":
            g.add_argument(flag, action=argparse.BooleanOptionalAction, **common)
        elif kind.startswith("tuple"):
            g.add_argument(flag, type=parse_widths, metavar="W1,W2,...", **common)
        else:
            conv = {"int": int, "float": float, "str": str}[kind]
            g.add_argument(flag, type=conv, choices=f.metadata.get("choices"), **common)


def _show(value: object) -> str:
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return "unset" if value is None else str(value)


def resolve_config(args: argparse.Namespace) -> TrainConfig:
    """TOML file (if any) overridden by the flags that were given; errors name the key."""
    from dataclasses import fields

    from .config import TrainConfig, key_name

    values: dict[str, object] = {}
    if args.config:
        values.update(read_toml(args.config))
    for f in fields(TrainConfig):
        given = getattr(args, f.name, None)
        if given is not None:
            values[key_name(f)] = given
    try:
        return TrainConfig.from_dict(values)
    except (ValueError, TypeError) as e:
        raise UsageError(str(e)) from None


def read_toml(path: str) -> dict[str, object]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise UsageError(f"--config: cannot read {path}: {e.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"--config: {path} is not valid TOML: {e}") from None


def add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", metavar="DIR", help="run folder (default runs/<timestamp>-<name>)")
    p.add_argument("--quiet", action="store_true", help="no progress output, only the final table")
    add_config_flags(p)


def run_train(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from . import train

    cfg = resolve_config(args)
    try:
        train.validate(cfg)
    except ValueError as e:
        raise UsageError(str(e)) from None
    out = Path(args.out) if args.out else Path("runs") / (
        time.strftime("%Y%m%d-%H%M%S") + f"-{cfg.name}")
    check_writable(out)
    data = train.load_data(cfg)
    try:
        plan = train.make_plan(cfg, len(data.train.y))
    except ValueError as e:
        raise UsageError(str(e)) from None
    progress = Progress(plan.total_steps, quiet=args.quiet)
    try:
        result = train.train(cfg, data, callback=progress)
    finally:
        progress.close()
    train.save_run(result, out)
    from .plots import save_run_plots

    save_run_plots(out, result.rows, [plan.lr(t) for t in range(plan.total_steps)], cfg.name)
    print_summary(result.summary)
    print(f"run folder: {out}")
    return EXIT_OK


def check_writable(out: Path) -> None:
    """Fail before training when the run folder cannot be created or written."""
    import os

    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--out: cannot create {out}: {e.strerror}") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise UsageError(f"--out: {out} is not writable")


def print_summary(summary: dict[str, object]) -> None:
    print(f"\n{'split':<12}{'accuracy':>10}")
    for split in ("train", "val", "test"):
        print(f"{split:<12}{summary[split + '_accuracy']:>10.2%}")
    for key in ("test_accuracy_adaptive_bn", "test_accuracy_adaptive_bn_flip"):
        if key in summary:
            print(f"{key[5:]:<12}{summary[key]:>10.2%}")
    print(f"\n{summary['steps']} steps in {summary['wall_seconds']:.1f} s "
          f"({summary['steps_per_second']:.0f} steps/s), seed {summary['seed']}")


class Progress:
    """A progress bar on a terminal; otherwise one line per evaluation."""

    def __init__(self, total: int, quiet: bool = False) -> None:
        self.quiet = quiet
        self.bar = None
        if not quiet and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="step", dynamic_ncols=True)
        self.val_acc = float("nan")

    def __call__(self, kind: str, info: dict[str, float]) -> None:
        if self.quiet:
            return
        if kind == "eval":
            self.val_acc = info["val_accuracy"]
            if self.bar is None:
                print(f"step {int(info['step']):>6}  epoch {info['epoch']:6.2f}  "
                      f"lr {info['lr']:.2e}  train loss {info['train_loss']:.4f}  "
                      f"val loss {info['val_loss']:.4f}  val acc {info['val_accuracy']:.2%}",
                      flush=True)
        elif self.bar is not None:
            self.bar.update(1)
            if int(info["step"]) % 50 == 0:
                self.bar.set_postfix(lr=f"{info['lr']:.1e}", loss=f"{info['loss']:.3f}",
                                     val_acc=f"{self.val_acc:.2%}", refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# --- evaluate, plot, data ----------------------------------------------------------


def add_evaluate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL.npz", help="a model file written by klayer train")
    p.add_argument("--data-dir", help="folder holding CIFAR-10 (or set $KLAYER_DATA_DIR)")
    p.add_argument("--split", choices=("test", "val", "train"), default="test",
                   help="which split to evaluate (default test)")
    p.add_argument("--out", metavar="DIR", help="where to write the PNGs (default: beside MODEL)")
    p.add_argument("--strict-checksums", action="store_true",
                   help="refuse CIFAR-10 files whose checksums differ from the official ones")


def run_evaluate(args: argparse.Namespace) -> int:
    import numpy as np

    from . import modelfile, train
    from .config import TrainConfig
    from .plots import save_confusion, save_montage

    net, meta, extras = modelfile.load(args.model)
    dataset = meta.get("dataset", "cifar10")
    cfg = TrainConfig(dataset=dataset, data_dir=args.data_dir, seed=int(meta.get("seed", 0)),
                      strict_checksums=args.strict_checksums)
    data = train.load_data(cfg)
    if data.d != net.config.d:
        raise UsageError(f"{args.model} expects d = {net.config.d} inputs, {dataset} has {data.d}")
    if "mean" in extras and "std" in extras:  # the standardization the model was trained with
        data = data.with_standardization(extras["mean"], extras["std"])
    split = getattr(data, args.split)
    scores = np.concatenate([net.scores(c.astype(net.dtype), check=False)
                             for c in train.batches(data, split.X)])
    pred = scores.argmax(axis=1)
    K = net.config.num_classes
    cm = np.zeros((K, K), dtype=np.int64)
    np.add.at(cm, (split.y, pred), 1)
    classes = data.classes if len(data.classes) == K else [str(i) for i in range(K)]
    print(f"{args.split} accuracy: {np.mean(pred == split.y):.2%} ({len(split.y)} examples)\n")
    width = max(len(c) for c in classes)
    print(" " * (width + 1) + " ".join(f"{c[:5]:>5}" for c in classes) + "   <- predicted")
    for i, c in enumerate(classes):
        print(f"{c:>{width}} " + " ".join(f"{v:>5}" for v in cm[i]))
    out = Path(args.out) if args.out else Path(args.model).resolve().parent
    check_writable(out)
    written = [save_confusion(out / f"confusion_{args.split}.png", cm, classes)]
    if data.image_shape is not None:
        written.append(save_montage(out / "weights.png", net.params["W1"], data.image_shape))
    print("\nwrote " + ", ".join(str(p) for p in written))
    return EXIT_OK


def add_plot_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders written by klayer train")
    p.add_argument("--out", metavar="DIR", default=".", help="where to write the PNGs (default .)")
    p.add_argument("--labels", help="comma-separated legend labels (default: folder names)")


def run_plot(args: argparse.Namespace) -> int:
    from .plots import save_overlay
    from .train import read_metrics

    labels = args.labels.split(",") if args.labels else [Path(r).name for r in args.runs]
    if len(labels) != len(args.runs):
        raise UsageError(f"--labels has {len(labels)} names for {len(args.runs)} runs")
    runs = []
    for label, run in zip(labels, args.runs, strict=True):
        path = Path(run) / "metrics.csv"
        if not path.is_file():
            raise UsageError(f"{run}: no metrics.csv (is it a klayer run folder?)")
        runs.append((label, read_metrics(path)))
    out = Path(args.out)
    check_writable(out)
    for path in save_overlay(out, runs):
        print(f"wrote {path}")
    return EXIT_OK


def add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=("fetch", "where"),
                   help="fetch: download and verify CIFAR-10; where: print the data folder")
    p.add_argument("--data-dir", help="target folder (default $KLAYER_DATA_DIR, else the "
                   "user cache folder, e.g. ~/.cache/klayer)")


def run_data(args: argparse.Namespace) -> int:
    from . import fetch

    if args.action == "where":
        print(fetch.resolve_data_dir(args.data_dir))
        return EXIT_OK
    folder = fetch.fetch_cifar10(args.data_dir, progress=sys.stderr.isatty())
    print(f"CIFAR-10 ready in {folder}")
    return EXIT_OK


# --- entry point ----------------------------------------------------------------

Command = tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]
COMMANDS: dict[str, Command] = {
    "train": ("train a network (defaults: the assignment's CIFAR-10 recipe)",
              add_train_args, run_train),
    "evaluate": ("accuracy, confusion matrix and first-layer weights of a saved model",
                 add_evaluate_args, run_evaluate),
    "plot": ("overlay the curves of several runs", add_plot_args, run_plot),
    "data": ("download CIFAR-10 or show where it is", add_data_args, run_data),
    "gradcheck": ("compare analytic and numerical gradients on a random problem",
                  add_gradcheck_args, run_gradcheck),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="klayer",
        description="k-layer fully-connected networks with batch normalization, in NumPy.",
        epilog="exit codes: 0 ok, 2 usage, 3 diverged, 4 data, 130/143 interrupted",
    )
    parser.add_argument("--version", action="version", version=f"klayer {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, add_args, run) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_args(p)
        p.set_defaults(run=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    from .data import DataError
    from .modelfile import ModelFileError
    from .train import Diverged

    try:
        return int(args.run(args))
    except UsageError as e:
        print(f"klayer {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (DataError, ModelFileError) as e:
        print(f"klayer {args.command}: data error: {e}", file=sys.stderr)
        return EXIT_DATA
    except Diverged as e:
        print(f"klayer {args.command}: diverged: {e}", file=sys.stderr)
        return EXIT_DIVERGED


if __name__ == "__main__":
    sys.exit(main())
