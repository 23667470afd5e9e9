"""An out-of-memory error mid-run halves the denoiser batch and loses nothing (issue 27)."""
from __future__ import annotations

import pytest
import torch

from analytic_denoiser import SHAPE, cands, grid, images, oracle
from clip_benchmark_diffusion.options import ScoringOptions
from clip_benchmark_diffusion.scoring.batching import is_out_of_memory
from clip_benchmark_diffusion.scoring.engine import ScoringEngine


class _SmallDevice:
    """The analytic denoiser on a "device" that holds at most ``limit`` rows per call, from call ``after`` on."""

    def __init__(self, inner, limit: int, after: int = 0, error=torch.cuda.OutOfMemoryError) -> None:
        self.inner, self.limit, self.after, self.error = inner, limit, after, error
        self.calls, self.sizes = 0, []

    def __call__(self, x_t, levels, cond):
        self.calls += 1
        if self.calls > self.after and len(x_t) > self.limit:
            raise self.error(f"CUDA out of memory. Tried to allocate {len(x_t)} rows")
        self.sizes.append(len(x_t))
        return self.inner(x_t, levels, cond)


def _score(options, protos, x, denoiser=None, note=None):
    engine = ScoringEngine(denoiser or oracle("epsilon", "gaussian"), grid(options.max_sample_count, "epsilon",
                                                                         options.weighting),
                           "epsilon", options, "cpu", note=note)
    return engine.score(x, list(range(len(x))), cands(protos)), engine


@pytest.mark.parametrize("strategy", ["full", "anytime"])
@pytest.mark.parametrize("error", [torch.cuda.OutOfMemoryError, RuntimeError], ids=["cuda", "runtime"])
def test_an_out_of_memory_error_mid_run_halves_the_batch_and_changes_no_result(strategy, error):
    torch.manual_seed(0)
    protos = torch.randn(5, *SHAPE)
    x = images(protos, [0, 3, 1, 4, 2, 2], noise=1.0)
    options = ScoringOptions(strategy=strategy, n_samples=(12,), min_samples=4, max_samples=20, alpha=0.5,
                             batch_size=32)
    reference, ref_engine = _score(options, protos, x)
    notes: list[str] = []
    small = _SmallDevice(oracle("epsilon", "gaussian"), limit=10, after=2, error=error)  # fails from the 3rd call
    results, engine = _score(options, protos, x, small, notes.append)
    assert engine.batch_size == 8                                   # 32 -> 16 -> 8, the largest that fits
    assert max(small.sizes[2:]) <= 8 and small.sizes[:2] == [32, 32]
    assert len(notes) == 2 and "ran out of memory at a batch of 32; carrying on at 16" in notes[0]
    assert engine.stats.denoiser_calls == ref_engine.stats.denoiser_calls   # nothing computed twice or lost
    for a, b in zip(results, reference):
        assert a.denoiser_calls == b.denoiser_calls
        assert torch.equal(a.outcome.rank, b.outcome.rank)
        assert torch.allclose(a.outcome.mean_error, b.outcome.mean_error, rtol=1e-6, equal_nan=True)


def test_other_errors_and_a_batch_of_one_are_not_retried():
    torch.manual_seed(0)
    protos = torch.randn(3, *SHAPE)
    x = images(protos, [0, 1], noise=1.0)
    options = ScoringOptions(strategy="full", n_samples=(4,), batch_size=4)
    with pytest.raises(ValueError, match="not memory"):
        _score(options, protos, x, _SmallDevice(oracle("epsilon", "gaussian"), 1, error=lambda m: ValueError("not memory")))
    with pytest.raises(torch.cuda.OutOfMemoryError):
        _score(options, protos, x, _SmallDevice(oracle("epsilon", "gaussian"), limit=0))   # nothing fits


def test_out_of_memory_is_recognised_by_type_and_by_message():
    assert is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory"))
    assert is_out_of_memory(RuntimeError("MPS backend out of memory (MPS allocated: 8 GB)"))
    assert not is_out_of_memory(RuntimeError("expected scalar type Float"))
    assert not is_out_of_memory(ValueError("out of memory"))
