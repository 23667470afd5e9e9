"""Which noise levels an image's samples use, in which order, for every model family.

A sample k of an image is a pair (noise level, noise): ``x_t = a_k x0 + b_k eps_k``. Variance-
preserving (VP) families (SD 1/2, SDXL, PixArt, IF, DiT) have ``a = sqrt(alpha_bar_t)``,
``b = sqrt(1 - alpha_bar_t)`` at a discrete training step t; rectified-flow families (SD3, FLUX,
Sana) have ``a = 1 - s``, ``b = s`` at a noise time s in (0, 1). Everything downstream (the
error weighting, the record in the result) reads the log-SNR ``lam = log(a^2 / b^2)``, so a
weighting means the same thing in every family.

Grids are ordered by the van der Corput sequence, so every prefix of the samples is spread over
the whole range: staged evaluation reuses every earlier sample and elimination always sees all
noise levels.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from clip_benchmark_diffusion.errors import UserError

# Guard on the log-SNR: IF's cosine schedule reaches alpha_bar ~ 2e-9 (lam ~ -20), where
# x0-space factors e^(-lam/2) would multiply float noise by 2e4. Weights never see lam below this.
LAMBDA_MIN = -10.0
# The ELBO grid spans at most this log-SNR range (flows have an unbounded one).
ELBO_RANGE = (-10.0, 10.0)


@dataclass(frozen=True)
class NoiseGrid:
    """The noise level of each sample index k, in sample order; all tensors (N,) float64."""

    a: torch.Tensor            # signal scale: x_t = a x0 + b eps
    b: torch.Tensor            # noise scale
    model_time: torch.Tensor   # the denoiser's timestep input (discrete t, sigma * 1000, sigma, ...)
    tau: torch.Tensor          # the model's time in [0, 1]: t / T (VP) or sigma (flow); 1 = pure noise

    def __len__(self) -> int:
        return len(self.a)

    @property
    def lam(self) -> torch.Tensor:
        """Log-SNR ``log(a^2 / b^2)`` of each sample."""
        return 2 * (self.a.log() - self.b.log())

    def describe(self, digits: int = 4) -> dict[str, list[float]]:
        """Plain lists for the result file: which noise levels the scores used."""
        def r(t: torch.Tensor) -> list[float]:
            return [round(float(v), digits) for v in t]
        return {"log_snr": r(self.lam), "model_time": r(self.model_time), "tau": r(self.tau)}


def uniform_grid(n: int, num_train_timesteps: int) -> torch.Tensor:
    """Li et al.'s grid ``range(T // n // 2, T, T // n)``: n evenly spaced timesteps."""
    step = max(num_train_timesteps // n, 1)
    grid = torch.arange(step // 2, num_train_timesteps, step)[:n]
    if len(grid) < n:
        raise UserError(f"cannot place {n} distinct timesteps in the model's {num_train_timesteps} training "
                        f"steps; lower n_samples / max_samples to at most {num_train_timesteps}")
    return grid


def _radical_inverse(i: int) -> float:
    """Base-2 van der Corput value of ``i``."""
    out, f = 0.0, 0.5
    while i:
        out += f * (i & 1)
        i >>= 1
        f /= 2
    return out


def prefix_order(n: int) -> torch.Tensor:
    """Positions 0..n-1 of a sorted grid, ordered so that every prefix is spread out."""
    return torch.tensor(sorted(range(n), key=_radical_inverse), dtype=torch.long)


def sample_order(n: int, num_train_timesteps: int) -> torch.Tensor:
    """Li et al.'s uniform grid of ``n`` timesteps in prefix order (sample k uses ``order[k]``)."""
    return uniform_grid(n, num_train_timesteps)[prefix_order(n)]


def vp_grid(alphas_cumprod: torch.Tensor, n: int, weighting: str) -> NoiseGrid:
    """A VP model's samples: Li et al.'s uniform-t grid, or uniform in log-SNR for ``elbo``.

    ``elbo`` places the n levels uniformly in lam over the schedule's range (clipped to
    ``ELBO_RANGE``) at the nearest training step, so that an unweighted epsilon error averages
    the variational bound.
    """
    ac = alphas_cumprod.to(torch.float64)
    T = len(ac)
    if weighting == "elbo":
        lam_all = (ac / (1 - ac)).log()                                   # (T,) decreasing in t
        lo, hi = max(float(lam_all[-1]), ELBO_RANGE[0]), min(float(lam_all[0]), ELBO_RANGE[1])
        target = hi - (torch.arange(n, dtype=torch.float64) + 0.5) / n * (hi - lo)   # (n,) decreasing
        t = torch.searchsorted(-lam_all, -target).clamp(max=T - 1)
    else:
        t = uniform_grid(n, T)
    t = t[prefix_order(n)]
    a2 = ac[t]
    return NoiseGrid(a=a2.sqrt(), b=(1 - a2).sqrt(), model_time=t.to(torch.float64), tau=t / T)


def shift_sigma(u: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's time shift ``k u / (1 + (k - 1) u)``; FLUX's exponential shift is the case k = e^mu."""
    return shift * u / (1 + (shift - 1) * u)


def flow_grid(n: int, shift: float, weighting: str, time_scale: float = 1000.0) -> NoiseGrid:
    """A rectified-flow model's samples: a midpoint grid in u shifted by the model's own ``shift``,
    or uniform in log-SNR for ``elbo``. ``time_scale`` maps sigma to the denoiser's timestep input."""
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    if weighting == "elbo":
        lo, hi = ELBO_RANGE
        lam = hi - u * (hi - lo)
        sigma = torch.sigmoid(-lam / 2)                                   # lam = 2 log((1 - s) / s)
    else:
        sigma = shift_sigma(u, shift)
    sigma = sigma[prefix_order(n)]
    return NoiseGrid(a=1 - sigma, b=sigma, model_time=sigma * time_scale, tau=sigma)


def dynamic_shift(image_tokens: int, base_tokens: int, max_tokens: int, base_shift: float, max_shift: float) -> float:
    """FLUX's resolution-dependent shift: mu linear in the image sequence length, k = e^mu."""
    slope = (max_shift - base_shift) / (max_tokens - base_tokens)
    mu = base_shift + slope * (image_tokens - base_tokens)
    return math.exp(mu)
