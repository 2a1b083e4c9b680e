"""The ``klayer`` command line. The only module that exits; nothing imports it.

Exit codes: 0 ok, 1 a check failed (``klayer gradcheck``'s FAIL), 2 usage (bad flag or
config value, a file of another klayer format: FormatError), 3 diverged training, 4 data
(missing, corrupt or foreign file), 5 output (the run folder cannot be written: read-only,
disk full), 130 / 143 interrupted by SIGINT / SIGTERM, 141 the output pipe closed
(``klayer ... | head``).
Each subcommand lives in a ``cli_*`` module as an ``add_*_args`` / ``run_*`` pair.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from klayer import __version__
from klayer.cli.common import (
    EXIT_DATA,
    EXIT_DIVERGED,
    EXIT_OUTPUT,
    EXIT_SIGINT,
    EXIT_SIGPIPE,
    EXIT_USAGE,
    Command,
    Parser,
    UsageError,
)
from klayer.core import kernels

# Each cli_* module contributes a COMMANDS dict: name -> (help, add_arguments, run).
_MODULES = ("train", "tools", "experiment", "search", "gradcheck")


def _commands() -> dict[str, Command]:
    import importlib

    commands: dict[str, Command] = {}
    for name in _MODULES:
        commands.update(importlib.import_module(f"{__package__}.{name}").COMMANDS)
    return commands


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="klayer",
        description="k-layer fully-connected networks with batch normalization, in NumPy.",
        epilog="exit codes: 0 ok, 1 check failed, 2 usage, 3 diverged, 4 data, 5 output, "
               "130/143 interrupted, 141 output pipe closed",
    )
    parser.add_argument("--version", action="version",
                        version=f"klayer {__version__} (kernels: {kernels.BACKEND})")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, add_args, run) in _commands().items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_args(p)
        p.set_defaults(run=run)
    return parser


def _one_line_warning(message: Warning | str, category: type[Warning], filename: str,
                      lineno: int, file: object = None, line: str | None = None) -> None:
    print(f"klayer: warning: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    import warnings

    warnings.showwarning = _one_line_warning  # users need the message, not our source line
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    from klayer.data.batchfile import DataError
    from klayer.data.files import FormatError, ModelFileError
    from klayer.training.runfolder import OutputError
    from klayer.training.stop import Stopped
    from klayer.training.trainer import Diverged

    try:
        return int(args.run(args))
    except (UsageError, FormatError) as e:  # FormatError: a refusal, not damage
        print(f"klayer {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (DataError, ModelFileError) as e:
        print(f"klayer {args.command}: data error: {e}", file=sys.stderr)
        return EXIT_DATA
    except Diverged as e:
        print(f"klayer {args.command}: diverged: {e}", file=sys.stderr)
        return EXIT_DIVERGED
    except OutputError as e:
        print(f"klayer {args.command}: output error: {e}", file=sys.stderr)
        return EXIT_OUTPUT
    except Stopped as e:  # a stop no command reported more precisely
        print(f"\nklayer {args.command}: interrupted by {e.name}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:  # Ctrl-C where no stop handler was installed
        print(f"\nklayer {args.command}: interrupted", file=sys.stderr)
        return EXIT_SIGINT
    except BrokenPipeError:  # the reader went away (`klayer ... | head`): stop quietly
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit
        return EXIT_SIGPIPE


if __name__ == "__main__":
    sys.exit(main())
