"""Pieces shared by the ``klayer`` subcommands: errors, exit codes, flag parsing, output checks."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import MISSING, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from klayer.core.config import TrainConfig

Command = tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]

EXIT_OK, EXIT_USAGE, EXIT_DIVERGED, EXIT_DATA, EXIT_OUTPUT = 0, 2, 3, 4, 5
EXIT_SIGINT, EXIT_SIGTERM, EXIT_SIGPIPE = 130, 143, 141  # 128 + the signal's number


class UsageError(Exception):
    """A flag or configuration value is invalid (exit code 2)."""


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
        import difflib

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
            f"expected comma-separated integers like 50,50, got {text!r}"
        ) from None
    if any(w <= 0 for w in widths):
        raise argparse.ArgumentTypeError(f"every width must be a positive integer, got {text!r}")
    return widths


def add_config_flags(p: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig key (--n-batch for n_batch, --lambda for lam), default unset."""
    from klayer.core.config import TrainConfig, key_name

    p.add_argument("--config", metavar="TOML",
                   help="read settings from a TOML file; flags override it")
    g = p.add_argument_group("settings (TOML keys are the flag names with _ for -)")
    for f in fields(TrainConfig):
        flag = "--" + key_name(f).replace("_", "-")
        default = f.default if f.default is not MISSING else None
        help_text = f.metadata["help"]
        if not (default is None and "default" in help_text):  # else the help says it
            help_text += f" (default: {_show(default)})"
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
    from klayer.core.config import LENGTH_KEYS, TrainConfig, key_name

    values: dict[str, object] = {}
    if args.config:
        values.update(read_toml(args.config))
    flags = {key_name(f): getattr(args, f.name) for f in fields(TrainConfig)
             if getattr(args, f.name, None) is not None}
    if any(k in LENGTH_KEYS for k in flags):  # a length flag replaces the file's length
        values = {k: v for k, v in values.items() if k not in LENGTH_KEYS}
    values.update(flags)
    return config_from(values)


def config_from(values: dict[str, object], where: str = "") -> TrainConfig:
    """TrainConfig.from_dict, every failure a UsageError naming the key (and ``where``)."""
    from klayer.core.config import TrainConfig

    try:
        return TrainConfig.from_dict(values)
    except (ValueError, TypeError) as e:
        raise UsageError(f"{where}{e}") from None


def read_toml(path: str | Path, flag: str = "--config") -> dict[str, object]:
    """A TOML file's table; UsageError naming ``flag`` and the file if it cannot be read."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise UsageError(f"{flag}: cannot read {path}: {e.strerror or e}") from None
    except ValueError as e:  # TOMLDecodeError, UnicodeDecodeError, a NUL in the path
        raise UsageError(f"{flag}: {path} is not valid TOML: {e}") from None


def toml_round_trips(cfg: TrainConfig) -> None:
    """UsageError unless config.toml as written reads back as exactly ``cfg``."""
    from klayer.core.config import TrainConfig, to_toml

    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    try:
        back = TrainConfig.from_dict(tomllib.loads(to_toml(cfg.to_dict())))
    except (ValueError, TypeError) as e:
        raise UsageError(f"these settings cannot be recorded in config.toml: {e}") from None
    if back != cfg:
        differ = [k for k, v in cfg.to_dict().items() if back.to_dict().get(k) != v]
        raise UsageError(f"these settings cannot be recorded in config.toml: {differ}")


def check_writable(out: Path, flag: str = "--out") -> None:
    """Create the folder and write a probe file in it, before any output is written.

    A path that cannot be a folder (a file is in the way, an invalid name) is a
    UsageError; a folder that cannot be created or written (read-only, no permission,
    no space) an OutputError, exit 5, as the README's exit codes say.
    """
    import errno
    import tempfile

    from klayer.training.runfolder import OutputError

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


def command_line() -> str:
    """This command line, quoted for a shell (to print, or to run again)."""
    return shlex.join(["klayer", *sys.argv[1:]])
