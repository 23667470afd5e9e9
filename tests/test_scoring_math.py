"""The scoring math against closed forms."""
from __future__ import annotations

import pytest
import torch

from clip_benchmark_diffusion.scoring import math as smath
from clip_benchmark_diffusion.scoring.noise import NoiseBank, image_seed
from clip_benchmark_diffusion.store import image_digest
from clip_benchmark_diffusion.scoring.timesteps import sample_order, uniform_grid


@pytest.fixture
def alphas() -> torch.Tensor:
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)


def test_true_noise_scores_zero_error(alphas):
    torch.manual_seed(0)
    x0, eps = torch.randn(6, 4, 8, 8), torch.randn(6, 4, 8, 8)
    t = torch.tensor([0, 100, 300, 500, 700, 999])
    a = alphas[t].float()
    x_t = smath.add_noise(x0, eps, a)
    for loss in ("l2", "l1", "huber"):
        err = smath.sample_error(eps, smath.predicted_eps(eps, x_t, a, "epsilon"), loss)
        assert torch.equal(err, torch.zeros(6))


def test_v_prediction_oracle_recovers_eps_and_ranks_like_epsilon(alphas):
    torch.manual_seed(1)
    x0, eps = torch.randn(5, 4, 8, 8), torch.randn(5, 4, 8, 8)
    t = torch.tensor([10, 250, 500, 750, 990])
    a = alphas[t].float()
    x_t = smath.add_noise(x0, eps, a)
    eps_from_v = smath.predicted_eps(smath.v_target(x0, eps, a), x_t, a, "v_prediction")
    assert torch.allclose(eps_from_v, eps, atol=1e-4)
    # Candidates whose predictions are the oracle plus growing perturbations rank the same way
    # whether the model speaks epsilon or v.
    deltas = [0.0, 0.1, 0.3, 1.0]
    pert = torch.randn(5, 4, 8, 8)
    e_eps = [smath.sample_error(eps, eps + d * pert, "l2").mean() for d in deltas]
    v_preds = [smath.v_target(x0, eps, a) + d * pert for d in deltas]
    e_v = [smath.sample_error(eps, smath.predicted_eps(v, x_t, a, "v_prediction"), "l2").mean() for v in v_preds]
    assert torch.argsort(torch.stack(e_eps)).tolist() == torch.argsort(torch.stack(e_v)).tolist() == [0, 1, 2, 3]


def test_l2_x0_error_is_scaled_eps_error(alphas):
    torch.manual_seed(2)
    x0, eps, eps_hat = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    t = torch.tensor([50, 500, 900])
    a = alphas[t].float()
    x_t = smath.add_noise(x0, eps, a)
    x0_hat = (x_t - (1 - a).sqrt()[:, None, None, None] * eps_hat) / a.sqrt()[:, None, None, None]
    direct = (x0 - x0_hat).pow(2).flatten(1).mean(1)
    via_scale = smath.sample_error(eps, eps_hat, "l2", smath.x0_factor(a))
    assert torch.allclose(direct, via_scale, rtol=1e-4)
    assert torch.allclose(via_scale, (1 - a) / a * smath.sample_error(eps, eps_hat, "l2"), rtol=1e-5)


def test_weightings(alphas):
    t = torch.tensor([0, 500, 999])
    w, scale = smath.timestep_weighting(t, alphas, "uniform", 1000)
    assert scale is None and torch.equal(w, torch.ones(3))
    w, scale = smath.timestep_weighting(t, alphas, "exp7", 1000)
    assert torch.allclose(w, torch.exp(-7 * t / 1000.0).float())
    assert torch.allclose(scale, ((1 - alphas[t]) / alphas[t]).sqrt().float())
    w, _ = smath.timestep_weighting(t, alphas, "snr", 1000)
    s = alphas / (1 - alphas)
    assert torch.allclose(w[:2], (s[t[:2]] - s[t[:2] + 1]).float())
    assert (w > 0).all()


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
