"""Per-image checkpoints: a kill mid-batch loses seconds, and a resumed image ends exactly as an uninterrupted one."""
from __future__ import annotations

import pytest
import torch

from analytic_denoiser import SHAPE, cands, grid, images, oracle
from clip_benchmark_diffusion.checkpoints import StoreCheckpoints, decode, encode
from clip_benchmark_diffusion.options import ScoringOptions
from clip_benchmark_diffusion.scoring.engine import ScoringEngine
from clip_benchmark_diffusion.store import ScoreStore


class _Killed(Exception):
    pass


class _KillAfter:
    """Keeps checkpoints in a store, and 'dies' after ``saves`` of them."""

    def __init__(self, inner: StoreCheckpoints, saves: int) -> None:
        self.inner, self.left = inner, saves

    def load(self, i):
        return self.inner.load(i)

    def save(self, i, cerr, calls):
        self.inner.save(i, cerr, calls)
        self.left -= 1
        if self.left == 0:
            raise _Killed


def _engine(options: ScoringOptions) -> ScoringEngine:
    engine = ScoringEngine(oracle("epsilon", "gaussian"), grid(options.max_sample_count, "epsilon", options.weighting),
                           "epsilon", options, "cpu")
    engine.checkpoint_s = 0.0  # every denoiser batch: the test kills between two of them
    return engine


def test_encoding_is_exact():
    cerr = torch.tensor([[[0.5, float("nan")], [1e-8, 3.0]]])
    back, calls = decode(encode(cerr, 7))
    assert calls == 7 and torch.equal(back.isnan(), cerr.isnan()) and torch.equal(back.nan_to_num(), cerr.nan_to_num())


@pytest.mark.parametrize("strategy", ["full", "ttest"])
def test_a_batch_killed_mid_way_resumes_from_its_checkpoints_to_the_same_results(strategy, tmp_path):
    torch.manual_seed(0)
    protos = torch.randn(5, *SHAPE)
    x = images(protos, [0, 3, 1, 4, 2, 2], noise=1.0)
    seeds = list(range(6))
    options = ScoringOptions(strategy=strategy, n_samples=(12,), min_samples=4, max_samples=30, p_value=0.05,
                             batch_size=16)
    reference = _engine(options).score(x, seeds, cands(protos))
    total = sum(r.denoiser_calls for r in reference)

    keys = [f"img{i}" for i in range(6)]
    with ScoreStore(tmp_path / "s.sqlite") as store:
        killed = _engine(options)
        with pytest.raises(_Killed):
            killed.score(x, seeds, cands(protos), checkpoints=_KillAfter(StoreCheckpoints(store, keys), saves=12))
        assert not killed.stats.images                                # killed before any image was decided
        resumed = _engine(options)
        results = resumed.score(x, seeds, cands(protos), checkpoints=StoreCheckpoints(store, keys))
    for a, b in zip(results, reference):
        assert torch.equal(a.outcome.rank, b.outcome.rank) and torch.equal(a.outcome.samples, b.outcome.samples)
        assert torch.allclose(a.outcome.mean_error, b.outcome.mean_error, equal_nan=True)
        assert a.denoiser_calls == b.denoiser_calls                  # saved calls count: the JSON is the same
    saved = killed.stats.denoiser_calls
    assert resumed.stats.denoiser_calls == total - saved              # nothing saved is computed again


@pytest.mark.parametrize("damage", [b"not zlib at all", b"", None], ids=["garbage", "empty", "truncated"])
def test_an_undecodable_checkpoint_is_treated_as_absent(damage, tmp_path):
    """A damaged blob (a disk error, a foreign writer) costs its image's saved work, not the run."""
    import sqlite3
    import zlib

    torch.manual_seed(0)
    protos = torch.randn(3, *SHAPE)
    x = images(protos, [0, 1, 2], noise=1.0)
    options = ScoringOptions(strategy="full", n_samples=(6,), batch_size=16)
    reference = _engine(options).score(x, [0, 1, 2], cands(protos))
    keys = ["img0", "img1", "img2"]
    path = tmp_path / "s.sqlite"
    with ScoreStore(path) as store:
        good = encode(torch.full((3, 1, 6), float("nan")), 0)
        store.put_partial("img1", good[: len(good) // 2] if damage is None else damage)
        store.put_partial("img2", zlib.compress(b"short"))       # decompresses, but is no checkpoint
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT COUNT(*) FROM partials").fetchone()[0] == 2
    conn.close()
    with ScoreStore(path) as store:
        checkpoints = StoreCheckpoints(store, keys)
        assert checkpoints.load(1) is None and checkpoints.load(2) is None
        results = _engine(options).score(x, [0, 1, 2], cands(protos), checkpoints=checkpoints)
    for a, b in zip(results, reference):
        assert torch.equal(a.outcome.rank, b.outcome.rank)
        assert torch.allclose(a.outcome.mean_error, b.outcome.mean_error, equal_nan=True)
