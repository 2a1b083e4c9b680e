"""Crashes, signals and full or read-only disks against real `klayer train` processes.

Every interrupted run is resumed with `klayer train --resume` and compared with one
uninterrupted reference run: the weights, batch-norm statistics, optimizer state,
random-generator states and metrics (all but the wall-clock ``seconds``) must be equal
bit for bit. (Same machine, same thread count: the condition the README states.)
"""

from __future__ import annotations

import csv
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from klayer.cli.main import main
from klayer.training import checkpoint, modelfile
from klayer.training.runfolder import METRIC_FIELDS

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")

# 400 steps of 50 examples, an evaluation every 20 steps, a checkpoint every 50
ARGS = ["--dataset", "synthetic", "--hidden", "24,24", "--n-batch", "50", "--n-s", "100",
        "--cycles", "2", "--checkpoint-every", "50", "--dropout", "0.1", "--quiet"]
TOTAL, EVERY = 400, 20

# A `klayer train` that misbehaves on cue: ACTION AT ARGV...
#   SIGKILL / SIGTERM / SIGINT: send itself that signal as update AT starts
#   slow: sleep 3 ms per update (so another process can interrupt it)
#   kill-in-write: SIGKILL itself halfway through writing checkpoint AT
CHILD = """
import os, signal, sys, time
from klayer.training import checkpoint
from klayer.training import trainer as train
from klayer.cli.main import main

action, at, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
step = train.Trainer.step

def misbehaving_step(self):
    if action == "slow":
        time.sleep(0.003)
    elif action.startswith("SIG") and self.t == at:
        os.kill(os.getpid(), getattr(signal, action))
    return step(self)

train.Trainer.step = misbehaving_step
atomic_write = checkpoint.atomic_write

def dying_write(path, write):
    if action == "kill-in-write" and path.name == f"ckpt-{at:08d}.npz":
        def half(f):
            f.write(b"PK\\x03\\x04 the first bytes of a checkpoint")
            f.flush()
            os.fsync(f.fileno())
            os.kill(os.getpid(), signal.SIGKILL)
        return atomic_write(path, half)
    return atomic_write(path, write)

checkpoint.atomic_write = dying_write
sys.exit(main(argv))
"""


def klayer(*args: str, cwd: Path, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "klayer", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120, **kw)


