"""TrainConfig: defaults, validation naming the key, TOML round trip."""

from __future__ import annotations

import sys

import pytest

from klayer.core.config import TrainConfig, to_toml

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def test_defaults_are_the_assignment_recipe() -> None:
    c = TrainConfig()
    assert (c.hidden, c.batch_norm, c.n_batch, c.lam) == ((50, 50), True, 100, 0.005)
    assert (c.schedule, c.eta_min, c.eta_max) == ("cyclic", 1e-5, 0.1)
    assert (c.init, c.bn_alpha) == ("he", 0.9)
    assert (c.split, c.val_size, c.shuffle, c.dtype) == ("full", 5000, True, "float32")


@pytest.mark.parametrize(
    ("values", "match"),
    [
        ({"hidden": [50, 0]}, r"hidden\[1\]"),
        ({"eta_min": 0.2}, "eta_min .* must not exceed eta_max"),
        ({"n_s": 0}, "n_s must be an integer >= 1"),
        ({"lambda": -0.1}, "lambda must be >= 0"),
        ({"bn_alpha": 1.5}, "bn_alpha must be in"),
        ({"n_batch": "100"}, "n_batch must be an integer"),
        ({"batch_norm": 1}, "batch_norm must be true or false"),
        ({"hidden": "50,50"}, "hidden must be a list of integers"),
        ({"lamda": 0.1}, r"^unknown key lamda \(did you mean lambda\?\)$"),
        ({"hiden": [5]}, r"^unknown key hiden \(did you mean hidden\?\)$"),
        ({"zzz": 1}, r"^unknown key zzz \(the keys are klayer train's flags"),
        ({"cycles": 2, "epochs": 3}, "only one training length"),
        ({"schedule": "constant", "cycles": 2}, "cycles only applies"),
        ({"dataset": "mnist"}, "unknown dataset 'mnist'"),
        ({"translate": -1}, "translate must be an integer >= 0"),
        ({"optimizer": "bogus"}, "unknown optimizer 'bogus'"),
        ({"dtype": "float16"}, "unknown dtype 'float16'; valid: float32, float64$"),
        ({"schedule": "cosine"}, "unknown schedule 'cosine'"),
    ],
)
def test_bad_values_name_the_key(values: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TrainConfig.from_dict(values)


def test_toml_round_trip() -> None:
    c = TrainConfig(hidden=(50, 30, 20), lam=0.0123, name='a "quoted" name', cycles=3.0,
                    data_dir="/tmp/x")
    text = to_toml(c.to_dict())
    assert TrainConfig.from_dict(tomllib.loads(text)) == c
    assert "lambda = 0.0123" in text


def test_the_configs_choices_are_the_implemented_ones() -> None:
    from klayer.core import config, optim, schedules

    assert set(config.OPTIMIZERS) == set(optim.OPTIMIZERS)
    assert set(config.SCHEDULES) == set(schedules.SCHEDULES)
