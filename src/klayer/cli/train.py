"""``klayer train``: a new run, or the resumption of an interrupted one."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
import warnings
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from shlex import quote
from typing import Any

import numpy as np

from klayer.cli import common
from klayer.cli.common import EXIT_OK, Command, UsageError, to_flag, validate
from klayer.core.config import RESULT_NEUTRAL, TrainConfig, to_toml
from klayer.training import checkpoint, runfolder
from klayer.training.plan import load_data, make_plan, validate_for_data
from klayer.training.stop import Stopped, StopSignals
from klayer.training.trainer import ResumeMismatch, Trainer

STOP_NOTICE = ("\nklayer {command}: got {{name}}: finishing the current step and writing a "
               "checkpoint (again to stop at once)\n")
_RESOLVED = ("n_s", "cycles", "epochs")  # unset, they are written out by resolve_length
# what --resume may be given: the settings that leave the result unchanged, and --quiet
_RESUME_FLAGS = ", ".join(map(to_flag, RESULT_NEUTRAL)) + " and --quiet"


def add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", metavar="DIR", help="run folder (default runs/<timestamp>-<name>)")
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue an interrupted run from its newest checkpoint, with the "
                   f"settings in RUN_DIR/config.toml (only {_RESUME_FLAGS} may be given)")
    p.add_argument("--quiet", action="store_true", help="no progress output, only the final table")
    p.add_argument("--seeds", type=int, default=1, metavar="N",
                   help="train N times, with seeds S..S+N-1 (S = --seed), each into "
                   "OUT/seed-S, and report the mean and std of the accuracies (default 1); "
                   "the same command again reads finished seeds back")
    common.add_config_flags(p)


def run_train(args: argparse.Namespace) -> int:
    """A new run (or --resume): checks, then training with stops on SIGINT / SIGTERM.

    The signal handlers are in place from the start, so a signal during the set-up
    stops at the first step boundary (writing a checkpoint) like one during training.
    """
    if args.seeds != 1:
        return _run_seeds(args)
    trainer: Trainer | None = None
    with StopSignals(STOP_NOTICE.format(command="train")) as stop, ExitStack() as held:
        try:
            trainer = _resume(args, held) if args.resume else _new_run(args, held)
            return _train(trainer, stop)
        except Stopped as e:  # tell how it ended: checkpointed by the trainer, or at once
            again = f"klayer train --resume {quote(str(trainer.run_dir))}" if trainer else ""
            last = trainer.last_checkpoint if trainer else None
            how = common.how_stopped(e, f"resume from {last.name} with `{again}`" if last
                                     else "no checkpoint was written")
            then = f"\nresume with: {again}" if e.step is not None else ""
            print(f"\nklayer train: {how}{then}", file=sys.stderr, flush=True)
            return e.exit_code  # 130 SIGINT, 143 SIGTERM, 141 SIGPIPE


def _run_seeds(args: argparse.Namespace) -> int:
    """--seeds N: N runs with seeds S..S+N-1 into OUT/seed-S, then their mean and std
    (printed, and written to OUT/seeds.json). A seed whose folder holds this run,
    finished, is read back, so the same command continues after a stop."""
    common.at_least(args, seeds=1)
    if args.resume:
        raise UsageError("--seeds and --resume: resume one seed's folder, OUT/seed-S, "
                         "then run the --seeds command again")
    base = common.resolve_config(args)
    validate(base)
    out = _out_folder(args, base)
    summaries = []
    for seed in range(base.seed, base.seed + args.seeds):
        folder = out / f"seed-{seed}"
        if _records(folder / "config.toml", replace(base, seed=seed)) and \
                (folder / "summary.json").is_file():
            print(f"seed {seed}: finished before, read back from {folder}", flush=True)
        else:
            print(f"seed {seed}: training into {folder}", flush=True)
            code = run_train(argparse.Namespace(**{**vars(args), "seeds": 1, "seed": seed,
                                                   "out": str(folder)}))
            if code != EXIT_OK:
                return code
        summaries.append(json.loads((folder / "summary.json").read_text()))
    _write_seeds(out, summaries)
    return EXIT_OK


def _write_seeds(out: Path, summaries: list[dict[str, Any]]) -> None:
    """Print the seeds' mean ± std per accuracy and write them to OUT/seeds.json."""
    keys = [k for k in summaries[0] if k.endswith("accuracy") or "accuracy_" in k]
    stats = {k: {"mean": float(np.mean([s[k] for s in summaries])),
                 "std": float(np.std([s[k] for s in summaries], ddof=1)),
                 "values": [s[k] for s in summaries]} for k in keys}
    print(f"\n{len(summaries)} seeds ({', '.join(str(s['seed']) for s in summaries)}):")
    for k, v in stats.items():
        print(f"{k:<42}{v['mean']:>8.2%} ± {v['std']:.2%}")
    runfolder.write_text(out / "seeds.json", json.dumps(
        {"seeds": [s["seed"] for s in summaries], **stats}, indent=2) + "\n")
    print(f"wrote {out / 'seeds.json'}")


