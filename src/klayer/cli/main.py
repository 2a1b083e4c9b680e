"""The ``klayer`` command line. The only module that exits; nothing imports it.

Exit codes: 0 ok, 1 a check failed (``klayer gradcheck``'s FAIL, ``klayer check``'s
disagreement), 2 usage (bad flag or
config value, a file of another klayer format: FormatError), 3 diverged training, 4 data
(missing, corrupt or foreign file), 5 output (the run folder cannot be written: read-only,
disk full), 6 a search worker's storage stayed unreachable past --storage-timeout,
130 / 143 interrupted by SIGINT / SIGTERM, 141 the output pipe closed
(``klayer ... | head``).
Each subcommand module has a COMMANDS dict: name -> (help, add_arguments, run).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings
from collections.abc import Sequence

from klayer import __version__
from klayer.check.files import CheckFileError
from klayer.cli import common
from klayer.cli.common import Parser, UsageError
from klayer.core import kernels
from klayer.data.batchfile import DataError
from klayer.data.files import FormatError, ModelFileError
from klayer.training.runfolder import OutputError
from klayer.training.stop import Stopped
from klayer.training.trainer import Diverged

_MODULES = ("train", "tools", "experiment", "search", "gradcheck", "check")
# the errors a command may end with: how its message names each, and the exit code
_ERRORS: dict[type[Exception], tuple[str, int]] = {
    UsageError: ("error", common.EXIT_USAGE),
    FormatError: ("error", common.EXIT_USAGE),  # a refusal, not damage
    DataError: ("data error", common.EXIT_DATA),
    ModelFileError: ("data error", common.EXIT_DATA),
    CheckFileError: ("data error", common.EXIT_DATA),
    Diverged: ("diverged", common.EXIT_DIVERGED),
    OutputError: ("output error", common.EXIT_OUTPUT),
}


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="klayer",
        description="k-layer fully-connected networks with batch normalization, in NumPy.",
        epilog="exit codes: 0 ok, 1 check failed, 2 usage, 3 diverged, 4 data, 5 output, "
               "6 storage unreachable, 130/143 interrupted, 141 output pipe closed",
    )
    parser.add_argument("--version", action="version",
                        version=f"klayer {__version__} (kernels: {kernels.BACKEND}, "
                                f"matrix products: {kernels.matmul_isa()})")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in _MODULES:
        commands = importlib.import_module(f"{__package__}.{module}").COMMANDS
        for name, (help_text, add_args, run) in commands.items():
            p = sub.add_parser(name, help=help_text, description=help_text)
            add_args(p)
            p.set_defaults(run=run)
    return parser


def _one_line_warning(message: Warning | str, category: type[Warning], filename: str,
                      lineno: int, file: object = None, line: str | None = None) -> None:
    print(f"klayer: warning: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    warnings.showwarning = _one_line_warning  # users need the message, not our source line
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return common.EXIT_USAGE
    try:
        return int(args.run(args))
    except tuple(_ERRORS) as e:
        label, code = next(v for kind, v in _ERRORS.items() if isinstance(e, kind))
        print(f"klayer {args.command}: {label}: {e}", file=sys.stderr)
        return code
    except Stopped as e:  # a stop no command reported more precisely
        print(f"\nklayer {args.command}: interrupted by {e.name}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:  # Ctrl-C where no stop handler was installed
        print(f"\nklayer {args.command}: interrupted", file=sys.stderr)
        return common.EXIT_SIGINT
    except BrokenPipeError:  # the reader went away (`klayer ... | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit
        return common.EXIT_SIGPIPE


if __name__ == "__main__":
    sys.exit(main())
