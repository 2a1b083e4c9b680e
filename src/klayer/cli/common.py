"""Pieces shared by the ``klayer`` subcommands: errors, exit codes, flag parsing, output checks."""

from __future__ import annotations

import argparse
import difflib
import errno
import os
import shlex
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

from klayer.core.config import LENGTH_KEYS, TrainConfig, key_name, to_toml
from klayer.training import plan
from klayer.training.runfolder import OutputError
from klayer.training.stop import Stopped

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

Command = tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]

EXIT_OK, EXIT_USAGE, EXIT_DIVERGED, EXIT_DATA, EXIT_OUTPUT = 0, 2, 3, 4, 5
EXIT_CHECK_FAILED = 1  # klayer gradcheck's FAIL, klayer check's disagreement
EXIT_SIGINT, EXIT_SIGTERM, EXIT_SIGPIPE = 130, 143, 141  # 128 + the signal's number
LOCK_NAME = ".klayer-train.lock"


class UsageError(Exception):
    """A flag or configuration value is invalid (exit code 2)."""


@contextmanager
def as_usage(where: str = "") -> Iterator[None]:
    """A library's ValueError / TypeError (a value it refuses) as a UsageError."""
    try:
        yield
    except (ValueError, TypeError) as e:
        raise UsageError(f"{where}{e}") from None


class Parser(argparse.ArgumentParser):
    """argparse without prefix matching (``--epoch 3`` is not ``--epochs``), whose
    unknown flags are named by the subcommand that met them, with its usage and a
    'did you mean' (difflib). Subcommand parsers are of this class too."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        namespace, extras = super().parse_known_args(args, namespace)
        if extras:  # klayer never takes unknown arguments: say so where they were met
            self.error("unrecognized arguments: " + " ".join(self._suggest(a) for a in extras))
        return namespace, extras

    def _suggest(self, arg: str) -> str:
        if not arg.startswith("-"):
            return arg
        flags = [o for action in self._actions for o in action.option_strings]
        close = difflib.get_close_matches(arg.split("=", 1)[0], flags, n=1, cutoff=0.6)
        return f"{arg} (did you mean {close[0]}?)" if close else arg


def parse_widths(text: str) -> tuple[int, ...]:
    """'50,30,20' -> (50, 30, 20); '' -> () (a linear classifier)."""
    if text.strip() == "":
        return ()
    try:
        widths = tuple(int(w) for w in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers like 50,50, got {text!r}") from None
    if any(w <= 0 for w in widths):
        raise argparse.ArgumentTypeError(f"every width must be a positive integer, got {text!r}")
    return widths


def to_flag(key: str) -> str:
    """The flag of a TrainConfig key: n_batch -> --n-batch."""
    return "--" + key.replace("_", "-")


def at_least(args: argparse.Namespace, **lows: int) -> None:
    """UsageError naming the first flag given a value below its minimum (dest=minimum)."""
    for dest, low in lows.items():
        value = getattr(args, dest)
        if value is not None and value < low:
            raise UsageError(f"{to_flag(dest)} must be >= {low}, got {value}")


def add_config_flags(p: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig key (--n-batch for n_batch, --lambda for lam), default unset."""
    p.add_argument("--config", metavar="TOML",
                   help="read settings from a TOML file; flags override it")
    g = p.add_argument_group("settings (TOML keys are the flag names with _ for -)")
    for f in fields(TrainConfig):
        default = f.default if f.default is not MISSING else None
        help_text = f.metadata["help"]
        if not (default is None and "default" in help_text):  # else the help says it
            shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
            help_text += f" (default: {'unset' if default is None else shown})"
        kind = str(f.type).replace(" | None", "")
        kw: dict[str, Any] = {"dest": f.name, "default": None, "help": help_text}
        if kind == "bool":
            kw["action"] = argparse.BooleanOptionalAction
        elif kind.startswith("tuple"):
            kw.update(type=parse_widths, metavar="W1,W2,...")
        else:
            kw.update(type={"int": int, "float": float, "str": str}[kind],
                      choices=f.metadata.get("choices"))
        g.add_argument(to_flag(key_name(f)), **kw)