def _out_folder(args: argparse.Namespace, cfg: TrainConfig) -> Path:
    """--out, or the default runs/<timestamp>-<name>."""
    return Path(args.out) if args.out else Path("runs") / (
        time.strftime("%Y%m%d-%H%M%S") + f"-{cfg.name}")


def _new_run(args: argparse.Namespace, held: ExitStack) -> Trainer:
    cfg = common.resolve_config(args)
    validate(cfg)
    out = _out_folder(args, cfg)
    trainer = _trainer(cfg, out, args.quiet)  # data first: a failure leaves no folder
    _warn_unused(cfg, trainer.data.image_shape is not None)
    with common.removed_if_refused(out, leave=(common.LOCK_NAME,)):
        common.check_writable(out)
        held.callback(common.lock_run_folder(out, "--out").release)
        _refuse_used_out(out, trainer.cfg)
        _write_config(out, trainer.cfg)  # with n_s and the length written out
    return trainer


def _write_config(out: Path, cfg: TrainConfig) -> None:
    runfolder.write_text(out / "config.toml", to_toml(cfg.to_dict()))  # OutputError if not


def _refuse_used_out(out: Path, cfg: TrainConfig) -> None:
    """UsageError if ``out`` already holds a run: a finished one (its results are never
    replaced) or a stopped one (continued with --resume, not started again)."""
    same = _records(out / "config.toml", cfg)
    results = [name for name in runfolder.FINISHED_FILES if (out / name).exists()]
    stopped = checkpoint.list_checkpoints(out / checkpoint.FOLDER)
    if results and not (stopped and same and len(results) < len(runfolder.FINISHED_FILES)):
        if not same:
            raise UsageError(f"--out: {out} already holds the {' and '.join(results)} of "
                             "another, finished run; choose another --out")
        raise UsageError(f"--out: {out} already holds this run, finished"
                         f"{_test_accuracy(out)}; choose another --out to train it again")
    if stopped:  # (or this run, stopped while writing its results: --resume ends it)
        whose = "this run, stopped before its end" if same else "another run's checkpoints"
        raise UsageError(f"--out: {out} holds {whose}; continue it with "
                         f"`klayer train --resume {quote(str(out))}` or choose another --out")


def _records(toml: Path, cfg: TrainConfig) -> bool:
    """Whether ``toml`` (a run folder's config.toml) records ``cfg``'s settings."""
    try:
        recorded = TrainConfig.from_dict(common.read_toml(toml, flag="--out")).to_dict()
    except (UsageError, ValueError, TypeError):
        return False
    mine = cfg.to_dict()  # n_s or the length unset here: config.toml has them resolved
    return all(recorded[k] == mine[k] for k in mine
               if k not in RESULT_NEUTRAL and not (mine[k] is None and k in _RESOLVED))


def _test_accuracy(out: Path) -> str:
    """' (test accuracy 53.24 %)' from out/summary.json, or '' if it cannot be read."""
    try:
        accuracy = json.loads((out / "summary.json").read_text())["test_accuracy"]
        return f" (test accuracy {accuracy:.2%})"
    except (OSError, ValueError, KeyError, TypeError):
        return ""


