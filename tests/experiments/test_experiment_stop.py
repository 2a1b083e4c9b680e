"""A stopped `klayer experiment` stops its workers at once, keeps the trainings it
finished, and the same command goes on from them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from klayer.experiments.runner import Context

# 4 configurations x 4 seeds of quick trainings on synthetic data, 2 at a time
ARGS = ("experiment", "bn-depth", "--dataset", "synthetic", "--quick", "--seeds", "4",
        "--jobs", "2", "--out", "o")


def start(cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "klayer", *ARGS], cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)  # its own process group, as in a shell


def stop_after(p: subprocess.Popen[str], done: int, signum: int, group: bool) -> str:
    """Signal the run once ``done`` trainings have ended; its whole output."""
    assert p.stdout is not None
    seen, lines = 0, []
    for line in p.stdout:
        lines.append(line)
        seen += line.lstrip().startswith("[")
        if seen == done:
            os.killpg(p.pid, signum) if group else p.send_signal(signum)
            break
    lines.append(p.stdout.read())
    p.wait(timeout=30)
    return "".join(lines)


def group_ends(pgid: int, timeout: float = 15.0) -> bool:
    """Whether every process of the group (the workers included) is gone in time."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def gone(pid: int) -> bool:
    """Whether process ``pid`` has ended (a zombie not yet reaped counts as ended)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    except OSError:  # no /proc: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False
    return state in ("Z", "X")


def kept(cwd: Path) -> dict[str, float]:
    return {p.name: json.loads(p.read_text())["outcome"]["summary"]["test_accuracy"]
            for p in (cwd / "o" / "trainings").glob("*.json")}


def test_ctrl_c_and_sigterm_stop_the_workers_and_the_run_goes_on(tmp_path: Path) -> None:
    p = start(tmp_path)
    out = stop_after(p, 3, signal.SIGINT, group=True)  # Ctrl-C reaches the whole group
    assert p.returncode == 130, out
    assert group_ends(p.pid), "worker processes outlived the stop"
    first = kept(tmp_path)
    assert 3 <= len(first) < 16
    again = "klayer " + " ".join(ARGS)
    assert f"the {len(first)} finished training(s) in o/trainings are kept" in out
    assert f"continue with: {again}" in out

    p = start(tmp_path)
    out = stop_after(p, len(first) + 2, signal.SIGTERM, group=False)  # the parent alone
    assert p.returncode == 143, out
    assert out.count("read back: trained before") == len(first)
    assert group_ends(p.pid), "worker processes outlived SIGTERM"
    second = kept(tmp_path)
    assert len(second) >= len(first) + 2 and first.items() <= second.items()

    p = start(tmp_path)
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out
    assert out.count("read back: trained before") == len(second)
    assert "16 training(s)" in out and (tmp_path / "o" / "report.html").is_file()

    whole = tmp_path / "whole"  # never stopped: the same trainings, the same results
    whole.mkdir()
    r = subprocess.run([sys.executable, "-m", "klayer", *ARGS], cwd=whole, text=True,
                       capture_output=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert kept(whole) == kept(tmp_path)


def test_a_kept_training_is_read_back_and_a_damaged_one_trained_again(tmp_path: Path) -> None:
    logs: list[str] = []
    ctx = Context(base={"dataset": "synthetic", "seed": 0}, quick=True, out=tmp_path,
                  log=logs.append, keep=True)
    jobs = [(f"seed {s}", ctx.config({}, s), None, True) for s in (0, 1, 2)]
    first = ctx.map_jobs(jobs)
    files = sorted((tmp_path / "trainings").glob("*.json"))
    assert len(files) == 3

    logs.clear()
    assert [o.summary for o in ctx.map_jobs(jobs)] == [o.summary for o in first]
    assert sum("read back: trained before" in m for m in logs) == 3

    files[0].write_text(files[0].read_text()[:40])  # cut short, as by a full disk
    files[1].write_text(files[2].read_text())  # another training's file under its name
    logs.clear()
    again = ctx.map_jobs(jobs)
    assert sum("read back: trained before" in m for m in logs) == 1
    assert sum("cannot be read back" in m for m in logs) == 2, logs
    assert any("made by another training" in m for m in logs)
    assert [o.summary["test_accuracy"] for o in again] == [
        o.summary["test_accuracy"] for o in first]
    assert json.loads(files[0].read_text())["outcome"]["seed"] == first[0].seed  # rewritten

    other = [("seed 0", ctx.config({"lambda": 0.1}, 0), None, True)]  # any other setting
    ctx.map_jobs(other)
    assert len(list((tmp_path / "trainings").glob("*.json"))) == 4


def test_an_aborted_pool_drops_its_queue_and_stops_its_workers_at_once(tmp_path: Path) -> None:
    import multiprocessing

    ctx = Context(base={}, jobs=2, out=tmp_path)
    pool = ctx._executor()
    for _ in range(4):  # two running, two queued
        pool.submit(time.sleep, 60)
    end = time.monotonic() + 60
    while len(multiprocessing.active_children()) < 2 and time.monotonic() < end:
        time.sleep(0.05)
    workers = [w.pid for w in multiprocessing.active_children()]
    assert len(workers) == 2
    start = time.monotonic()
    ctx.close(abort=True)
    assert time.monotonic() - start < 10  # not the 2 x 60 s the work would take
    assert all(gone(pid) for pid in workers)  # (a process object may not know yet)


def test_a_second_sigterm_during_the_stop_changes_nothing(tmp_path: Path) -> None:
    p = start(tmp_path)
    assert p.stdout is not None
    for line in p.stdout:
        if line.lstrip().startswith("["):
            p.send_signal(signal.SIGTERM)
            p.send_signal(signal.SIGTERM)  # as from an impatient supervisor
            break
    out = line + p.stdout.read()
    assert p.wait(timeout=30) == 143, out
    assert "continue with: klayer experiment" in out
    assert group_ends(p.pid), "worker processes outlived a double SIGTERM"


def test_an_output_error_stops_the_workers_at_once(tmp_path: Path) -> None:
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "trainings").write_text("a file where the folder goes")
    args = [a if a != "4" else "40" for a in ARGS]  # 160 trainings: minutes if all ran
    begin = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "klayer", *args], cwd=tmp_path, text=True,
                       capture_output=True, timeout=600)
    assert r.returncode == 5 and "trainings" in r.stderr, r.stderr
    assert time.monotonic() - begin < 20, "the queued trainings ran before the error"


def test_kept_trainings_of_other_data_are_not_read_back(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    from conftest_data_helpers import make_cifar_folder

    from klayer.cli.main import main

    folder = tmp_path / "cifar" / "cifar-10-batches-py"
    make_cifar_folder(folder, rows=400)
    args = ["experiment", "bn-placement", "--quick", "--data-dir", str(tmp_path / "cifar"),
            "--out", str(tmp_path / "o")]
    assert main(args) == 0
    assert main(args) == 0
    assert capsys.readouterr().out.count("read back: trained before") == 4
    make_cifar_folder(folder, rows=400, seed=1)  # other images in the same files
    assert main(args) == 0
    assert "read back" not in capsys.readouterr().out


def test_an_interrupted_wait_for_the_pool_still_stops_its_workers(tmp_path: Path) -> None:
    import multiprocessing

    ctx = Context(base={}, jobs=2, out=tmp_path)
    pool = ctx._executor()
    for _ in range(2):
        pool.submit(time.sleep, 60)
    end = time.monotonic() + 60
    while len(multiprocessing.active_children()) < 2 and time.monotonic() < end:
        time.sleep(0.05)
    workers = [w.pid for w in multiprocessing.active_children()]

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.5)  # Ctrl-C while close() waits for the work
        start = time.monotonic()
        try:
            ctx.close()
        except KeyboardInterrupt:
            pass
        else:
            raise AssertionError("close() returned before the interrupt")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert time.monotonic() - start < 15
    assert len(workers) == 2 and all(gone(pid) for pid in workers)


def test_seed_moves_the_first_seed(tmp_path: Path) -> None:
    from klayer.cli.main import main

    out = tmp_path / "o"
    assert main(["experiment", "bn-placement", "--dataset", "synthetic", "--quick",
                 "--seed", "5", "--seeds", "2", "--out", str(out)]) == 0
    assert "| 5,6 |" in (out / "report.md").read_text()
    assert Context(base={"seed": 5}, seeds=2).seed_range() == range(5, 7)
