"""Analytic denoisers for engine and strategy tests, no model weights.

Class g's conditioning row carries a prototype image P_g. The "exact" oracle predicts the noise
as if the clean image were P_g: ``eps_hat = (x_t - sqrt(a) P_g) / sqrt(1 - a)``, so an image equal
to P_c has exactly zero error under class c. The "gaussian" denoiser is the Bayes-optimal one for
classes x0 ~ N(P_g, I): ``eps_hat = sqrt(1 - a) (x_t - sqrt(a) P_g)``, whose errors behave like a
real model's (bounded over t), so the diffusion classifier becomes a likelihood classifier.
"""
from __future__ import annotations

import torch

from clip_benchmark_diffusion.options import ScoringOptions
from clip_benchmark_diffusion.scoring.engine import Candidates, Schedule, ScoringEngine
from clip_benchmark_diffusion.scoring.math import v_target

SHAPE = (2, 4, 4)


def schedule(prediction_type: str = "epsilon") -> Schedule:
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    return Schedule(alphas_cumprod=torch.cumprod(1 - betas, 0), prediction_type=prediction_type)


def oracle(sched: Schedule, kind: str = "gaussian"):
    def denoise(x_t, t, cond):
        a = sched.alphas_cumprod[t].float()[:, None, None, None]
        proto = cond.reshape(len(cond), *SHAPE)
        if kind == "exact":
            eps_hat = (x_t - a.sqrt() * proto) / (1 - a).sqrt()
        else:
            eps_hat = (1 - a).sqrt() * (x_t - a.sqrt() * proto)
        if sched.prediction_type == "v_prediction":
            x0_hat = (x_t - (1 - a).sqrt() * eps_hat) / a.sqrt()
            return v_target(x0_hat, eps_hat, a.flatten())
        return eps_hat
    return denoise


def cands(protos: torch.Tensor) -> Candidates:
    return Candidates(cond=protos.reshape(len(protos), 1, -1), members=torch.arange(len(protos))[:, None])


def images(protos: torch.Tensor, labels: list[int], noise: float = 0.3) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return protos[labels] + noise * torch.randn(len(labels), *SHAPE, generator=g)


def run(options: ScoringOptions, protos, x, pred="epsilon", seeds=None, kind="gaussian",
        candidates: Candidates | None = None):
    """Score ``x`` against one candidate per prototype (or ``candidates``); (results, engine)."""
    sched = schedule(pred)
    engine = ScoringEngine(oracle(sched, kind), sched, options, "cpu")
    res = engine.score(x, seeds or list(range(len(x))), candidates or cands(protos))
    return res, engine
