"""Is a model's confidence its accuracy? Expected calibration error and reliability bins; pure math.

Standard definitions (Naeini et al. 2015; Guo et al. 2017): the top-1 confidences are put into
``bins`` equal-width bins B_m = ((m - 1) / M, m / M] (a confidence of 0 goes into the first), and
ECE = sum_m |B_m| / n * |accuracy(B_m) - mean confidence(B_m)|.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

BINS = 15


@dataclass(frozen=True)
class Reliability:
    """Per-bin counts, mean confidence and accuracy (NaN in empty bins)."""

    edges: np.ndarray        # (M + 1,) from 0 to 1
    count: np.ndarray        # (M,)
    confidence: np.ndarray   # (M,)
    accuracy: np.ndarray     # (M,)

    @property
    def total(self) -> int:
        return int(self.count.sum())

    @property
    def ece(self) -> float:
        used = self.count > 0
        gap = np.abs(self.accuracy[used] - self.confidence[used])
        return float((self.count[used] * gap).sum() / self.total)


def reliability(confidence: Sequence[float], correct: Sequence[bool], bins: int = BINS) -> Reliability:
    """Bin the top-1 ``confidence`` of each image against whether its top-1 was ``correct``."""
    conf = np.asarray(confidence, dtype=float)
    right = np.asarray(correct, dtype=bool)
    if conf.shape != right.shape or not len(conf):
        raise ValueError(f"need one confidence per image, got {conf.shape} confidences for {right.shape} images")
    if np.isnan(conf).any() or (conf < 0).any() or (conf > 1).any():
        raise ValueError("confidences must be probabilities in [0, 1]")
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.ceil(conf * bins).astype(int) - 1, 0, bins - 1)       # right-closed bins
    count = np.bincount(which, minlength=bins)
    with np.errstate(invalid="ignore"):
        mean_conf = np.bincount(which, weights=conf, minlength=bins) / count
        acc = np.bincount(which, weights=right.astype(float), minlength=bins) / count
    return Reliability(edges, count, mean_conf, acc)
