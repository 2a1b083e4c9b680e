"""`klayer check case|compare|step` end to end, in a subprocess as a student runs it."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from klayer.check import load_case
from klayer.check.bugs import MODELS, switch
from klayer.check.course import backward, forward


def klayer(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "klayer", *args], capture_output=True,
                          text=True, timeout=120, cwd=cwd)


def _gradients(case_path: Path, *mistakes: tuple[str, int]) -> dict[str, np.ndarray]:
    case = load_case(case_path)
    on = switch(mistakes, case)
    return {f"grad_{k}": v for k, v in backward(case, forward(case, on=on), on=on).items()}


def test_case_then_compare_right_and_wrong_gradients(tmp_path: Path) -> None:
    r = klayer("check", "case", "--out", "case.npz", "--hidden", "8,8", "--seed", "3",
               cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "k = 3, with batch norm" in r.stdout and "seed 3" in r.stdout
    np.savez(tmp_path / "right.npz", **_gradients(tmp_path / "case.npz"))
    r = klayer("check", "compare", "case.npz", "right.npz", cwd=tmp_path)
    assert r.returncode == 0 and "PASS" in r.stdout, r.stdout + r.stderr
    rows = {k: v.T for k, v in _gradients(tmp_path / "case.npz", ("bn_no_mean_term", 2)).items()}
    np.savez(tmp_path / "wrong.npz", **rows)
    r = klayer("check", "compare", "case.npz", "wrong.npz", cwd=tmp_path)
    assert r.returncode == 1, r.stderr
    assert "took the arrays as rows" in r.stdout
    assert "the batch-norm backward pass lacks its mean term in layer 2" in r.stdout
    r = klayer("check", "compare", "case.npz", "wrong.npz", "--json", cwd=tmp_path)
    doc = json.loads(r.stdout)
    assert doc["ok"] is False and doc["params"]["W3"] == {"max_rel_err": 0.0, "ok": True}
    assert doc["params"]["W2"]["ok"] is False and doc["eps"]["case"] == 1e-12
    assert "mean term in layer 2" in doc["diagnosis"][0]


def test_mat_case_has_cells_and_bad_input_is_named(tmp_path: Path) -> None:
    from scipy.io import loadmat

    r = klayer("check", "case", "--out", "case.mat", "--no-batch-norm", "--hidden", "5",
               cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    m = loadmat(tmp_path / "case.mat")
    assert m["W"].shape == (1, 2) and m["W"][0, 0].shape == (5, 10) and m["X"].shape == (10, 20)
    assert "gamma" not in m or m["gamma"].size == 0
    r = klayer("check", "compare", "case.mat", "missing.npz", cwd=tmp_path)
    assert r.returncode == 4 and "missing.npz: no such file" in r.stderr
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    r = klayer("check", "compare", "case.mat", "junk.npz", cwd=tmp_path)
    assert r.returncode == 4 and "junk.npz: cannot read it" in r.stderr
    for bad, flag in ((("--out", "x.txt"), "--out"), (("--out", "c.npz", "--n", "1"), "--n")):
        r = klayer("check", "case", *bad, cwd=tmp_path)
        assert r.returncode == 2 and flag in r.stderr
    np.savez(tmp_path / "none.npz", foo=np.zeros(3))
    r = klayer("check", "compare", "case.mat", "none.npz", cwd=tmp_path)
    assert r.returncode == 2 and "no gradients found" in r.stderr


def test_step_names_a_parameter_updated_with_another_ones_gradient(tmp_path: Path) -> None:
    assert klayer("check", "case", "--out", "case.npz", cwd=tmp_path).returncode == 0
    case = load_case(tmp_path / "case.npz")
    grads = backward(case, forward(case))
    before = {f"{g}{l}": a for g in ("W", "b", "gamma", "beta")
              for l, a in enumerate(getattr(case, g), 1)}
    after = {n: p - 0.05 * grads[n] for n, p in before.items()}
    np.savez(tmp_path / "before.npz", **before)
    np.savez(tmp_path / "good.npz", **after)
    after["gamma2"] = before["gamma2"] - 0.05 * grads["beta2"]
    np.savez(tmp_path / "bad.npz", **after)
    r = klayer("check", "step", "case.npz", "before.npz", "good.npz", "--eta", "0.05",
               cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    r = klayer("check", "step", "case.npz", "before.npz", "bad.npz", "--eta", "0.05",
               cwd=tmp_path)
    assert r.returncode == 1 and "gamma2: WRONG: updated with beta2's gradient" in r.stdout


@pytest.mark.parametrize("mistakes", [(("var_unbiased", 3), ("l2_lambda", 9)),
                                      (("relu_mask_on_scores", 5),)])
def test_a_nine_layer_diagnosis_answers_in_seconds(tmp_path: Path, mistakes) -> None:
    r = klayer("check", "case", "--out", "case.npz", "--hidden", "50,30,20,20,10,10,10,10",
               cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    np.savez(tmp_path / "mine.npz", **_gradients(tmp_path / "case.npz", *mistakes))
    start = time.monotonic()
    r = klayer("check", "compare", "case.npz", "mine.npz", cwd=tmp_path)
    assert r.returncode == 1
    for name, layer in mistakes:
        assert f"{MODELS[name].words} in layer {layer}" in r.stdout, r.stdout
    assert time.monotonic() - start < 60  # a generous bound; the note gives the measured time
