"""How sure is a zero-shot accuracy, and is one model really better than another on the same images?

Pure math on per-image correctness (no I/O): a Wilson interval for each model's top-1 and an exact
McNemar test for the paired difference, both from ``scipy.stats.binomtest``. Two models evaluated
on the same images are paired: only the images exactly one of them gets right carry information
about which is better, which makes the paired test far sharper than comparing two intervals.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from scipy.stats import binomtest


@dataclass(frozen=True)
class Accuracy:
    correct: int
    total: int
    low: float
    high: float

    @property
    def value(self) -> float:
        return self.correct / self.total


@dataclass(frozen=True)
class PairedComparison:
    """Model A against model B on the same images."""

    total: int
    a_only: int      # images A gets right and B gets wrong
    b_only: int
    p_value: float   # exact two-sided McNemar test (binomial on the discordant images)

    @property
    def difference(self) -> float:
        """Top-1 of A minus top-1 of B."""
        return (self.a_only - self.b_only) / self.total


def accuracy_interval(correct: Sequence[bool], confidence: float = 0.95) -> Accuracy:
    """Top-1 with its Wilson score interval (sound near 0 and 1, unlike the normal approximation)."""
    if not len(correct):
        raise ValueError("no images to compute an accuracy from")
    k, n = int(sum(map(bool, correct))), len(correct)
    ci = binomtest(k, n).proportion_ci(confidence_level=confidence, method="wilson")
    return Accuracy(k, n, float(ci.low), float(ci.high))


def paired_comparison(correct_a: Sequence[bool], correct_b: Sequence[bool]) -> PairedComparison:
    """Exact McNemar test of A against B; both sequences are per image, in the same image order."""
    if len(correct_a) != len(correct_b):
        raise ValueError(f"paired comparison needs the same images: {len(correct_a)} vs {len(correct_b)}")
    a_only = sum(bool(a) and not bool(b) for a, b in zip(correct_a, correct_b))
    b_only = sum(bool(b) and not bool(a) for a, b in zip(correct_a, correct_b))
    p = binomtest(a_only, a_only + b_only, 0.5).pvalue if a_only + b_only else 1.0
    return PairedComparison(len(correct_a), a_only, b_only, float(p))
