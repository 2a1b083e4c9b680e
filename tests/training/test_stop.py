"""The one stop mechanism (klayer.training.stop): what a signal does where."""

from __future__ import annotations

import os
import signal
import time

import pytest

from klayer.training.stop import Stopped, StopSignals


def _signal(signum: int) -> None:
    os.kill(os.getpid(), signum)
    time.sleep(0.2)  # the handler runs here


def test_a_first_signal_is_only_recorded_and_the_handlers_come_back() -> None:
    before = signal.getsignal(signal.SIGTERM)
    with StopSignals() as stop:
        _signal(signal.SIGTERM)
        assert stop() == signal.SIGTERM  # polled by the trainer
        with pytest.raises(Stopped) as e:
            stop.check()
    assert e.value.exit_code == 143 and e.value.name == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) == before


def test_a_second_signal_stops_at_once() -> None:
    with StopSignals() as stop, pytest.raises(Stopped) as e:
        _signal(signal.SIGINT)
        _signal(signal.SIGTERM)
    assert stop.signum == signal.SIGINT and e.value.exit_code == 130


def test_armed_raises_at_once_and_held_waits_for_the_block_end() -> None:
    with StopSignals() as stop:
        with pytest.raises(Stopped), stop.armed():
            _signal(signal.SIGINT)
            pytest.fail("not reached")
    order = []
    with StopSignals() as stop, pytest.raises(Stopped):
        with stop.armed():
            with stop.held():
                _signal(signal.SIGTERM)
                _signal(signal.SIGTERM)  # a second one is held too
                order.append("held block ran to its end")
            order.append("not reached")
    assert order == ["held block ran to its end"]


def test_a_request_made_before_an_armed_block_stops_it_and_held_clean_up_runs() -> None:
    with StopSignals() as stop:
        stop.request(signal.SIGPIPE)
        with pytest.raises(Stopped) as e, stop.armed():
            pytest.fail("not reached")
        with stop.held():  # clean-up after the stop: more signals change nothing
            _signal(signal.SIGINT)
    assert e.value.exit_code == 141


def test_the_notice_says_what_happens_next(capfd: pytest.CaptureFixture[str]) -> None:
    with StopSignals("got {name}: stopping at the next step\n"):
        _signal(signal.SIGINT)
    assert "got SIGINT: stopping at the next step" in capfd.readouterr().err