def _warn_unused(cfg: TrainConfig, images: bool) -> None:
    """Say which settings this dataset has no use for, rather than drop them silently."""
    default = TrainConfig()
    cifar_only = [k for k in ("split", "val_size", "data_dir", "strict_checksums")
                  if cfg.dataset != "cifar10" and getattr(cfg, k) != getattr(default, k)]
    if cifar_only:
        warnings.warn(f"ignored for the {cfg.dataset} data: {', '.join(cifar_only)} "
                      "(CIFAR-10 only)", stacklevel=2)
    augment = [k for k in ("flip", "translate", "cutmix", "tta_flip", "tta_shift")
               if not images and getattr(cfg, k)]
    if augment:
        warnings.warn(f"ignored for the {cfg.dataset} data, which are not images: "
                      f"{', '.join(augment)}", stacklevel=2)


def _trainer(cfg: TrainConfig, out: Path, quiet: bool) -> Trainer:
    """Load the data, check what needs it, build the Trainer (nothing trained yet)."""
    with common.as_usage():  # e.g. val_size too large for the batches found
        data = load_data(cfg)
        validate_for_data(cfg, data)
    progress = Progress(make_plan(cfg, len(data.train.y)).total_steps, quiet=quiet)
    return Trainer(cfg, data, callback=progress, run_dir=out)


def _resumed_config(args: argparse.Namespace, toml: Path) -> tuple[TrainConfig, bool]:
    """The settings RUN_DIR/config.toml records, with the result-neutral ones given, and
    whether these changed any; UsageError for any other setting given."""
    given = [to_flag(k) for k in common.flag_values(args) if k not in RESULT_NEUTRAL]
    given += [flag for flag, v in (("--config", args.config), ("--out", args.out)) if v]
    if given:
        raise UsageError(f"--resume continues {toml.parent} with the settings recorded in its "
                         f"config.toml; drop {', '.join(given)} (only {_RESUME_FLAGS} may be "
                         "given)")
    if not toml.is_file():
        raise UsageError(f"--resume: {toml} not found ({toml.parent} is not a folder started "
                         "by klayer train)")
    recorded = common.read_toml(toml, flag="--resume")
    values = {**recorded, **{k: getattr(args, k) for k in RESULT_NEUTRAL
                             if getattr(args, k, None) is not None}}
    cfg = common.config_from(values, where=f"--resume: {toml}: ")
    validate(cfg)
    return cfg, values != recorded


def _resume(args: argparse.Namespace, held: ExitStack) -> Trainer:
    run_dir = Path(args.resume)
    toml = run_dir / "config.toml"
    cfg, changed = _resumed_config(args, toml)
    common.check_writable(run_dir, flag="--resume")
    trainer = _trainer(cfg, run_dir, args.quiet)
    held.callback(common.lock_run_folder(run_dir, "--resume").release)

    def warn(message: str) -> None:
        print(f"klayer train: warning: {message}", file=sys.stderr, flush=True)

    try:
        found = trainer.resume(warn)
    except ResumeMismatch as e:
        raise UsageError(f"--resume: {e} (in {toml}); start a new run instead") from None
    if found is None:
        warn(f"no checkpoint in {trainer.checkpoint_dir} (stopped before the first was "
             "written): starting from step 0")
    else:
        print(f"resuming {run_dir} from step {found[0]} of {trainer.plan.total_steps} "
              f"({found[1].name})", flush=True)
    if changed:
        _write_config(run_dir, cfg)
    if isinstance(trainer.callback, Progress):
        trainer.callback.start_at(trainer.t)
    return trainer