def child(action: str, at: int, *args: str, cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", CHILD, action, str(at), *args], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(p: subprocess.Popen[str]) -> tuple[int, str]:
    _, err = p.communicate(timeout=120)
    return p.returncode, err


def steps(run: Path) -> list[int]:
    return [s for s, _ in checkpoint.list_checkpoints(run / "checkpoints")]


def wait_for_checkpoint(run: Path, p: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 60
    while not steps(run):
        assert p.poll() is None, p.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.01)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cwd = tmp_path_factory.mktemp("reference")
    r = klayer("train", *ARGS, "--out", "ref", cwd=cwd)
    assert r.returncode == 0, r.stderr
    return cwd / "ref"


def rows(run: Path) -> list[dict[str, str]]:
    with open(run / "metrics.csv", newline="") as f:
        return [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(f)]


def assert_same_run(ref: Path, run: Path) -> None:
    """Identical model, final checkpoint (all state) and metrics, bar wall-clock times."""
    a, _, _ = modelfile.load(ref / "model.npz")
    b, _, _ = modelfile.load(run / "model.npz")
    for k in a.params:
        np.testing.assert_array_equal(a.params[k], b.params[k], err_msg=k)
    for k in a.stats:
        np.testing.assert_array_equal(a.stats[k], b.stats[k], err_msg=k)
    assert a.bn_updates == b.bn_updates
    final = f"ckpt-{TOTAL:08d}.npz"
    sa = checkpoint.load(ref / "checkpoints" / final)
    sb = checkpoint.load(run / "checkpoints" / final)
    assert set(sa) == set(sb)
    seconds = METRIC_FIELDS.index("seconds")
    for k in sa:
        if k == "metrics":
            sa[k][:, seconds] = sb[k][:, seconds] = 0
        if k != "elapsed":
            np.testing.assert_array_equal(sa[k], sb[k], err_msg=k)
    assert rows(run) == rows(ref)
    assert [int(r["step"]) for r in rows(run)] == list(range(0, TOTAL + 1, EVERY))
    sum_a, sum_b = (json.loads((r / "summary.json").read_text()) for r in (ref, run))
    for k in ("wall_seconds", "steps_per_second"):
        del sum_a[k], sum_b[k]
    assert sum_a == sum_b


@pytest.fixture(autouse=True)
def no_plots(monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process runs skip the PNGs (a third of their time; not what is tested here)."""
    monkeypatch.setattr("klayer.report.plots.save_run_plots", lambda *a, **k: [])


def resume(run: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """`klayer train --resume RUN` in this process (faster than a new one): rc, out, err."""
    capsys.readouterr()
    rc = main(["train", "--resume", str(run)])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def killed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run killed with SIGKILL as update 137 started: checkpoints 50 and 100 on disk."""
    cwd = tmp_path_factory.mktemp("killed")
    rc, err = finish(child("SIGKILL", 137, "train", *ARGS, "--out", "run", cwd=cwd))
    assert rc == -signal.SIGKILL, err
    assert steps(cwd / "run") == [100, 50]
    return cwd / "run"


def killed_at_137(killed: Path, where: Path) -> Path:
    """A fresh copy of the killed run in ``where``."""
    return Path(shutil.copytree(killed, where / "run"))


# --- crashes ----------------------------------------------------------------------------


def test_kill_9_mid_run_then_resume_is_bit_identical(
        tmp_path: Path, reference: Path, killed: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = killed_at_137(killed, tmp_path)
    assert int(rows(run)[-1]["step"]) == 120  # metrics.csv was current at the crash
    rc, out, err = resume(run, capsys)
    assert rc == 0, err
    assert "from step 100 of 400" in out
    assert_same_run(reference, run)


def test_kill_9_from_outside_at_a_random_moment(
        tmp_path: Path, reference: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = child("slow", 0, "train", *ARGS, "--out", "run", cwd=tmp_path)
    run = tmp_path / "run"
    wait_for_checkpoint(run, p)
    time.sleep(float(np.random.default_rng().uniform(0, 0.2)))  # maybe mid-write
    p.send_signal(signal.SIGKILL)
    rc, err = finish(p)
    assert rc == -signal.SIGKILL, err
    rc, out, err = resume(run, capsys)
    assert rc == 0, err
    assert_same_run(reference, run)


def test_kill_9_during_a_checkpoint_write_resumes_from_the_previous(
        tmp_path: Path, reference: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, err = finish(child("kill-in-write", 100, "train", *ARGS, "--out", "run", cwd=tmp_path))
    assert rc == -signal.SIGKILL, err
    run = tmp_path / "run"
    assert steps(run) == [50]
    assert list((run / "checkpoints").glob(".ckpt-00000100.npz.*.tmp"))  # the half file
    rc, out, err = resume(run, capsys)
    assert rc == 0, err
    assert "from step 50 of 400" in out
    assert not list((run / "checkpoints").glob(".*.tmp"))
    assert_same_run(reference, run)


def test_killed_before_the_first_checkpoint_restarts_loudly(
        tmp_path: Path, reference: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, err = finish(child("kill-in-write", 50, "train", *ARGS, "--out", "run", cwd=tmp_path))
    assert rc == -signal.SIGKILL, err
    run = tmp_path / "run"
    assert steps(run) == []
    rc, out, err = resume(run, capsys)
    assert rc == 0, err
    assert "warning: no checkpoint" in err and "starting from step 0" in err
    assert_same_run(reference, run)


def test_corrupt_newest_checkpoint_falls_back_to_the_previous(
        tmp_path: Path, reference: Path, killed: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = killed_at_137(killed, tmp_path)
    newest = run / "checkpoints" / "ckpt-00000100.npz"
    raw = bytearray(newest.read_bytes())
    raw[len(raw) // 2] ^= 0x55
    newest.write_bytes(bytes(raw))
    rc, out, err = resume(run, capsys)
    assert rc == 0, err
    assert re.search(r"warning: corrupt checkpoint \S*ckpt-00000100\.npz.*falling back", err)
    assert "from step 50 of 400" in out
    assert_same_run(reference, run)


def test_all_checkpoints_corrupt_is_a_data_error_not_a_fresh_start(
        tmp_path: Path, killed: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = killed_at_137(killed, tmp_path)
    for p in (run / "checkpoints").glob("*.npz"):
        p.write_bytes(p.read_bytes()[:1000])
    for _ in range(2):  # and again: nothing was renamed away
        rc, out, err = resume(run, capsys)
        assert rc == 4, err
        assert "no usable checkpoint" in err and "ckpt-00000050.npz" in err
        assert "resuming" not in out and not (run / "model.npz").exists()


# --- signals ----------------------------------------------------------------------------


def test_sigterm_finishes_the_step_checkpoints_and_exits_143(
        tmp_path: Path, reference: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = child("slow", 0, "train", *ARGS, "--out", "run", cwd=tmp_path)
    run = tmp_path / "run"
    wait_for_checkpoint(run, p)
    p.send_signal(signal.SIGTERM)
    rc, err = finish(p)
    assert rc == 143, err
    m = re.search(r"interrupted by SIGTERM after step (\d+) of 400; checkpoint (\S+)", err)
    assert m, err
    assert steps(run)[0] == int(m.group(1)) and Path(tmp_path / m.group(2)).is_file()
    assert "resume with: klayer train --resume run" in err
    rc, out, err = resume(run, capsys)
    assert rc == 0, err
    assert f"from step {m.group(1)} of 400" in out
    assert_same_run(reference, run)


def test_sigint_exits_130_and_resumes(tmp_path: Path, reference: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    rc, err = finish(child("SIGINT", 77, "train", *ARGS, "--out", "run", cwd=tmp_path))
    assert rc == 130, err
    run = tmp_path / "run"
    assert steps(run) == [78, 50]  # update 77 finished first
    assert "klayer train --resume run" in err
    rc, out, err = resume(run, capsys)
    assert rc == 0, err
    assert_same_run(reference, run)


# --- full and read-only disks -------------------------------------------------------------


def snapshot(run: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in [run / "config.toml",
                                             *(run / "checkpoints").iterdir()]}


def limit_file_size() -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (16_000, 16_000))  # checkpoints are ~40 kB


def test_disk_full_is_a_clear_error_and_keeps_the_files(
        tmp_path: Path, reference: Path, killed: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = killed_at_137(killed, tmp_path)
    before = snapshot(run)
    r = klayer("train", "--resume", "run", cwd=tmp_path, preexec_fn=limit_file_size)
    assert r.returncode == 5, r.stderr
    assert "output error: cannot write" in r.stderr and "ckpt-00000150.npz" in r.stderr
    assert "File too large" in r.stderr and "klayer train --resume run" in r.stderr
    assert snapshot(run) == before  # no half files, no lost checkpoint
    steps_ = [int(r["step"]) for r in rows(run)]
    assert steps_ == sorted(set(steps_))
    rc, out, err = resume(run, capsys)  # space again: carries on as if nothing happened
    assert rc == 0, err
    assert_same_run(reference, run)


def test_disk_full_at_the_start_is_a_clear_error(tmp_path: Path) -> None:
    r = klayer("train", *ARGS, "--checkpoint-every", "1", "--out", "run", cwd=tmp_path,
               preexec_fn=limit_file_size)
    assert r.returncode == 5, r.stderr
    assert "cannot write" in r.stderr and "File too large" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("command", [["plot", "REF", "--out", "o"],
                                     ["evaluate", "REF/model.npz", "--out", "o"]])
def test_disk_full_while_writing_plots_is_a_clear_error(
        tmp_path: Path, reference: Path, command: list[str]) -> None:
    args = [str(reference) + a[3:] if a.startswith("REF") else a for a in command]
    r = klayer(*args, cwd=tmp_path, preexec_fn=limit_file_size)  # PNGs are > 16 kB
    assert r.returncode == 5, r.stderr
    assert "output error: cannot write" in r.stderr and "Traceback" not in r.stderr
    assert not [p.name for p in (tmp_path / "o").iterdir()]  # no partial PNG, no temp file


@pytest.mark.parametrize(("cut", "match"), [
    (lambda text: text[:500], "is not a row of numbers"),  # cut mid-row
    (lambda text: "", "no header with the columns step, train_loss"),
    (lambda text: text.splitlines()[0] + "\n", "no rows"),
    (lambda text: "hello,world\n1,2\n", "no header with the columns step, train_loss"),
    (lambda text: "step,loss\n0,1.5\n10,1.2\n", "no header with the columns train_loss"),
])
def test_plot_of_a_damaged_metrics_file_is_a_data_error(
        tmp_path: Path, reference: Path, cut: Any, match: str) -> None:
    run = tmp_path / "damaged"
    run.mkdir()
    (run / "metrics.csv").write_text(cut((reference / "metrics.csv").read_text()))
    r = klayer("plot", "damaged", "--out", "o", cwd=tmp_path)
    assert r.returncode == 4 and match in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "o").exists()


def test_train_never_replaces_another_runs_files(tmp_path: Path, reference: Path) -> None:
    run = Path(shutil.copytree(reference, tmp_path / "done"))
    shutil.rmtree(run / "checkpoints")
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    r = klayer("train", *ARGS, "--out", "done", cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    # issue 20: the same run, finished, is named as such with its test accuracy
    accuracy = json.loads((run / "summary.json").read_text())["test_accuracy"]
    assert f"already holds this run, finished (test accuracy {accuracy:.2%}); choose " \
        "another --out" in r.stderr, r.stderr
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before
    r = klayer("train", *ARGS, "--seed", "3", "--out", "done", cwd=tmp_path)
    assert r.returncode == 2
    assert "the model.npz and summary.json of another, finished run" in r.stderr, r.stderr
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before


def test_train_may_start_again_in_a_diverged_runs_folder(tmp_path: Path) -> None:
    base = ["--dataset", "synthetic", "--hidden", "8", "--steps", "30", "--schedule",
            "constant", "--checkpoint-every", "0", "--quiet", "--out", "run"]
    r = klayer("train", *base, "--eta", "1e6", cwd=tmp_path)
    assert r.returncode == 3, r.stderr  # diverged: config.toml and metrics.csv remain
    r = klayer("train", *base, "--eta", "0.01", cwd=tmp_path)  # as the message advises
    assert r.returncode == 0, r.stderr
    assert "eta = 0.01" in (tmp_path / "run" / "config.toml").read_text()


def _read_only_runner(folder: Path) -> list[str] | None:
    """A command prefix under which ``folder`` is read-only, or None if none works here."""
    if os.geteuid() != 0:
        return []  # chmod does it
    if shutil.which("unshare") is None:
        return None
    prefix = ["unshare", "-m", "--propagation", "private", "sh", "-c",
              'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && exec "$@"',
              str(folder)]
    probe = subprocess.run([*prefix, "sh", "-c", f"touch {folder}/probe"],
                           capture_output=True, text=True)
    if "Read-only file system" not in probe.stderr:
        return None
    return prefix


@pytest.fixture
def read_only_run(killed: Path) -> Iterator[tuple[Path, list[str]]]:
    """A run folder (checkpoints 50 and 100) that the command prefix makes read-only."""
    base = Path(tempfile.mkdtemp(prefix="klayer-ro-"))
    try:
        run = killed_at_137(killed, base)
        prefix = _read_only_runner(run)
        if prefix is None:
            pytest.skip("no way to make a read-only folder here (root without mount rights)")
        modes = []
        if not prefix:
            for p in (run, run / "checkpoints"):
                modes.append((p, p.stat().st_mode))
                p.chmod(0o555)
        yield run, prefix
        for p, mode in modes:
            p.chmod(mode)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_read_only_output_folder_is_refused_before_work(
        read_only_run: tuple[Path, list[str]]) -> None:
    run, prefix = read_only_run
    before = snapshot(run)
    for args in (["--resume", str(run)], [*ARGS, "--out", str(run / "new")]):
        r = subprocess.run([*prefix, sys.executable, "-m", "klayer", "train", *args],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 5, r.stderr  # an output error, as the README's exit codes say
        assert re.search(r"(not writable|cannot create).*(Read-only|Permission denied)",
                         r.stderr), r.stderr
        assert "Traceback" not in r.stderr
    assert snapshot(run) == before


# --- divergence and usage -------------------------------------------------------------


def test_divergence_exits_3_and_keeps_the_last_good_checkpoint(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    rc = main(["train", *ARGS, "--no-batch-norm", "--eta-max", "1e6", "--checkpoint-every",
               "1", "--out", "run"])
    err = capsys.readouterr().err
    assert rc == 3, err
    assert "diverged" in err and "smaller eta_max" in err
    m = re.search(r"the last good checkpoint, (\S+), is kept", err)
    assert m, err
    assert checkpoint.load(m.group(1))  # intact and loadable
    assert rows(tmp_path / "run")  # the metrics so far are on disk


@pytest.mark.parametrize(("args", "match"), [
    (["--resume", "run", "--eta-max", "0.2"], "drop --eta-max"),
    (["--resume", "run", "--out", "x"], "drop --out"),
    (["--resume", "run", "--config", "c.toml"], "drop --config"),
    (["--resume", "nowhere"], "nowhere/config.toml not found"),
    (["--dataset", "synthetic", "--out", "run"], "holds another run's checkpoints"),
    ([*ARGS, "--out", "run"], "holds this run, stopped before its end; continue it with "
                              "`klayer train --resume run`"),
])
def test_resume_usage_errors_exit_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str], killed: Path,
                                    args: list[str], match: str) -> None:
    killed_at_137(killed, tmp_path)
    monkeypatch.chdir(tmp_path)
    assert main(["train", *args]) == 2
    assert match in capsys.readouterr().err


def test_resume_may_switch_strict_checksums_on(
        tmp_path: Path, reference: Path, killed: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = killed_at_137(killed, tmp_path)
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--strict-checksums"]) == 0, capsys.readouterr()
    assert "strict_checksums = true" in (run / "config.toml").read_text()
    a, _, _ = modelfile.load(reference / "model.npz")  # a data check: the same training
    b, _, _ = modelfile.load(run / "model.npz")
    for k in a.params:
        np.testing.assert_array_equal(a.params[k], b.params[k], err_msg=k)


def test_one_process_at_a_time_writes_a_run_folder(
        tmp_path: Path, killed: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import filelock

    run = killed_at_137(killed, tmp_path)
    with filelock.FileLock(str(run / ".klayer-train.lock")):  # as a running klayer would
        rc, _, err = resume(run, capsys)
    assert rc == 2 and "another klayer process is writing" in err, err
    assert steps(run) == [100, 50]


def test_resume_refuses_an_edited_config(tmp_path: Path, killed: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    run = killed_at_137(killed, tmp_path)
    toml = run / "config.toml"
    toml.write_text(toml.read_text().replace("eta_max = 0.1", "eta_max = 0.2"))
    rc, _, err = resume(run, capsys)
    assert rc == 2 and "eta_max = 0.1 there, 0.2 here" in err, err


def test_resume_of_a_finished_run_rewrites_the_same_results(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = ["--dataset", "synthetic", "--hidden", "8", "--steps", "30", "--schedule",
           "constant", "--quiet", "--out", "run"]
    assert main(["train", *cfg]) == 0
    model = (tmp_path / "run" / "model.npz").read_bytes()
    assert main(["train", "--resume", "run"]) == 0
    a, _, _ = modelfile.load(tmp_path / "run" / "model.npz")
    (tmp_path / "old.npz").write_bytes(model)
    b, _, _ = modelfile.load(tmp_path / "old.npz")
    for k in a.params:
        np.testing.assert_array_equal(a.params[k], b.params[k])


def test_closed_output_pipe_stops_quietly(tmp_path: Path) -> None:
    p = subprocess.Popen([sys.executable, "-m", "klayer", "gradcheck", "--hidden", "5",
                          "--json"], cwd=tmp_path, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    assert p.stdout is not None
    p.stdout.close()  # as `klayer ... | head` does once it has read enough
    _, err = p.communicate(timeout=120)
    assert p.returncode == 141, err
    assert "Traceback" not in err and "BrokenPipe" not in err, err


def test_ctrl_c_outside_train_is_a_one_line_stop(tmp_path: Path) -> None:
    code = ("import sys; from klayer.cli.main import main; print('imported', flush=True); "
            "sys.exit(main(['gradcheck', '--hidden', '300,300', '--dim', '200']))")  # minutes
    p = subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert p.stdout is not None
    assert p.stdout.readline() == "imported\n"
    time.sleep(1)  # into the check, which runs for minutes
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    assert err.strip() == "klayer gradcheck: interrupted", err


def test_disk_full_during_an_experiment_is_a_clear_error(tmp_path: Path) -> None:
    r = klayer("experiment", "bn-placement", "--dataset", "synthetic", "--quick", "--out", "rep",
               cwd=tmp_path, preexec_fn=limit_file_size)  # its figure is > 16 kB
    assert r.returncode == 5, r.stderr
    assert "output error: cannot write" in r.stderr and "Traceback" not in r.stderr
    assert not list((tmp_path / "rep").rglob("*.png"))  # no partial figure


def test_train_into_a_closed_pipe_checkpoints_and_stops(tmp_path: Path, reference: Path,
                                                        capsys: pytest.CaptureFixture[str]
                                                        ) -> None:
    args = [a for a in ARGS if a != "--quiet"]  # a line per evaluation on stdout
    p = subprocess.Popen([sys.executable, "-m", "klayer", "train", *args, "--out", "run"],
                         cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    assert p.stdout is not None
    p.stdout.readline()
    p.stdout.close()  # `klayer train ... | head -1`
    _, err = p.communicate(timeout=120)
    assert p.returncode == 141, err
    assert "interrupted by SIGPIPE" in err and "Traceback" not in err, err
    assert steps(tmp_path / "run")  # its progress is kept ...
    rc, _, err = resume(tmp_path / "run", capsys)  # ... and it carries on to the same end
    assert rc == 0, err
    assert_same_run(reference, tmp_path / "run")
