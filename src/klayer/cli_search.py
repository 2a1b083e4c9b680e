"""``klayer search``: hyperparameter studies on Optuna."""

from __future__ import annotations

from .cli_common import Command

COMMANDS: dict[str, Command] = {}
