"""Closed-form pieces of the diffusion-classifier score; no I/O, no models.

Notation: ``x_t = a x0 + b eps``; VP models have ``a^2 + b^2 = 1``, rectified
flows ``a = 1 - s``, ``b = s``; ``lam = log(a^2 / b^2)``. Every model output is turned into an
epsilon estimate first; all errors are float32 whatever dtype the denoiser ran in.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from clip_benchmark_diffusion.scoring.timesteps import LAMBDA_MIN, NoiseGrid

# What a denoiser's output means: epsilon, v (Salimans & Ho 2022) or flow velocity eps - x0.
OBJECTIVES = ("epsilon", "v_prediction", "flow")


def _bcast(a: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return a.reshape(-1, *([1] * (like.ndim - 1))).to(like)


def add_noise(x0: torch.Tensor, eps: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``x_t = a x0 + b eps`` for clean ``x0`` (N, C, H, W), noise ``eps`` and scales ``a``, ``b`` (N,)."""
    return _bcast(a, x0) * x0 + _bcast(b, x0) * eps


def v_target(x0: torch.Tensor, eps: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The v-prediction target ``a eps - b x0`` of a VP model."""
    return _bcast(a, x0) * eps - _bcast(b, x0) * x0


def predicted_eps(pred: torch.Tensor, x_t: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                  objective: str) -> torch.Tensor:
    """Turn the denoiser's output into an epsilon estimate, in float32.

    epsilon: the output; v (VP): ``a v + b x_t``; flow velocity ``u = eps - x0``: ``x_t + a u``.
    """
    pred, x_t = pred.float(), x_t.float()
    if objective == "epsilon":
        return pred
    if objective == "v_prediction":
        return _bcast(a, x_t).float() * pred + _bcast(b, x_t).float() * x_t
    if objective == "flow":
        return x_t + _bcast(a, x_t).float() * pred
    raise ValueError(f"unsupported objective {objective!r}; expected one of {OBJECTIVES}")


def sample_error(eps: torch.Tensor, eps_hat: torch.Tensor, loss: str,
                 scale: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample error (N,), mean over C, H, W; ``scale`` (N,) multiplies the difference first."""
    diff = eps_hat.float() - eps.float()
    if scale is not None:
        diff = diff * _bcast(scale, diff).float()
    if loss == "l2":
        per = diff.pow(2)
    elif loss == "l1":
        per = diff.abs()
    elif loss == "huber":
        per = F.huber_loss(diff, torch.zeros_like(diff), reduction="none", delta=1.0)
    else:
        raise ValueError(f"unknown loss {loss!r}")
    return per.flatten(1).mean(1)


def x0_factor(lam: torch.Tensor) -> torch.Tensor:
    """``x0 - x0_hat = (b / a) (eps_hat - eps)`` with ``b / a = e^(-lam / 2)``, lam clamped at LAMBDA_MIN."""
    return torch.exp(-lam.clamp(min=LAMBDA_MIN) / 2)


def sample_weighting(grid: NoiseGrid, weighting: str, objective: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(weight, scale)`` (N,) float32 per sample: error = weight * loss(scale * (eps_hat - eps)).

    ``uniform``: the epsilon error on the model's own grid (Li et al.'s uniform-t error on VP
    models; on the shifted sigma grid for flows). ``elbo``: the epsilon error on a grid uniform in
    log-SNR (:func:`~clip_benchmark_diffusion.scoring.timesteps.vp_grid`), the variational bound up
    to a constant. ``native``: the family's training loss, i.e. the error in its own output space
    (epsilon; v = eps-error / a for VP; velocity = eps-error / (1 - s) = eps-error / a for flows).
    ``exp7``: Clark & Jaini's ``exp(-7 tau)`` on the x0 error. ``scale`` is None in epsilon space.
    """
    ones = torch.ones(len(grid), dtype=torch.float32)
    if weighting in ("uniform", "elbo"):
        return ones, None
    if weighting == "native":
        return ones, (None if objective == "epsilon" else (1 / grid.a).float())
    if weighting == "exp7":
        return torch.exp(-7.0 * grid.tau).float(), x0_factor(grid.lam).float()
    raise ValueError(f"unknown weighting {weighting!r}")