def _train(trainer: Trainer, stop: StopSignals) -> int:
    """Run (or continue) the trainer, then write the run folder; an output error is
    exit 5 (a stop raises ``Stopped`` to the caller)."""
    from klayer.report.plots import save_run_plots  # matplotlib: only when needed

    out, progress, plan = trainer.run_dir, trainer.callback, trainer.plan
    assert out is not None and isinstance(progress, Progress)
    progress.on_broken_pipe = lambda: stop.request(signal.SIGPIPE)  # `klayer train | head`
    try:
        try:
            trainer.write_metrics()  # on resume: exactly the checkpoint's rows
            result = trainer.run(should_stop=stop)
        finally:
            progress.close()
        runfolder.save_run(result, out)
        save_run_plots(out, result.rows, [plan.lr(t) for t in range(plan.total_steps)],
                       trainer.cfg.name)  # an OutputError naming the PNG if one fails
    except runfolder.OutputError as e:
        last = trainer.last_checkpoint
        then = (f"; free space or fix the folder, then resume from {last.name} with "
                f"`klayer train --resume {quote(str(out))}`" if last else "")
        print(f"klayer train: output error: {e}{then}", file=sys.stderr, flush=True)
        return common.EXIT_OUTPUT
    print_summary(result.summary)
    print(f"run folder: {out}")
    return EXIT_OK


def print_summary(summary: dict[str, object]) -> None:
    """The accuracy table at the end of a run (and of each seed of --seeds)."""
    pct = f"{float(summary.get('flip_fraction', 0)):.0%} mirrored"  # type: ignore[arg-type]
    labels = {"train_accuracy": "train", "val_accuracy": "val", "test_accuracy": "test",
              "test_accuracy_adaptive_bn": "test, adaptive BN",
              "test_accuracy_adaptive_bn_flip": "test, adaptive BN of the mirrored set",
              "test_accuracy_partly_flipped": f"test {pct}",
              "test_accuracy_adaptive_bn_partly_flipped": f"test {pct}, adaptive BN"}
    rows = [(label, summary[key]) for key, label in labels.items() if key in summary]
    width = max(len(label) for label, _ in rows) + 2
    print(f"\n{'split':<{width}}{'accuracy':>10}")
    for label, value in rows:
        print(f"{label:<{width}}{value:>10.2%}")
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
        self.last: dict[str, float] = {}  # the latest step's lr and loss
        self.on_broken_pipe: Callable[[], None] | None = None  # the reader went away

    def start_at(self, step: int) -> None:
        """Continue counting from ``step`` (on resume)."""
        if self.bar is not None:
            self.bar.update(step)

    def __call__(self, kind: str, info: dict[str, float]) -> None:
        if self.quiet:
            return
        if kind == "resume":  # a retraining's seed found its checkpoint (search best)
            done = info["step"] >= info["steps"]
            print(f"seed {info['seed']:.0f}: " + ("trained before; its results are read again"
                  if done else f"continuing from its checkpoint at step {info['step']:.0f} "
                  f"of {info['steps']:.0f}"), flush=True)
            self.start_at(int(info["step"]))
        elif kind == "eval":
            self.val_acc = info["val_accuracy"]
            if self.bar is None:
                self._print(info)
            else:
                self._postfix(refresh=True)  # the bar shows each evaluation, the last too
        elif self.bar is not None:
            self.bar.update(1)
            self.last = info
            if int(info["step"]) % 50 == 0:
                self._postfix(refresh=False)

    def _print(self, info: dict[str, float]) -> None:
        try:
            print(f"step {int(info['step']):>6}  epoch {info['epoch']:6.2f}  "
                  f"lr {info['lr']:.2e}  train loss {info['train_loss']:.4f}  "
                  f"val loss {info['val_loss']:.4f}  val acc {info['val_accuracy']:.2%}",
                  flush=True)
        except BrokenPipeError:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            self.quiet = True
            if self.on_broken_pipe is not None:
                self.on_broken_pipe()

    def _postfix(self, refresh: bool) -> None:
        assert self.bar is not None
        values = {"val_acc": f"{self.val_acc:.2%}"}
        if self.last:
            values = {"lr": f"{self.last['lr']:.1e}", "loss": f"{self.last['loss']:.3f}",
                      **values}
        self.bar.set_postfix(values, refresh=refresh)

    def close(self) -> None:
        if self.bar is not None:
            self._postfix(refresh=True)  # the final values, not those of 50 steps before
            self.bar.close()


COMMANDS: dict[str, Command] = {
    "train": ("train a network (defaults: the assignment's CIFAR-10 recipe)",
              add_train_args, run_train),
}
