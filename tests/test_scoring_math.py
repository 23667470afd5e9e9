"""The scoring math against closed forms."""
from __future__ import annotations

import math

import pytest
import torch

from clip_benchmark_diffusion.scoring import math as smath
from clip_benchmark_diffusion.scoring.noise import NoiseBank, image_seed
from clip_benchmark_diffusion.results.keys import image_digest
from clip_benchmark_diffusion.scoring.timesteps import flow_grid, sample_order, uniform_grid, vp_grid


@pytest.fixture
def alphas() -> torch.Tensor:
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)


def _ab(alphas: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return alphas[t].sqrt().float(), (1 - alphas[t]).sqrt().float()


def test_true_noise_scores_zero_error(alphas):
    torch.manual_seed(0)
    x0, eps = torch.randn(6, 4, 8, 8), torch.randn(6, 4, 8, 8)
    a, b = _ab(alphas, torch.tensor([0, 100, 300, 500, 700, 999]))
    x_t = smath.add_noise(x0, eps, a, b)
    for loss in ("l2", "l1", "huber"):
        err = smath.sample_error(eps, smath.predicted_eps(eps, x_t, a, b, "epsilon"), loss)
        assert torch.equal(err, torch.zeros(6))


@pytest.mark.parametrize("objective", ["v_prediction", "flow"])
def test_oracle_of_every_objective_recovers_eps_and_ranks_like_epsilon(alphas, objective):
    """An oracle in v or flow-velocity space gives eps back; at one shared sample, perturbed
    predictions rank the same in every parametrisation."""
    torch.manual_seed(1)
    x0, eps = torch.randn(5, 4, 8, 8), torch.randn(5, 4, 8, 8)
    if objective == "flow":
        s = torch.tensor([0.05, 0.3, 0.5, 0.7, 0.95])
        a, b = 1 - s, s
        target = eps - x0
    else:
        a, b = _ab(alphas, torch.tensor([10, 250, 500, 750, 990]))
        target = smath.v_target(x0, eps, a, b)
    x_t = smath.add_noise(x0, eps, a, b)
    assert torch.allclose(smath.predicted_eps(target, x_t, a, b, objective), eps, atol=1e-4)
    deltas = [0.0, 0.1, 0.3, 1.0]
    pert = torch.randn(5, 4, 8, 8)
    e_eps = torch.stack([smath.sample_error(eps, eps + d * pert, "l2") for d in deltas])            # (4, 5)
    e_obj = torch.stack([smath.sample_error(eps, smath.predicted_eps(target + d * pert, x_t, a, b, objective), "l2")
                         for d in deltas])
    assert torch.equal(torch.argsort(e_eps, 0), torch.argsort(e_obj, 0))
    assert torch.argsort(e_obj[:, 2]).tolist() == [0, 1, 2, 3]


def test_l2_x0_error_is_scaled_eps_error(alphas):
    torch.manual_seed(2)
    x0, eps, eps_hat = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    a, b = _ab(alphas, torch.tensor([50, 500, 900]))
    x_t = smath.add_noise(x0, eps, a, b)
    x0_hat = (x_t - b[:, None, None, None] * eps_hat) / a[:, None, None, None]
    direct = (x0 - x0_hat).pow(2).flatten(1).mean(1)
    lam = 2 * (a.log() - b.log())
    via_scale = smath.sample_error(eps, eps_hat, "l2", smath.x0_factor(lam))
    assert torch.allclose(direct, via_scale, rtol=1e-4)
    assert torch.allclose(via_scale, (b / a) ** 2 * smath.sample_error(eps, eps_hat, "l2"), rtol=1e-5)


def test_weightings_on_a_vp_grid(alphas):
    g = vp_grid(alphas, 8, "uniform")
    t = g.model_time.long()
    w, scale = smath.sample_weighting(g, "uniform", "epsilon")
    assert scale is None and torch.equal(w, torch.ones(8))
    assert smath.sample_weighting(g, "native", "epsilon")[1] is None            # eps models train on eps
    w, scale = smath.sample_weighting(g, "native", "v_prediction")
    assert torch.allclose(scale, 1 / alphas[t].sqrt().float())                   # v error = eps error / a
    w, scale = smath.sample_weighting(g, "exp7", "epsilon")
    assert torch.allclose(w, torch.exp(-7 * t / 1000.0).float())
    assert torch.allclose(scale, ((1 - alphas[t]) / alphas[t]).sqrt().float())


def test_flow_native_weight_is_the_velocity_error():
    g = flow_grid(6, shift=3.0, weighting="native")
    _, scale = smath.sample_weighting(g, "native", "flow")
    assert torch.allclose(scale, (1 / (1 - g.tau)).float())


def test_x0_factor_is_guarded_at_extreme_noise():
    # IF's cosine schedule reaches alpha_bar ~ 2e-9 (lam ~ -20): the x0 factor stops at e^5.
    lam = torch.tensor([-20.0, -10.0, 0.0, 4.0])
    assert torch.allclose(smath.x0_factor(lam), torch.tensor([math.exp(5), math.exp(5), 1.0, math.exp(-2)]))


def test_elbo_grid_is_uniform_in_log_snr(alphas):
    for g in (vp_grid(alphas, 50, "elbo"), flow_grid(50, shift=3.0, weighting="elbo")):
        lam = torch.sort(g.lam).values
        lo, hi = float(lam[0]), float(lam[-1])
        assert -10.0 <= lo < hi <= 10.0
        gaps = torch.diff(lam)
        assert gaps.max() < 2.5 * gaps.mean()                                   # near-even spacing in lam
    flow = torch.sort(flow_grid(50, shift=3.0, weighting="elbo").lam).values
    assert torch.allclose(torch.diff(flow), torch.full((49,), 20.0 / 50, dtype=torch.float64), atol=1e-9)


def test_flow_grid_uses_the_model_shift():
    u = (torch.arange(4, dtype=torch.float64) + 0.5) / 4
    g = flow_grid(4, shift=3.0, weighting="uniform", time_scale=1000.0)
    sigma = torch.sort(g.tau).values
    assert torch.allclose(sigma, 3 * u / (1 + 2 * u))
    assert torch.allclose(torch.sort(g.model_time).values, 1000 * sigma)
    assert torch.allclose(g.a + g.b, torch.ones(4, dtype=torch.float64))
    # a shift k moves log-SNR by exactly -2 ln k
    plain = flow_grid(4, shift=1.0, weighting="uniform")
    assert torch.allclose(torch.sort(plain.lam).values - 2 * math.log(3.0), torch.sort(g.lam).values)


def test_uniform_grid_is_li_et_al():
    assert uniform_grid(50, 1000).tolist() == list(range(10, 1000, 20))
    assert uniform_grid(500, 1000).tolist() == list(range(1, 1000, 2))


def test_sample_order_prefixes_are_nested_uniform_grids():
    order = sample_order(64, 1000)
    assert sorted(order.tolist()) == uniform_grid(64, 1000).tolist()
    # Every power-of-two prefix is an evenly spaced sub-grid.
    for n in (2, 4, 8, 16, 32):
        gaps = torch.diff(torch.sort(order[:n]).values)
        assert gaps.min() == gaps.max() == 1000 // 64 * (64 // n)


def test_noise_depends_on_seed_and_image_not_on_query_order():
    img = torch.rand(3, 8, 8) * 2 - 1
    s = image_seed(image_digest(img), seed=0)
    assert s == image_seed(image_digest(img.clone()), seed=0)
    assert s != image_seed(image_digest(img), seed=1)
    assert s != image_seed(image_digest(torch.flip(img, [2])), seed=0)
    bank_a, bank_b = NoiseBank(s, (4, 2, 2), "cpu"), NoiseBank(s, (4, 2, 2), "cpu")
    k = torch.tensor([3, 70, 0, 129])
    together = bank_a.get(k)
    one_by_one = torch.cat([bank_b.get(k[i : i + 1]) for i in range(4)])
    assert torch.equal(together, one_by_one)
    assert not torch.equal(together[0], together[1])
