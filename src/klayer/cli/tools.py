"""``klayer evaluate``, ``plot`` and ``data``: a saved model, run folders, the data folder."""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from klayer.cli.common import (
    EXIT_OK,
    Command,
    UsageError,
    as_usage,
    at_least,
    check_writable,
    read_toml,
)
from klayer.core.config import TrainConfig
from klayer.core.network import Network
from klayer.data.batchfile import DataError
from klayer.data.datasets import Data
from klayer.training import evaluation, modelfile
from klayer.training.plan import load_data
from klayer.training.runfolder import read_metrics


def add_evaluate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL.npz|RUN_DIR",
                   help="a model file written by klayer train, or its run folder")
    p.add_argument("--data-dir", help="folder holding CIFAR-10 (default: the one the run's "
                   "config.toml records, else $KLAYER_DATA_DIR or the cache folder)")
    p.add_argument("--split", choices=("test", "val", "train"), default="test",
                   help="which split to evaluate (default test)")
    p.add_argument("--out", metavar="DIR", help="where to write the PNGs (default: beside MODEL)")
    p.add_argument("--strict-checksums", action="store_true",
                   help="refuse CIFAR-10 files whose checksums differ from the official ones")


def _model_file(arg: str) -> Path:
    """MODEL.npz, or RUN_DIR's model.npz (UsageError if the folder has none)."""
    model = Path(arg)
    if model.is_dir():
        model = model / "model.npz"
        if not model.is_file():
            raise UsageError(f"{model.parent}: no model.npz (is it a finished klayer run "
                             "folder?)")
    return model


def run_evaluate(args: argparse.Namespace) -> int:
    from klayer.report.plots import save_confusion, save_montage  # matplotlib

    model = _model_file(args.model)
    toml = model.parent / "config.toml"  # the data a model was trained on, found again
    recorded = read_toml(toml, flag=str(toml)) if toml.is_file() else {}
    net, meta, extras = modelfile.load(model)
    data = _data_of(args, net, toml, recorded, meta)
    if "mean" in extras and "std" in extras:  # the standardization the model was trained with
        data = data.with_transform(extras["mean"], extras["std"], extras.get("whiten"))
    out = Path(args.out) if args.out else model.resolve().parent
    check_writable(out, flag="--out" if args.out else "the model's folder (or give --out)")
    split = getattr(data, args.split)
    pred = np.concatenate([net.scores(c.astype(net.dtype), check=False).argmax(axis=1)
                           for c in evaluation.batches(data, split.X)])
    K = net.config.num_classes
    cm = np.zeros((K, K), dtype=np.int64)
    np.add.at(cm, (split.y, pred), 1)
    classes = data.classes if len(data.classes) == K else [str(i) for i in range(K)]
    print(f"{args.split} accuracy: {np.mean(pred == split.y):.2%} ({len(split.y)} examples)\n")
    width = max(len(c) for c in classes)
    print(" " * (width + 1) + " ".join(f"{c[:5]:>5}" for c in classes) + "   <- predicted")
    for i, c in enumerate(classes):
        print(f"{c:>{width}} " + " ".join(f"{v:>5}" for v in cm[i]))
    written = [save_confusion(out / f"confusion_{args.split}.png", cm, classes)]
    if data.image_shape is not None:
        written.append(save_montage(out / "weights.png", net.params["W1"], data.image_shape))
    print("\nwrote " + ", ".join(str(p) for p in written))
    return EXIT_OK


def _data_of(args: argparse.Namespace, net: Network, toml: Path, recorded: dict[str, Any],
             meta: dict[str, Any]) -> Data:
    """The data the model was trained on, as its run's config.toml records them (a kept
    experiment model: its metadata), unless --data-dir says where."""
    if not recorded and isinstance(meta.get("config"), dict):  # a kept experiment model
        recorded = meta["config"]
    where: dict[str, object] = {k: recorded[k] for k in (
        "dataset", "seed", "split", "val_size", "data_dir") if k in recorded}
    where.setdefault("dataset", meta.get("dataset", "cifar10"))
    where.setdefault("seed", int(meta.get("seed", 0)))
    if args.data_dir:
        where["data_dir"] = args.data_dir
    with as_usage(f"{toml}: "):
        cfg = TrainConfig.from_dict({**where, "strict_checksums": args.strict_checksums})
    data = load_data(cfg)
    if data.d != net.config.d:
        raise UsageError(f"{args.model} expects d = {net.config.d} inputs, {cfg.dataset} has "
                         f"{data.d}")
    return data


def add_predict_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL.npz|RUN_DIR", help="a model file written by "
                   "klayer train, or its run folder")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="PNG or JPEG images (resized to "
                   "32x32 RGB), .npy arrays (n x 3072 or n x 32 x 32 x 3 uint8) or CIFAR-10 "
                   "batch files")
    p.add_argument("--top", type=int, default=3, help="classes shown per input (default 3)")
    p.add_argument("--json", action="store_true", help="one JSON object: every input's "
                   "probabilities by class")


