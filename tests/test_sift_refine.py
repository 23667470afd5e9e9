"""Sift-and-Refine (Chen et al., NeurIPS 2024) as a baseline strategy: the rule by hand, the engine, options."""
from __future__ import annotations

import pytest
import torch

from analytic_denoiser import images, run
from clip_benchmark_diffusion.errors import UserError
from clip_benchmark_diffusion.options import ScoringOptions
from clip_benchmark_diffusion.scoring.strategies import SiftRefineStrategy, make_strategy


def _drive(st, err: torch.Tensor) -> int:
    """Feed ``err`` entry by entry as the engine would; the calls spent."""
    calls = 0
    while not st.done:
        want = st.wanted()
        calls += int(want.sum())
        st.record(want, err)
        st.update()
    return calls


def test_sift_drops_on_the_summed_gap_to_the_leader_by_hand():
    # Summed errors after n samples: class 0: 1, 2, 3, ...; class 1: 1.3, 2.6, ... (0.3 behind per sample);
    # class 2: 3, 6, ... (2 behind per sample). Threshold 1: class 2 goes at n = 1 (gap 2 > 1), class 1 at
    # n = 4 (gap 1.2 > 1; 0.9 at n = 3 is not enough). One left: done after 4 samples.
    err = torch.tensor([[1.0] * 10, [1.3] * 10, [3.0] * 10])
    st = SiftRefineStrategy(3, max_samples=10, threshold=1.0)
    assert _drive(st, err) == 3 + 2 * 3
    assert st.used.tolist() == [4, 4, 1]
    assert st.outcome().rank.tolist() == [0, 1, 2]


def test_the_threshold_is_absolute_so_scaling_the_errors_changes_the_decisions():
    # What separates it from the anytime rule: errors 10x larger reach a fixed threshold 10x sooner.
    err = torch.tensor([[1.0] * 10, [1.3] * 10])
    small, large = SiftRefineStrategy(2, 10, threshold=1.0), SiftRefineStrategy(2, 10, threshold=1.0)
    _drive(small, err)
    _drive(large, 10 * err)
    assert (small.used[1].item(), large.used[1].item()) == (4, 1)


def test_refine_scores_the_kept_candidates_on_every_sample_as_full_evaluation_would():
    # Class 1 leads on the first samples and loses on the rest: sifting (keep 2) drops only class 3, the
    # refine reads all 8 samples of classes 0-2 and ranks them by mean, so full evaluation's top-1 (0) wins.
    err = torch.tensor([[2.0, 2.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0],
                        [1.0, 1.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0],
                        [2.2, 2.2, 2.2, 2.2, 2.2, 2.2, 2.2, 2.2],
                        [9.0, 9.0, 9.0, 9.0, 9.0, 9.0, 9.0, 9.0]])
    st = SiftRefineStrategy(4, max_samples=8, threshold=2.5, keep=2)
    calls = _drive(st, err)
    # n = 1: class 3 is 8 behind (dropped); n = 2: class 2 is 2.4 behind class 1 (kept, < 2.5); n = 3: 2.6 (dropped).
    assert st.used.tolist() == [8, 8, 3, 1]
    assert calls == 4 + 3 + 3 + 2 * 5
    assert int(st.outcome().rank.argmin()) == int(err.mean(1).argmin()) == 0


def test_an_unspent_sift_keeps_the_lowest_sums():
    # Nothing reaches the threshold in 5 samples: the keep = 1 lowest sum wins, the others are dropped.
    err = torch.tensor([[1.0] * 5, [1.1] * 5, [1.2] * 5])
    st = SiftRefineStrategy(3, max_samples=5, threshold=100.0)
    assert _drive(st, err) == 15
    assert st.alive.tolist() == [True, False, False] and st.outcome().rank.tolist() == [0, 1, 2]


def test_sift_refine_through_the_engine_agrees_with_full_for_fewer_calls():
    torch.manual_seed(0)
    protos = torch.randn(5, 2, 4, 4)
    x = images(protos, [0, 1, 2, 3, 4, 0, 1, 2], noise=0.5)
    full, _ = run(ScoringOptions(strategy="full", n_samples=(50,)), protos, x)
    top1 = [int(r.outcome.rank.argmin()) for r in full]
    assert top1 == [0, 1, 2, 3, 4, 0, 1, 2]
    opts = ScoringOptions().replace(strategy="sift_refine", max_samples=50, sift_threshold=1.0)
    sift, engine = run(opts, protos, x)       # mean errors here are 0.2 to 0.5
    assert [int(r.outcome.rank.argmin()) for r in sift] == top1
    assert engine.stats.denoiser_calls == 320 and all(r.denoiser_calls == int(r.outcome.samples.sum()) for r in sift)
    # Too small a threshold drops the first image's class on an early unlucky sample: the baseline's
    # weakness, a threshold that knows nothing of the noise in the differences.
    hasty, _ = run(opts.replace(sift_threshold=0.1), protos, x)
    assert [int(r.outcome.rank.argmin()) for r in hasty] == [3] + top1[1:]


def test_options():
    opts = ScoringOptions().replace(strategy="sift_refine", sift_threshold=0.02, max_samples=50)
    assert isinstance(make_strategy(opts, 10), SiftRefineStrategy) and opts.max_sample_count == 50
    assert opts.fingerprint_dict()["sift_threshold"] == 0.02 and opts.fingerprint_dict()["sift_keep"] == 1
    # Other strategies' store keys do not carry the new fields.
    assert not {"sift_threshold", "sift_keep"} & set(ScoringOptions().fingerprint_dict())
    for bad in ({}, {"sift_threshold": -1.0}, {"sift_threshold": float("nan")}, {"sift_threshold": 1.0, "sift_keep": 0}):
        with pytest.raises(UserError, match="sift_refine needs sift_threshold > 0"):
            ScoringOptions().replace(strategy="sift_refine", **bad)
