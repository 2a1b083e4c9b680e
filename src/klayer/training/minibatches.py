"""A run's mini-batches and random streams, shared by a lone ``Trainer`` and a stack of
trials (``BatchedTrainer``): the epoch order, standardized (and whitened) rows, flips,
translations, and mixup or cutmix.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from klayer.core.config import TrainConfig
from klayer.core.layers import Array
from klayer.core.losses import Mix
from klayer.core.network import Labels
from klayer.data.augment import cutmix, mixup, random_moves
from klayer.data.datasets import Data


def streams(seed: int) -> list[np.random.Generator]:
    """The four generators of SeedSequence(seed): initialization, shuffling, dropout and
    augmentation (one stream each, so that turning dropout on keeps the batch order)."""
    return [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(4)]


class MiniBatches:
    """A run's mini-batches: each epoch a new order of the training set (``shuffle``),
    then n_batch rows at a time, standardized into one reused buffer and augmented.

    The shuffling and augmentation generators come from SeedSequence(``seed``), so runs
    (or a stack of trials) given the same seed see the same mini-batches.
    """

    def __init__(self, cfg: TrainConfig, data: Data, steps_per_epoch: int, dtype: Any,
                 seed: int) -> None:
        self.cfg, self.data, self.per_epoch, self.dtype = cfg, data, steps_per_epoch, dtype
        _, self.shuffle_rng, _, self.aug_rng = streams(seed)
        self.order = np.arange(len(data.train.y))  # this epoch's example order
        self._buf: Array | None = None

    def __call__(self, t: int) -> tuple[Array, Labels, Mix | None]:
        """Mini-batch t (0-based update count): X (n_batch, d), y (n_batch,), and the
        second labels and weights when it is mixed (``losses.Mix``), else None."""
        cfg, data = self.cfg, self.data
        pos = (t % self.per_epoch) * cfg.n_batch
        if pos == 0 and cfg.shuffle:
            self.order = self.shuffle_rng.permutation(len(data.train.y))
        idx = self.order[pos : pos + cfg.n_batch]
        X = self._buf = data.train_rows(idx, dtype=self.dtype, out=self._buf)
        if data.image_shape is not None and (cfg.flip or cfg.translate):
            X = random_moves(X, data.image_shape, cfg.flip, cfg.translate, self.aug_rng)
        y = data.train.y[idx]
        cut = cfg.cutmix if data.image_shape is not None else 0.0
        if not (cfg.mixup or cut) or self.aug_rng.random() >= cfg.mix_prob:
            return X, y, None
        if cut and (not cfg.mixup or self.aug_rng.random() < 0.5):
            assert data.image_shape is not None
            X, mix = cutmix(X, y, data.image_shape, cut, self.aug_rng)
        else:
            X, mix = mixup(X, y, cfg.mixup, self.aug_rng)
        return X, y, mix
