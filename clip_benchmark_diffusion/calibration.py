"""Is a model's confidence its accuracy? Expected calibration error and reliability bins; pure math.

Standard definitions (Naeini et al. 2015; Guo et al. 2017): the top-1 confidences are put into
``bins`` equal-width bins B_m = ((m - 1) / M, m / M] (a confidence of 0 goes into the first), and
ECE = sum_m |B_m| / n * |accuracy(B_m) - mean confidence(B_m)|.

Temperature scaling (Guo et al. 2017) turns a diffusion classifier's per-class errors (each
class's mean paired gap to the top-1, ``Outcome.gap``) into class probabilities the way CLIP's
learned logit scale turns its similarities into a softmax:
p(g | x) = softmax_g(-e_g / T) over the candidates that were scored, with the one scalar T chosen
to maximise the likelihood of held-out validation labels (never test labels). One more parameter,
a power k on the scaled gap, p(g | x) = softmax_g(-sign(e_g) |e_g / T|^k), bends the confidence
curve (k < 1 makes small gaps count for more relative to large ones); k = 1 is plain temperature
scaling, and both are fitted together by ``fit_calibration``.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax

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


@dataclass(frozen=True)
class EceDifference:
    """ECE(a) - ECE(b) on the same images, with a paired bootstrap interval."""

    difference: float
    low: float
    high: float
    level: float


def ece_difference(conf_a: Sequence[float], right_a: Sequence[bool], conf_b: Sequence[float],
                   right_b: Sequence[bool], level: float = 0.95, resamples: int = 2000,
                   seed: int = 0) -> EceDifference:
    """Paired bootstrap (images resampled together, percentile interval; ``scipy.stats.bootstrap``) of the
    ECE difference: ECE on a thousand images moves by a point or more between resamples, so two
    models' calibration is told apart only when the interval excludes 0."""
    from scipy.stats import bootstrap

    data = [np.asarray(x, dtype=float) for x in (conf_a, right_a, conf_b, right_b)]
    if len({len(x) for x in data}) != 1:
        raise ValueError("the two runs must cover the same images")

    def stat(ca, ra, cb, rb):
        return reliability(ca, ra > 0.5).ece - reliability(cb, rb > 0.5).ece

    res = bootstrap(data, stat, paired=True, vectorized=False, n_resamples=resamples, confidence_level=level,
                    method="percentile", random_state=np.random.default_rng(seed))
    low, high = res.confidence_interval
    return EceDifference(float(stat(*data)), float(low), float(high), level)


def error_softmax(mean_error: np.ndarray, samples: np.ndarray, temperature: float,
                  power: float = 1.0) -> np.ndarray:
    """(..., G) probabilities softmax(-sign(e) |e / temperature|^power) over the scored candidates
    (power 1: softmax(-mean_error / temperature)).

    ``samples`` (same shape) is how many (t, noise) samples each candidate's mean used; a
    candidate with none (outside a shortlist) gets probability 0.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if not 0 < power < np.inf:
        raise ValueError(f"power must be positive and finite, got {power}")
    return np.exp(_log_probs(np.asarray(mean_error, dtype=float), np.asarray(samples) > 0, temperature, power))


def error_nll(mean_error: np.ndarray, samples: np.ndarray, labels: np.ndarray, temperature: float,
              power: float = 1.0) -> float:
    """Mean negative log-likelihood of ``labels`` (N,) under ``error_softmax`` (what the fits minimise)."""
    y = np.asarray(labels, dtype=int)
    log_p = _log_probs(np.asarray(mean_error, dtype=float), np.asarray(samples) > 0, temperature, power)
    return float(-log_p[np.arange(len(y)), y].mean())


def _log_probs(err: np.ndarray, scored: np.ndarray, temperature: float, power: float = 1.0) -> np.ndarray:
    z = err / temperature
    if power != 1.0:
        z = np.sign(z) * np.abs(z) ** power
    logits = np.where(scored, -z, -np.inf)
    return log_softmax(logits, axis=-1)


def fit_temperature(mean_error: np.ndarray, samples: np.ndarray, labels: np.ndarray) -> float:
    """The T minimising the mean negative log-likelihood of ``labels`` (N,) under
    ``error_softmax`` of ``mean_error`` / ``samples`` (N, G); images whose label was never scored
    are left out (no T can explain them). T is searched on a log scale around the spread of the
    errors, so the result does not depend on their units."""
    err, scored, y, scale = _fit_inputs(mean_error, samples, labels)
    return float(scale * np.exp(_fit_log_temperature(err, scored, y, scale)))


def _fit_log_temperature(err: np.ndarray, scored: np.ndarray, y: np.ndarray, scale: float) -> float:
    rows = np.arange(len(y))

    def nll(log_t: float) -> float:
        return float(-_log_probs(err, scored, scale * np.exp(log_t))[rows, y].mean())

    return float(minimize_scalar(nll, bounds=(-12.0, 12.0), method="bounded", options={"xatol": 1e-6}).x)


def fit_calibration(mean_error: np.ndarray, samples: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(T, power) minimising the same negative log-likelihood as ``fit_temperature`` under
    ``error_softmax(..., T, power)``; starts from the temperature-only fit (power 1)."""
    from scipy.optimize import minimize

    err, scored, y, scale = _fit_inputs(mean_error, samples, labels)
    rows = np.arange(len(y))

    def nll(p: np.ndarray) -> float:
        log_t, log_k = np.clip(p, -12.0, 12.0)
        return float(-_log_probs(err, scored, scale * np.exp(log_t), float(np.exp(log_k)))[rows, y].mean())

    start = np.array([_fit_log_temperature(err, scored, y, scale), 0.0])
    best = minimize(nll, start, method="Nelder-Mead",
                    options={"xatol": 1e-6, "fatol": 1e-10, "maxiter": 2000})
    log_t, log_k = best.x
    return float(scale * np.exp(log_t)), float(np.exp(log_k))


def _fit_inputs(mean_error: np.ndarray, samples: np.ndarray, labels: np.ndarray):
    """The images whose label was scored, and the scale of their errors (median top-2 gap)."""
    err = np.asarray(mean_error, dtype=float)
    scored = np.asarray(samples) > 0
    y = np.asarray(labels, dtype=int)
    rows = np.arange(len(y))
    keep = scored[rows, y]
    if keep.sum() < 2:
        raise ValueError("need at least two images whose true class was scored")
    err, scored, y = err[keep], scored[keep], y[keep]
    # Each image's gap between its best and its second-best error sets the scale of T.
    gaps = np.sort(np.where(scored, err, np.inf), axis=1)
    scale = float(np.median(np.diff(gaps[:, :2], axis=1)[np.isfinite(gaps[:, 1])])) if gaps.shape[1] > 1 else 1.0
    scale = scale if np.isfinite(scale) and scale > 0 else float(np.nanstd(np.where(scored, err, np.nan))) or 1.0
    return err, scored, y, scale
