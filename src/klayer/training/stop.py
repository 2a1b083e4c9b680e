"""The one stop mechanism of `train`, `experiment` and `search`: one signal handler, one
exception.

The first SIGINT or SIGTERM is recorded as a stop request. Work that can stop cleanly
polls it (the trainer checkpoints before its next step, then raises ``Stopped``). Inside
``armed()`` (waiting on a pool or a poll interval) the signal raises ``Stopped`` at once;
inside ``held()`` (a storage write, a final report) it waits for the block's end. A
second signal raises at once wherever nothing holds it, so two Ctrl-C always stop.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Stopped(BaseException):
    """A stop asked for by a signal; ``exit_code`` is 128 + its number (130, 143).

    A BaseException, so that no ``except Exception`` swallows it. When the trainer
    raised it, ``step``/``total`` say how far it got and ``checkpoint`` what it saved.
    """

    def __init__(self, signum: int, step: int | None = None, total: int | None = None,
                 checkpoint: Path | None = None) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum, self.step, self.total, self.checkpoint = signum, step, total, checkpoint

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name


class StopSignals:
    """While entered (in the main thread), SIGINT and SIGTERM request a stop; the old
    handlers come back on exit. Calling it answers the request: 0, or the signal.

    ``notice`` (with ``{name}`` for the signal's) is written to stderr when a first
    signal is only recorded, to say what happens next.
    """

    def __init__(self, notice: str = "") -> None:
        self.notice = notice
        self.signum = 0
        self._armed = 0
        self._held = 0
        self._old: dict[int, Any] = {}

    def __call__(self) -> int:
        return self.signum

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old.clear()

    def request(self, signum: int) -> None:
        """Ask for a stop as if ``signum`` had arrived (a broken pipe, say)."""
        self.signum = self.signum or signum

    def _handle(self, signum: int, frame: object) -> None:
        again = bool(self.signum)
        self.request(signum)
        if not self._held and (self._armed or again):
            raise Stopped(self.signum)
        if self.notice and not again:
            os.write(2, self.notice.format(name=signal.Signals(signum).name).encode())

    def check(self) -> None:
        """Raise ``Stopped`` if a stop was requested."""
        if self.signum:
            raise Stopped(self.signum)

    @contextmanager
    def armed(self) -> Iterator[None]:
        """A block that a signal ends at once (after a request made before it, too)."""
        self.check()
        self._armed += 1
        try:
            yield
        finally:
            self._armed -= 1

    @contextmanager
    def held(self) -> Iterator[None]:
        """A block no signal cuts short; a stop requested in it is raised after it when
        the block sits inside ``armed()``."""
        self._held += 1
        try:
            yield
        finally:
            self._held -= 1
        if self._armed and not self._held:
            self.check()
