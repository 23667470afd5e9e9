"""scripts/replay_strategies.py: one full evaluation's per-sample errors replay every strategy exactly."""
from __future__ import annotations

import pytest
import torch

import analytic_denoiser as ad
from cli_helpers import load_script
from clip_benchmark_diffusion.options import ScoringOptions
from clip_benchmark_diffusion.scoring.engine import ScoringEngine


@pytest.mark.parametrize("spec", [
    dict(strategy="anytime", min_samples=4, max_samples=30, alpha=0.05),
    dict(strategy="ttest", min_samples=6, max_samples=30, p_value=2e-3),
    dict(strategy="staged", n_samples=(6, 30), to_keep=(3, 1)),
    dict(strategy="anytime", min_samples=4, max_samples=30, alpha=0.05, sample_norm="mean"),
    dict(strategy="anytime", min_samples=4, max_samples=30, alpha=0.05, guarantee="full"),
    dict(strategy="sift_refine", max_samples=30, sift_threshold=1.0, sift_keep=2),
    dict(strategy="anytime", min_samples=4, max_samples=30, alpha=0.05, guarantee="full", variance="successive"),
])
def test_replaying_a_full_capture_gives_the_engines_own_decisions_and_calls(spec):
    replay = load_script("replay_strategies")
    g = torch.Generator().manual_seed(0)
    protos = torch.randn(6, *ad.SHAPE, generator=g)
    x = ad.images(protos, [0, 1, 2, 3, 4, 5, 0, 1], noise=1.2)   # noisy: several candidates stay in the race
    seeds = list(range(len(x)))
    options = ScoringOptions(batch_size=37).replace(**spec)
    direct = ScoringEngine(ad.oracle(), ad.grid(30), "epsilon", options, "cpu").score(x, seeds, ad.cands(protos))

    full = ScoringEngine(ad.oracle(), ad.grid(30), "epsilon", options.replace(strategy="full", n_samples=(30,)), "cpu")
    full.checkpoint_s = 0.0
    rec = replay._Recorder()
    full.score(x, seeds, ad.cands(protos), checkpoints=rec)
    assert any(r.denoiser_calls > 4 * 6 for r in direct)          # not all decided at the first look
    for i, result in enumerate(direct):
        outcome, calls = replay.replay_one(options, rec.cerr[i][:, 0, :])
        assert torch.equal(outcome.rank, result.outcome.rank)
        assert calls == result.denoiser_calls
        assert torch.allclose(outcome.mean_error, result.outcome.mean_error)


def test_sample_norm_decisions_ignore_any_positive_rescaling_of_a_sample_and_raw_ones_do_not():
    """What "mean" normalisation buys: a sample whose errors are all k times larger (a noise level
    where every gap is k times larger) weighs the same as the others."""
    replay = load_script("replay_strategies")
    g = torch.Generator().manual_seed(3)
    G, N = 8, 40
    err = 1.0 + 0.05 * torch.randn(G, N, generator=g)
    err[2] -= 0.03                                            # the best class, by a little
    scale = torch.exp(2.0 * torch.randn(1, N, generator=g))  # per-sample scales spanning ~50x
    for norm, same in (("mean", True), ("none", False)):
        options = ScoringOptions().replace(strategy="anytime", min_samples=4, max_samples=N, sample_norm=norm)
        a, calls_a = replay.replay_one(options, err)
        b, calls_b = replay.replay_one(options, err * scale)
        assert (torch.equal(a.rank, b.rank) and calls_a == calls_b) is same
        if same:
            assert torch.allclose(a.mean_error, b.mean_error)


@pytest.mark.parametrize("objective", ["epsilon", "flow"])
@pytest.mark.parametrize("weighting", ["native", "exp7"])
def test_a_uniform_capture_reweighted_offline_equals_scoring_under_that_weighting(objective, weighting):
    """``replay --weighting`` turns one capture into another weighting's errors on the same grid,
    exactly as the engine computes them (weight * scale^2 on the l2 epsilon error)."""
    replay = load_script("replay_strategies")
    g = torch.Generator().manual_seed(1)
    protos = torch.randn(4, *ad.SHAPE, generator=g)
    x = ad.images(protos, [0, 1, 2, 3], noise=0.8)
    seeds = list(range(len(x)))
    grid = ad.grid(12, objective)
    base = ScoringOptions(batch_size=16).replace(strategy="full", n_samples=(12,), max_samples=12)

    def errors(options):
        engine = ScoringEngine(ad.oracle(objective), grid, objective, options, "cpu")
        engine.checkpoint_s = 0.0
        rec = replay._Recorder()
        engine.score(x, seeds, ad.cands(protos), checkpoints=rec)
        return torch.stack([rec.cerr[i][:, 0, :] for i in range(len(x))])

    uniform = errors(base)
    capture = {"err": uniform, "options": base.to_dict(), "objective": objective,
               "grid": {**grid.describe(digits=8), "a": grid.a.tolist(), "b": grid.b.tolist()}}
    expected = errors(base.replace(weighting=weighting))
    # native on an epsilon model is its epsilon error; every other pair changes the errors
    assert torch.allclose(uniform, expected) is (objective == "epsilon" and weighting == "native")
    assert torch.allclose(replay.reweighted(capture, weighting), expected, rtol=1e-5)
    # Older captures without a and b: rebuilt from tau (flow) or log-SNR (VP).
    del capture["grid"]["a"], capture["grid"]["b"]
    assert torch.allclose(replay.reweighted(capture, weighting), expected, rtol=1e-4)
    with pytest.raises(SystemExit, match="its own grid"):
        replay.reweighted(capture, "elbo")