def flag_values(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given as flags, by TOML key (widths as lists, as TOML has them)."""
    given = {key_name(f): getattr(args, f.name, None) for f in fields(TrainConfig)}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in given.items() if v is not None}


def resolve_config(args: argparse.Namespace) -> TrainConfig:
    """TOML file (if any) overridden by the flags that were given; errors name the key."""
    values = dict(read_toml(args.config)) if args.config else {}
    flags = flag_values(args)
    if any(k in LENGTH_KEYS for k in flags):  # a length flag replaces the file's length
        values = {k: v for k, v in values.items() if k not in LENGTH_KEYS}
    return config_from({**values, **flags})


def config_from(values: dict[str, object], where: str = "") -> TrainConfig:
    """TrainConfig.from_dict, every failure a UsageError naming the key (and ``where``)."""
    with as_usage(where):
        return TrainConfig.from_dict(values)


def read_toml(path: str | Path, flag: str = "--config") -> dict[str, object]:
    """A TOML file's table; UsageError naming ``flag`` and the file if it cannot be read."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise UsageError(f"{flag}: cannot read {path}: {e.strerror or e}") from None
    except ValueError as e:  # TOMLDecodeError, UnicodeDecodeError, a NUL in the path
        raise UsageError(f"{flag}: {path} is not valid TOML: {e}") from None


def validate(cfg: TrainConfig) -> None:
    """UsageError unless ``cfg`` can be trained and config.toml as written reads back as it."""
    with as_usage():
        plan.validate(cfg)
    cannot = "these settings cannot be recorded in config.toml: "
    with as_usage(cannot):
        back = TrainConfig.from_dict(tomllib.loads(to_toml(cfg.to_dict())))
    if back != cfg:
        differ = [k for k, v in cfg.to_dict().items() if back.to_dict().get(k) != v]
        raise UsageError(f"{cannot}{differ}")


def check_writable(out: Path, flag: str = "--out") -> None:
    """Create the folder and write a probe file in it, before any output is written.

    A path that cannot be a folder (a file is in the way, an invalid name) is a
    UsageError; a folder that cannot be created or written (read-only, no permission,
    no space) an OutputError, exit 5, as the README's exit codes say.
    """
    try:
        out.mkdir(parents=True, exist_ok=True)
    except (OSError, ValueError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else e
        error = (OutputError if isinstance(e, OSError) and e.errno in
                 (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT)
                 else UsageError)
        raise error(f"{flag}: cannot create {out}: {reason}") from None
    try:
        fd, probe = tempfile.mkstemp(prefix=".klayer-probe-", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputError(f"{flag}: {out} is not writable: {e.strerror or e}") from None


@contextmanager
def removed_if_refused(out: Path, leave: tuple[str, ...] = ()) -> Iterator[None]:
    """Remove the folders of ``out`` made inside the block if the block raises (a run
    refused on a full disk writing config.toml leaves no empty folder behind); files
    named in ``leave`` (a lock) are removed with them, any other file keeps its folder."""
    made = [p for p in (out, *out.parents) if not p.exists()]  # deepest first
    try:
        yield
    except BaseException:
        for folder in made:
            for name in leave:
                (folder / name).unlink(missing_ok=True)
            try:
                folder.rmdir()
            except OSError:  # not empty, or already gone: keep what is there
                break
        raise


def lock_run_folder(out: Path, flag: str) -> Any:
    """Hold RUN_DIR/.klayer-train.lock: one process at a time writes a run folder
    (``klayer train``, ``klayer search best --retrain``, ``klayer experiment``)."""
    import filelock

    lock = filelock.FileLock(str(out / LOCK_NAME))
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        raise UsageError(f"{flag}: another klayer process is writing {out}") from None
    except OSError as e:
        raise UsageError(f"{flag}: cannot lock {out}: {e.strerror or e}") from None
    return lock


def how_stopped(e: Stopped, otherwise: str) -> str:
    """Where a training stopped: at a step, with a checkpoint, or at once (``otherwise``)."""
    if e.step is not None:
        return (f"interrupted by {e.name} after step {e.step} of {e.total}; checkpoint "
                f"{e.checkpoint}")
    return f"stopped at once by {e.name}; {otherwise}"


def command_line() -> str:
    """This command line, quoted for a shell (to print, or to run again)."""
    return shlex.join(["klayer", *sys.argv[1:]])
