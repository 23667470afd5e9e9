"""Time-uniform confidence sequences for successive elimination on paired differences; pure math.

Howard, Ramdas, McAuliffe & Sekhon (Ann. Stat. 2021), two-sided normal mixture (Robbins): for
increments d_k with mean Delta that are sigma-sub-Gaussian, S_n = sum_{k<=n} d_k and intrinsic time
V_n = n sigma^2,

    P(exists n >= 1: |S_n - n Delta| >= sqrt((V_n + rho) log((V_n + rho) / (rho a^2)))) <= a.

Derivation: M_n = sqrt(rho / (V_n + rho)) exp(S_n^2 / (2 (V_n + rho))) mixes the exponential
supermartingales exp(l S_n - l^2 V_n / 2) over l ~ N(0, 1 / rho), so it is a nonnegative
supermartingale with M_0 = 1 and Ville's inequality gives P(sup M_n >= 1 / a) <= a; solving
M_n = 1 / a for |S_n| gives the boundary. No correction is needed for looking after every sample.

Every rho > 0 gives a valid sequence; rho sets where it is tightest. The radius at V = m sigma^2 is
smallest near rho = m sigma^2 / (L + log(1 + L)) with L = 2 log(1 / a), the approximate minimiser
Howard et al. give (``mixture_rho``; against a numerical minimum: rho within 2% for a <= 0.05 / 9,
the radius within 0.03% at every level tested). So rho is not "about m": at a = 0.05 / 9 (ten classes), rho = 4 sigma^2 is tightest near
m = 51 samples and rho = 0.94 sigma^2 near m = 12.

Finite population (``population=N``): the question a benchmark asks is usually not "is this class
worse in expectation" but "would full evaluation on these N samples rank it below the leader".
Its answer is the mean mu of the N fixed paired differences, and a sequence that reads them in a
random order without replacement has less and less left to learn as n nears N. Waudby-Smith &
Ramdas (NeurIPS 2020, "Confidence sequences for sampling without replacement") centre each
increment on the mean of the values still unseen, mu_k = (N mu - S_{k-1}) / (N - k + 1), which
makes sum_k (d_k - mu_k) a martingale; it equals B_n - mu A_n with

    A_n = sum_{k<=n} N / (N - k + 1),    B_n = S_n + sum_{k<=n} S_{k-1} / (N - k + 1),

so the same normal-mixture radius bounds |B_n - mu A_n| at every n, and mu > 0 is certain once
B_n exceeds it. B_n >= S_n whenever the running sums are positive, by a factor that grows as the
unseen remainder shrinks (1.6x at n = 33 of 50): late looks drop classes the infinite-population
rule keeps. The guarantee is relative to full evaluation on the same samples, not to the model's
expected error.
"""
from __future__ import annotations

import math

import torch


def normal_mixture_boundary(v: torch.Tensor | float, rho: torch.Tensor | float,
                            a: float) -> torch.Tensor:
    """Radius of the two-sided normal-mixture confidence sequence at intrinsic time ``v``.

    ``v = n sigma^2`` and ``rho`` (same units) may be tensors of any broadcastable shape; ``a`` is the
    error level of this one sequence (the probability that it is ever crossed).
    """
    if not 0 < a < 1:
        raise ValueError(f"error level must be in (0, 1), got {a}")
    vr = torch.as_tensor(v, dtype=torch.float64) + torch.as_tensor(rho, dtype=torch.float64)
    return (vr * (torch.log(vr / torch.as_tensor(rho, dtype=torch.float64)) - 2 * math.log(a))).sqrt()


def mixture_rho(tightest_at: float, a: float) -> float:
    """rho in units of sigma^2 that makes the level-``a`` radius tightest near ``tightest_at`` samples."""
    if not tightest_at > 0:
        raise ValueError(f"tightest_at must be positive, got {tightest_at}")
    big_l = -2 * math.log(a)
    return tightest_at / (big_l + math.log1p(big_l))