def run_predict(args: argparse.Namespace) -> int:
    """Class probabilities of the inputs, standardized as the model's training data were."""
    import json

    from klayer.core.losses import log_softmax
    from klayer.data.datasets import CIFAR_CLASSES, scaling, standardized
    from klayer.data.images import read_images

    at_least(args, top=1)
    model = _model_file(args.model)
    net, meta, extras = modelfile.load(model)
    if net.config.d != 3072:
        raise UsageError(f"{model} takes d = {net.config.d} inputs, not 32x32 RGB images")
    read = [read_images(path) for path in args.inputs]  # every input checked before output
    X = np.concatenate([x for x, _ in read])
    if "mean" in extras and "std" in extras:  # as the model's training data were
        whiten = extras.get("whiten")
        X = standardized(X, *scaling(extras["mean"], extras["std"], net.dtype),
                         None if whiten is None else whiten.astype(net.dtype))
    probs = np.exp(log_softmax(net.scores(X.astype(net.dtype)).astype(np.float64)))
    K = net.config.num_classes
    classes = CIFAR_CLASSES if meta.get("dataset") == "cifar10" and K == 10 else tuple(
        str(i) for i in range(K))
    labels = [label for _, names in read for label in names]
    if args.json:
        print(json.dumps({"model": str(model), "classes": list(classes), "predictions": [
            {"input": label, "probabilities": dict(zip(classes, map(float, p), strict=True))}
            for label, p in zip(labels, probs, strict=True)]}, indent=2))
        return EXIT_OK
    for label, p in zip(labels, probs, strict=True):
        top = np.argsort(-p)[: args.top]
        print(f"{label}: " + ", ".join(f"{classes[i]} {p[i]:.1%}" for i in top))
    return EXIT_OK


def add_plot_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders written by klayer train")
    p.add_argument("--out", metavar="DIR", default=".", help="where to write the PNGs (default .)")
    p.add_argument("--labels", help="comma-separated legend labels (default: folder names)")


def run_plot(args: argparse.Namespace) -> int:
    from klayer.report.plots import save_overlay  # matplotlib: only when needed

    labels = args.labels.split(",") if args.labels else [Path(r).name for r in args.runs]
    if len(labels) != len(args.runs):
        raise UsageError(f"--labels has {len(labels)} names for {len(args.runs)} runs")
    runs = []
    for label, run in zip(labels, args.runs, strict=True):
        path = Path(run) / "metrics.csv"
        if not path.is_file():
            raise UsageError(f"{run}: no metrics.csv (is it a klayer run folder?)")
        try:
            runs.append((label, read_metrics(path)))
        except ValueError as e:
            raise DataError(f"{path}: cannot plot it ({e})") from None
    _warn_mixed_datasets(labels, [Path(r) for r in args.runs])
    out = Path(args.out)
    check_writable(out)
    for path in save_overlay(out, runs):
        print(f"wrote {path}")
    return EXIT_OK


def _warn_mixed_datasets(labels: list[str], runs: list[Path]) -> None:
    """Warn when the runs were trained on different datasets (as their config.toml
    say): their curves share axes but are not comparable."""
    datasets: dict[str, list[str]] = {}
    for label, run in zip(labels, runs, strict=True):
        try:
            dataset = str(read_toml(run / "config.toml").get("dataset", "cifar10"))
        except UsageError:  # no readable config.toml: nothing to compare
            continue
        datasets.setdefault(dataset, []).append(label)
    if len(datasets) > 1:
        which = "; ".join(f"{d}: {', '.join(names)}" for d, names in sorted(datasets.items()))
        warnings.warn(f"these runs were trained on different datasets ({which}): their "
                      "curves are not comparable", stacklevel=2)


def add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=("fetch", "where"),
                   help="fetch: download and verify CIFAR-10; where: print the data folder "
                   "(first line, alone) and whether CIFAR-10 is there and what to run")
    p.add_argument("--data-dir", help="target folder (default $KLAYER_DATA_DIR, else the "
                   "user cache folder, e.g. ~/.cache/klayer)")


def run_data(args: argparse.Namespace) -> int:
    """``data fetch`` downloads into the data folder; ``data where`` prints it and says on
    stderr whether CIFAR-10 is there (exit 0 either way: it is a question, not a check)."""
    from klayer.data import fetch  # urllib, http.client: only when needed

    if args.action == "where":
        folder, presence = fetch.cifar10_presence(args.data_dir)
        print(folder)  # alone on stdout: $(klayer data where) is the folder
        print(presence, file=sys.stderr)
        return EXIT_OK
    folder = fetch.fetch_cifar10(args.data_dir, progress=sys.stderr.isatty())
    print(f"CIFAR-10 ready in {folder}")
    return EXIT_OK


COMMANDS: dict[str, Command] = {
    "evaluate": ("accuracy, confusion matrix and first-layer weights of a saved model",
                 add_evaluate_args, run_evaluate),
    "predict": ("class probabilities of your own images (PNG, JPEG, .npy, CIFAR batch)",
                add_predict_args, run_predict),
    "plot": ("overlay the curves of several runs", add_plot_args, run_plot),
    "data": ("download CIFAR-10 or show where it is", add_data_args, run_data),
}
