"""Analytic denoisers for engine and strategy tests, no model weights.

Class g's conditioning row carries a prototype image P_g. The "exact" oracle predicts the noise
as if the clean image were P_g: ``eps_hat = (x_t - a P_g) / b``, so an image equal
to P_c has exactly zero error under class c. The "gaussian" denoiser is the Bayes-optimal one for
classes x0 ~ N(P_g, I) (for VP models ``eps_hat = b (x_t - a P_g)``), whose errors behave like a
real model's (bounded over t), so the diffusion classifier becomes a likelihood classifier. Both
speak epsilon, v or flow velocity, for any family's noise levels.
"""
from __future__ import annotations

import torch

from clip_benchmark_diffusion.options import ScoringOptions
from clip_benchmark_diffusion.scoring import math as smath
from clip_benchmark_diffusion.scoring.engine import Candidates, ScoringEngine
from clip_benchmark_diffusion.scoring.timesteps import NoiseGrid, flow_grid, vp_grid

SHAPE = (2, 4, 4)


def alphas_cumprod() -> torch.Tensor:
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    return torch.cumprod(1 - betas, 0)


def grid(n: int, objective: str = "epsilon", weighting: str = "uniform") -> NoiseGrid:
    if objective == "flow":
        return flow_grid(n, shift=3.0, weighting=weighting)
    return vp_grid(alphas_cumprod(), n, weighting)


def oracle(objective: str = "epsilon", kind: str = "gaussian"):
    """A denoiser whose output speaks ``objective``, passed through the package's own conversion.

    ``exact`` predicts the noise as if x0 were the prototype; ``gaussian`` is the posterior mean
    for x0 ~ N(P_g, I): x0_hat = P_g + a (x_t - a P_g) / (a^2 + b^2)."""
    def denoise(x_t, levels, cond):
        a, b = levels.a[:, None, None, None], levels.b[:, None, None, None]
        proto = cond["prototype"].reshape(len(x_t), *SHAPE)
        if kind == "exact":
            x0_hat = proto
        else:
            x0_hat = proto + a * (x_t - a * proto) / (a * a + b * b)
        eps_hat = (x_t - a * x0_hat) / b
        out = {"epsilon": eps_hat, "v_prediction": a * eps_hat - b * x0_hat, "flow": eps_hat - x0_hat}[objective]
        return smath.predicted_eps(out, x_t, levels.a, levels.b, objective)
    return denoise


def cands(protos: torch.Tensor) -> Candidates:
    return Candidates(cond={"prototype": protos.reshape(len(protos), -1)}, members=torch.arange(len(protos))[:, None])


def images(protos: torch.Tensor, labels: list[int], noise: float = 0.3) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return protos[labels] + noise * torch.randn(len(labels), *SHAPE, generator=g)


def run(options: ScoringOptions, protos, x, pred="epsilon", seeds=None, kind="gaussian",
        candidates: Candidates | None = None):
    """Score ``x`` against one candidate per prototype (or ``candidates``); (results, engine)."""
    g = grid(options.max_sample_count, pred, options.weighting)
    engine = ScoringEngine(oracle(pred, kind), g, pred, options, "cpu")
    res = engine.score(x, seeds or list(range(len(x))), candidates or cands(protos))
    return res, engine
