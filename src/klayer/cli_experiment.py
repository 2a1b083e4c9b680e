"""``klayer experiment``: the assignment report's named experiments."""

from __future__ import annotations

from .cli_common import Command

COMMANDS: dict[str, Command] = {}
