"""The packed-batch engine and the strategies, with the analytic denoisers of analytic_denoiser.py."""
from __future__ import annotations

import pytest
import torch

from analytic_denoiser import SHAPE, images, run
from clip_benchmark_diffusion.options import ScoringOptions
from clip_benchmark_diffusion.scoring.engine import Candidates


@pytest.fixture
def protos() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(5, *SHAPE)                                   # 5 classes


def test_oracle_gives_zero_error_for_the_true_class(protos):
    res, _ = run(ScoringOptions(strategy="full", n_samples=(8,)), protos, protos[[2, 4]], kind="exact")
    for r, label in zip(res, [2, 4]):
        assert r.outcome.mean_error[label].abs().item() < 1e-6
        assert r.outcome.rank[label] == 0
        assert (r.outcome.mean_error[torch.arange(5) != label] > 0.01).all()


def test_full_strategy_calls_and_ranking_match_mean_error(protos):
    labels = [0, 1, 2, 3, 4, 0]
    res, engine = run(ScoringOptions(strategy="full", n_samples=(10,), batch_size=7), protos, images(protos, labels))
    assert [r.denoiser_calls for r in res] == [50] * 6
    assert engine.stats.denoiser_calls == 300
    for r, label in zip(res, labels):
        assert torch.equal(r.outcome.rank, torch.argsort(torch.argsort(r.outcome.mean_error)))
        assert r.outcome.rank[label] == 0


@pytest.mark.parametrize("strategy", ["full", "staged", "ttest", "anytime"])
def test_scores_do_not_depend_on_batch_size_or_batch_neighbours(protos, strategy):
    opts = dict(full=dict(n_samples=(12,)), staged=dict(n_samples=(4, 12), to_keep=(2, 1)),
                ttest=dict(min_samples=4, max_samples=30, p_value=0.05),
                anytime=dict(min_samples=4, max_samples=30, alpha=0.5, survivors=2))[strategy]
    x = images(protos, [0, 3, 1, 4], noise=1.0)
    seeds = [11, 12, 13, 14]
    a, _ = run(ScoringOptions(strategy=strategy, batch_size=3, **opts), protos, x, seeds=seeds)
    b, _ = run(ScoringOptions(strategy=strategy, batch_size=64, **opts), protos, x[[3, 1]], seeds=[14, 12])
    for i, j in [(3, 0), (1, 1)]:
        assert torch.equal(a[i].outcome.rank, b[j].outcome.rank)
        assert torch.equal(a[i].outcome.samples, b[j].outcome.samples)
        assert torch.allclose(a[i].outcome.mean_error, b[j].outcome.mean_error, rtol=1e-5, equal_nan=True)
        assert torch.equal(a[i].outcome.prob, b[j].outcome.prob)


def test_ttest_eliminates_and_costs_less_than_full(protos):
    x = images(protos, [0, 1, 2, 3, 4], noise=0.5)
    full, _ = run(ScoringOptions(strategy="full", n_samples=(50,)), protos, x)
    tt, _ = run(ScoringOptions(strategy="ttest", min_samples=5, max_samples=50, p_value=2e-3), protos, x)
    assert sum(r.denoiser_calls for r in tt) < sum(r.denoiser_calls for r in full) / 2
    assert [int(r.outcome.rank.argmin()) for r in tt] == [int(r.outcome.rank.argmin()) for r in full] == [0, 1, 2, 3, 4]
    for r in tt:
        winner = int(r.outcome.rank.argmin())
        assert r.outcome.samples[winner] >= r.outcome.samples.max() - 0  # the winner saw the most samples
        assert (r.outcome.samples >= 5).all()


def test_staged_keeps_the_best_and_counts_calls(protos):
    x = images(protos, [2], noise=0.5)
    res, _ = run(ScoringOptions(strategy="staged", n_samples=(4, 16), to_keep=(2, 1)), protos, x)
    r = res[0]
    assert r.denoiser_calls == 5 * 4 + 2 * (16 - 4)               # nested grids: stage 2 reuses stage 1
    assert sorted(r.outcome.samples.tolist()) == [4, 4, 4, 16, 16]
    assert r.outcome.rank[2] == 0
    assert (r.outcome.rank[r.outcome.samples == 16] < 2).all()    # survivors rank above the eliminated


def test_v_prediction_oracle_ranks_like_epsilon(protos):
    x = images(protos, [0, 2, 4], noise=0.8)
    opts = ScoringOptions(strategy="full", n_samples=(16,))
    eps_res, _ = run(opts, protos, x, pred="epsilon")
    v_res, _ = run(opts, protos, x, pred="v_prediction")
    for e, v in zip(eps_res, v_res):
        assert torch.equal(e.outcome.rank, v.outcome.rank)
        assert torch.allclose(e.outcome.mean_error, v.outcome.mean_error, rtol=1e-3)


def test_unequal_prompt_lists_average_member_errors(protos):
    # Class 0 has members (P0, P1); class 1 has just P2.
    c = Candidates(cond={"prototype": protos[:3].reshape(3, -1)}, members=torch.tensor([[0, 1], [2, -1]]))
    single = Candidates(cond={"prototype": protos[:3].reshape(3, -1)}, members=torch.tensor([[0], [1], [2]]))
    opts = ScoringOptions(strategy="full", n_samples=(6,))
    x = images(protos, [1], noise=0.2)
    [grouped], _ = run(opts, protos, x, seeds=[5], candidates=c)
    [each], _ = run(opts, protos, x, seeds=[5], candidates=single)
    assert grouped.denoiser_calls == 3 * 6
    expected = torch.stack([(each.outcome.mean_error[0] + each.outcome.mean_error[1]) / 2, each.outcome.mean_error[2]])
    assert torch.allclose(grouped.outcome.mean_error, expected, rtol=1e-5)


def test_packed_batches_are_full_while_work_waits(protos):
    x = images(protos, [0, 1, 2, 3, 4, 0, 1, 2], noise=0.5)
    _, engine = run(ScoringOptions(strategy="full", n_samples=(20,), batch_size=32), protos, x)
    # 8 images x 5 classes x 20 samples = 800 items = exactly 25 full batches.
    assert engine.stats.denoiser_batches == 25
    assert engine.stats.as_dict()["mean_denoiser_batch"] == 32


def test_lookahead_fills_partial_batches_without_changing_scores(protos):
    x = images(protos, [0, 1, 2], noise=1.0)
    opts = dict(strategy="ttest", min_samples=4, max_samples=40, p_value=0.01, batch_size=16)
    plain, e_plain = run(ScoringOptions(**opts), protos, x)
    ahead, e_ahead = run(ScoringOptions(lookahead=8, **opts), protos, x)
    for a, b in zip(plain, ahead):
        assert torch.equal(a.outcome.rank, b.outcome.rank)
        assert torch.equal(a.outcome.samples, b.outcome.samples)
    assert e_ahead.stats.as_dict()["mean_denoiser_batch"] > e_plain.stats.as_dict()["mean_denoiser_batch"]
    assert e_ahead.stats.denoiser_calls >= e_plain.stats.denoiser_calls
