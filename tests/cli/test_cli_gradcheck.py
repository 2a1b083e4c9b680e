"""`klayer gradcheck` end to end, in a subprocess as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def klayer(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "klayer", *args], capture_output=True,
                          text=True, timeout=120)


def test_nine_layer_batch_norm_json() -> None:
    r = klayer("gradcheck", "--hidden", "50,30,20,20,10,10,10,10", "--batch-norm", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    names = [p["name"] for p in doc["params"]]
    assert names[:4] == ["W1", "b1", "gamma1", "beta1"] and names[-2:] == ["W9", "b9"]
    assert len(names) == 8 * 4 + 2
    for p in doc["params"]:
        assert p["max_rel_error"] <= 1e-6, p
        assert p["max_abs_error"] <= 1e-9, p
        assert p["checked"] == p["shape"][0] * (p["shape"][1] if len(p["shape"]) > 1 else 1)


def test_table_output_and_usage_errors() -> None:
    r = klayer("gradcheck", "--hidden", "8", "--dim", "5", "--n", "4")
    assert r.returncode == 0 and "max relative error" in r.stdout and "W2" in r.stdout
    bad = klayer("gradcheck", "--hidden", "8,0")
    assert bad.returncode == 2 and "--hidden" in bad.stderr
    for args, match in ((["--lambda", "-1"], "--lambda must be a finite number >= 0"),
                        (["--lambda", "nan"], "--lambda must be"),
                        (["--sample", "0"], "--sample must be >= 1"),
                        (["--seed", "-1"], "--seed must be >= 0"),
                        (["--h", "0"], "--h must be"), (["--h", "nan"], "--h must be")):
        bad = klayer("gradcheck", "--hidden", "8", *args)
        assert bad.returncode == 2 and match in bad.stderr, (args, bad.stderr)
        assert "Traceback" not in bad.stderr


def test_batch_norm_is_the_default_as_in_train() -> None:
    r = klayer("gradcheck", "--hidden", "8", "--dim", "5", "--n", "4", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["config"]["batch_norm"] is True and "gamma1" in {p["name"] for p in doc["params"]}
    r = klayer("gradcheck", "--hidden", "8", "--dim", "5", "--n", "4", "--no-batch-norm", "--json")
    assert r.returncode == 0, r.stderr
    assert "gamma1" not in {p["name"] for p in json.loads(r.stdout)["params"]}
    one = klayer("gradcheck", "--hidden", "8", "--n", "1")  # one example: no batch statistics
    assert one.returncode == 2 and "--no-batch-norm" in one.stderr, one.stderr


def test_a_correct_net_passes_with_the_default_tol() -> None:
    r = klayer("gradcheck", "--hidden", "8", "--dim", "5", "--n", "4")
    assert r.returncode == 0, r.stderr
    last = r.stdout.strip().splitlines()[-1]
    assert last.startswith("PASS: max relative error ") and "<= tol 1e-06" in last, last
    r = klayer("gradcheck", "--hidden", "8", "--dim", "5", "--n", "4", "--json")
    doc = json.loads(r.stdout)
    assert (doc["verdict"], doc["tol"]) == ("PASS", 1e-6)
    assert doc["worst"] in {p["name"] for p in doc["params"]}


def test_a_tol_below_the_errors_fails_with_exit_1() -> None:
    r = klayer("gradcheck", "--hidden", "8", "--dim", "5", "--n", "4", "--tol", "1e-15")
    assert r.returncode == 1, r.stderr
    last = r.stdout.strip().splitlines()[-1]
    assert last.startswith("FAIL: max relative error ") and last.endswith("> tol 1e-15"), last
    r = klayer("gradcheck", "--hidden", "8", "--dim", "5", "--n", "4", "--tol", "1e-15",
               "--json")
    assert r.returncode == 1 and json.loads(r.stdout)["verdict"] == "FAIL"
    for bad in ("0", "-1", "nan", "inf"):
        r = klayer("gradcheck", "--hidden", "8", "--tol", bad)
        assert r.returncode == 2 and "--tol must be a positive number" in r.stderr, r.stderr
    assert "1 FAIL" in klayer("gradcheck", "--help").stdout


def test_a_wrong_gradient_fails_with_exit_1(monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    import klayer.core.layers as layers_mod
    from klayer.cli.main import main

    real = layers_mod.batchnorm_backward

    def off_by_a_bit(dy, cache, gamma):  # type: ignore[no-untyped-def]
        ds, dg, db = real(dy, cache, gamma)
        return ds * 1.001, dg, db

    monkeypatch.setattr(layers_mod, "batchnorm_backward", off_by_a_bit)
    assert main(["gradcheck", "--hidden", "8,8", "--dim", "5", "--n", "4"]) == 1
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("FAIL: ") and "(W1)" in last and "> tol 1e-06" in last, last
