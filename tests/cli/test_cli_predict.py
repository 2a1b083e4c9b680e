"""`klayer predict`: a trained model's class probabilities for images a user brings."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest_data_helpers import make_cifar_folder

from klayer.data.datasets import CIFAR_CLASSES
from klayer.training import modelfile


def klayer(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "klayer", *args], capture_output=True,
                          text=True, timeout=300, cwd=cwd)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cwd = tmp_path_factory.mktemp("predict")
    make_cifar_folder(cwd / "cifar" / "cifar-10-batches-py", rows=120)
    r = klayer("train", "--data-dir", "cifar", "--val-size", "100", "--hidden", "8",
               "--n-batch", "50", "--steps", "20", "--quiet", "--out", "run", cwd=cwd)
    assert r.returncode == 0, r.stderr
    return cwd


def _expected(cwd: Path, rows: np.ndarray) -> np.ndarray:
    """The probabilities computed here from the model file, as a user of the API would."""
    net, _, extras = modelfile.load(cwd / "run" / "model.npz")
    s = net.scores(((rows - extras["mean"]) / extras["std"]).astype(np.float32))
    e = np.exp(s - s.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_pictures_arrays_and_batch_files(run: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    pic = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(pic).save(run / "cat.png")
    Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(run / "big.jpg")
    np.save(run / "two.npy", np.stack([pic, pic[::-1]]))
    r = klayer("predict", "run", "cat.png", "big.jpg", "two.npy", "cifar/cifar-10-batches-py/"
               "test_batch", "--json", cwd=run)
    assert r.returncode == 0, r.stderr
    assert "big.jpg: resized from 64x48 to 32x32" in r.stderr
    doc = json.loads(r.stdout)
    assert doc["classes"] == list(CIFAR_CLASSES)
    preds = doc["predictions"]
    assert [p["input"] for p in preds[:4]] == ["cat.png", "big.jpg", "two.npy[0]", "two.npy[1]"]
    assert len(preds) == 4 + 120
    probs = np.array([[p["probabilities"][c] for c in CIFAR_CLASSES] for p in preds])
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-9)
    row = pic.transpose(2, 0, 1).reshape(1, -1).astype(np.float64)  # CIFAR's channel order
    np.testing.assert_allclose(probs[0], _expected(run, row)[0], atol=1e-5)
    np.testing.assert_allclose(probs[2], probs[0], atol=1e-12)  # .npy pictures read alike
    r = klayer("predict", "run/model.npz", "cat.png", "--top", "2", cwd=run)
    assert r.returncode == 0 and r.stdout.startswith("cat.png: ") and r.stdout.count("%") == 2


def test_bad_inputs_are_named_before_any_output(run: Path) -> None:
    (run / "junk.png").write_bytes(b"not a png")
    np.save(run / "floats.npy", np.zeros((2, 3072)))
    for name, message in (("junk.png", "not a readable image"),
                          ("floats.npy", "expected uint8 pixels"), ("none.npy", "no such file")):
        r = klayer("predict", "run", name, cwd=run)
        assert r.returncode == 4 and message in r.stderr and not r.stdout, r.stderr
    r = klayer("predict", "run", "junk.png", "--top", "0", cwd=run)
    assert r.returncode == 2 and "--top" in r.stderr
