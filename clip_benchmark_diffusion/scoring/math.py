"""Closed-form pieces of the diffusion-classifier score; no I/O, no models.

Notation (DESIGN.md §4): ``a = alpha_bar_t``; ``x_t = sqrt(a) x0 + sqrt(1 - a) eps``.
All errors are float32 whatever dtype the denoiser ran in.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

PREDICTION_TYPES = ("epsilon", "v_prediction")


def _bcast(a: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return a.reshape(-1, *([1] * (like.ndim - 1))).to(like)


def add_noise(x0: torch.Tensor, eps: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """Forward diffusion: ``x_t`` for clean ``x0`` (N, C, H, W), noise ``eps`` and ``alpha_bar`` (N,)."""
    a = _bcast(alpha_bar, x0)
    return a.sqrt() * x0 + (1 - a).sqrt() * eps


def v_target(x0: torch.Tensor, eps: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """The v-prediction target ``sqrt(a) eps - sqrt(1 - a) x0`` (Salimans & Ho 2022)."""
    a = _bcast(alpha_bar, x0)
    return a.sqrt() * eps - (1 - a).sqrt() * x0


def predicted_eps(pred: torch.Tensor, x_t: torch.Tensor, alpha_bar: torch.Tensor,
                  prediction_type: str) -> torch.Tensor:
    """Turn the denoiser's output into an epsilon estimate, in float32."""
    pred = pred.float()
    if prediction_type == "epsilon":
        return pred
    if prediction_type == "v_prediction":
        a = _bcast(alpha_bar, x_t).float()
        return a.sqrt() * pred + (1 - a).sqrt() * x_t.float()
    raise ValueError(f"unsupported prediction type {prediction_type!r}; expected one of {PREDICTION_TYPES}")


def x0_factor(alpha_bar: torch.Tensor) -> torch.Tensor:
    """``x0 - x0_hat = sqrt((1 - a) / a) * (eps_hat - eps)``: the scale from eps space to x0 space."""
    return ((1 - alpha_bar) / alpha_bar).sqrt()


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


def snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    return alphas_cumprod / (1 - alphas_cumprod)


def timestep_weighting(t: torch.Tensor, alphas_cumprod: torch.Tensor, weighting: str,
                       num_train_timesteps: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Return ``(weight, x0_scale)`` for timesteps ``t`` (N,).

    ``uniform``: the epsilon error as is (Li et al.).
    ``exp7``: ``exp(-7 t / T)`` times the x0-space error (Clark & Jaini).
    ``snr``: the x0-space error weighted by the discrete ``-dSNR/dt`` (the variational bound).
    ``x0_scale`` is None when the error stays in epsilon space.
    """
    a = alphas_cumprod.to(t.device, torch.float64)
    if weighting == "uniform":
        return torch.ones_like(t, dtype=torch.float32), None
    scale = x0_factor(a[t]).float()
    if weighting == "exp7":
        return torch.exp(-7.0 * t.double() / num_train_timesteps).float(), scale
    if weighting == "snr":
        s = snr(a)
        drop = torch.cat([s[:-1] - s[1:], (s[-2] - s[-1]).reshape(1)])  # (T,) forward difference
        return drop[t].float(), scale
    raise ValueError(f"unknown weighting {weighting!r}")