def pooled_variance(diffs: torch.Tensor) -> torch.Tensor:
    """One variance per image: the median of the pairs' sample variances.

    ``diffs`` (P, n) holds the paired differences of P candidate pairs on the same n samples. The
    pairs share (t, noise) and so a scale; the median keeps the plug-in stable at n = 4, where a
    single pair's variance is a poor estimate, and is not pulled up by a few wild pairs. (The
    midpoint median: ``Tensor.median`` would take the lower middle value of an even count.)
    """
    return torch.quantile(diffs.var(dim=1, unbiased=True), 0.5)


def successive_variance(diffs: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """One variance per image from the differences between neighbouring noise levels.

    ``diffs`` (P, n) as in ``pooled_variance``, ``levels`` (n,) each sample's rank on the sorted grid of
    noise levels. Half the mean squared difference of level-neighbours (the successive-difference
    estimator of systematic sampling) leaves out a smooth trend of the paired difference over t, which
    the plain sample variance counts as noise; the midpoint median over pairs as ``pooled_variance``.
    Where the trend is flat both estimate the same variance.
    """
    d = diffs[:, torch.argsort(levels)]                                     # (P, n) in noise-level order
    return torch.quantile(d.diff(dim=1).pow(2).mean(1) / 2, 0.5)


def without_replacement_sums(diffs: torch.Tensor, population: int) -> torch.Tensor:
    """(P,) float64 ``B_n`` of each row of ``diffs`` (P, n): what the finite-population sequence
    compares with the normal-mixture radius (module docstring). Requires n <= ``population``."""
    n = diffs.shape[1]
    if n > population:
        raise ValueError(f"{n} samples read from a population of {population}")
    s = diffs.double().cumsum(1)                                            # S_1 .. S_n
    before = torch.cat([torch.zeros_like(s[:, :1]), s[:, :-1]], 1)          # S_0 .. S_{n-1}
    remaining = population - torch.arange(n, dtype=torch.float64)           # N - k + 1, k = 1..n
    return s[:, -1] + (before / remaining).sum(1)


def eliminated_by_leader(diffs: torch.Tensor, alpha: float, num_candidates: int, *,
                         tightest_at: float, population: int | None = None,
                         levels: torch.Tensor | None = None) -> torch.Tensor:
    """Which pairs' candidates are worse than the leader at every time, with overall level ``alpha``.

    ``diffs`` (P, n): per sample, candidate error minus the current leader's error, for P > 0 live
    challengers. A challenger is dropped when S_n exceeds the boundary at level a = alpha / (K - 1)
    (K = ``num_candidates``): the truly best class can only be dropped if the sequence of its pair
    with whichever class led is crossed, and there are K - 1 such pairs, so the best class survives
    with probability >= 1 - alpha (up to the plug-in variance). The mixture is tuned to be tightest
    near n = ``tightest_at`` samples (``mixture_rho``); any value keeps the guarantee. With
    ``population`` N the pairs are tested against full evaluation on N samples instead
    (``without_replacement_sums``): the best class under that evaluation survives with
    probability >= 1 - alpha if the samples come in random order. With ``levels`` (n,), each sample's
    rank on the sorted noise-level grid, the variance is ``successive_variance``'s: valid when the
    samples stratify the grid (the engine's van der Corput order) and the paired difference's trend
    over t is moderate, so that a prefix's sum carries little of it: no longer the exact sequence for a
    random order (simulated in tests/test_sequential.py, measured in docs/elimination_benchmark.md, session 16).
    """
    n = diffs.shape[1]
    sigma2 = pooled_variance(diffs.double()) if levels is None else successive_variance(diffs.double(), levels)
    if not sigma2 > 0:  # identical errors (e.g. duplicate prompts): no evidence either way
        return torch.zeros(len(diffs), dtype=torch.bool)
    a = alpha / max(num_candidates - 1, 1)
    radius = normal_mixture_boundary(n * sigma2, mixture_rho(tightest_at, a) * sigma2, a)
    sums = diffs.double().sum(1) if population is None else without_replacement_sums(diffs, population)
    return sums > radius


def posterior_best(mean_diff: torch.Tensor, se: torch.Tensor, draws: int = 4096,
                   seed: int = 0) -> torch.Tensor:
    """P(candidate g has the lowest expected error) under independent Gaussian posteriors.

    ``mean_diff`` (G,) is each candidate's mean paired difference to the leader (0 for the leader)
    and ``se`` (G,) its standard error (0 for the leader, the reference; inf for an unscored
    candidate, which gets probability 0). Flat prior, so the posterior of each expected
    difference is N(mean_diff, se^2); P(g is best) is estimated from ``draws`` seeded draws, so the
    result is deterministic. Returns (G,) float64 summing to 1.
    """
    g = torch.Generator().manual_seed(seed)
    finite = torch.isfinite(se)
    z = torch.randn(draws, int(finite.sum()), generator=g, dtype=torch.float64)       # (S, F)
    theta = mean_diff[finite].double() + se[finite].double() * z                        # (S, F)
    wins = torch.bincount(theta.argmin(1), minlength=int(finite.sum())).double()
    out = torch.zeros(len(se), dtype=torch.float64)
    out[finite] = wins / draws
    return out


def paired_gaps(err: torch.Tensor, used: torch.Tensor, leader: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(G,) float64 mean and sum of squared deviations of each candidate's paired differences to
    ``leader`` over the first ``used`` samples it saw (0 where it saw none). Pairing cancels the
    error level that all classes share at one (t, noise) sample, which dwarfs the class gaps."""
    k = torch.arange(err.shape[1])
    counted = (k[None, :] < used[:, None]) & (used[:, None] > 0)                          # (G, N)
    diff = torch.where(counted, err.double() - err[leader].double(), 0.0)                # (G, N)
    mean = diff.sum(1) / used.double().clamp(min=1)
    sq = torch.where(counted, (diff - mean[:, None]) ** 2, 0.0).sum(1)
    return mean, sq


def best_probability(err: torch.Tensor, used: torch.Tensor, leader: int) -> torch.Tensor:
    """(G,) P(candidate g has the lowest expected error), from the samples each candidate used.

    Why this and not a softmax of the mean errors: it needs no temperature, so no labels; every
    strategy produces it from what it already measured; and it is the uncertainty the scorer
    actually has. Each candidate's expected error minus the leader's has a flat-prior Gaussian
    posterior N(mean paired difference over its n_g samples, sigma^2 / n_g), with sigma^2 one pooled
    variance per image (as in the anytime rule); P(g is best) follows by seeded Monte Carlo
    (``posterior_best``). It measures sampling uncertainty only: an image the model
    gets confidently wrong at infinite samples keeps probability near 1 (see
    docs/elimination_benchmark.md for the measured calibration). Unscored candidates get 0.
    """
    return posterior_from_gaps(*paired_gaps(err, used, leader), used, leader)


def posterior_from_gaps(mean: torch.Tensor, sq: torch.Tensor, used: torch.Tensor, leader: int) -> torch.Tensor:
    """``best_probability`` from ``paired_gaps``' mean and squared deviations."""
    G = len(mean)
    n = used.double()
    pairs = (used >= 2) & (torch.arange(G) != leader)
    if not pairs.any():
        return (torch.arange(G) == leader).double()
    sigma2 = torch.quantile(sq[pairs] / (n[pairs] - 1), 0.5)  # as pooled_variance
    se = (sigma2 / n.clamp(min=1)).sqrt().masked_fill(used == 0, float("inf"))
    se[leader] = 0.0
    mean[leader] = 0.0
    # Candidates more than 6 standard errors behind the leader win with probability < 1e-9:
    # leaving them out keeps 1,000 classes cheap without changing the estimate.
    se = se.masked_fill(mean > 6 * se, float("inf"))
    return posterior_best(mean, se)
