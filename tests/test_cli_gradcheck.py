"""`klayer gradcheck` end to end, in a subprocess as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys


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
