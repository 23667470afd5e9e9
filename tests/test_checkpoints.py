"""Per-image checkpoints: a kill mid-batch loses seconds, and a resumed image ends exactly as an uninterrupted one."""
from __future__ import annotations

import pytest
import torch

from analytic_denoiser import SHAPE, cands, grid, images, oracle
from clip_benchmark_diffusion.results.checkpoints import StoreCheckpoints, decode, encode
from clip_benchmark_diffusion.options import ScoringOptions
from clip_benchmark_diffusion.scoring.engine import ScoringEngine
from clip_benchmark_diffusion.results.store import ScoreStore


class _Killed(Exception):
    pass


class _KillAfter:
    """Keeps checkpoints in a store, and 'dies' after ``saves`` of them."""

    def __init__(self, inner: StoreCheckpoints, saves: int) -> None:
        self.inner, self.left = inner, saves

    def load(self, i):
        return self.inner.load(i)

    def save(self, i, cerr, calls, new):
        self.inner.save(i, cerr, calls, new)
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


def _six_images(strategy: str):
    """Six images of five classes, the options both resume tests use, and their uninterrupted results."""
    torch.manual_seed(0)
    protos = torch.randn(5, *SHAPE)
    x = images(protos, [0, 3, 1, 4, 2, 2], noise=1.0)
    seeds = list(range(6))
    options = ScoringOptions(strategy=strategy, n_samples=(12,), min_samples=4, max_samples=30, p_value=0.05,
                             batch_size=16)
    return protos, x, seeds, options, _engine(options).score(x, seeds, cands(protos))


@pytest.mark.parametrize("strategy", ["full", "ttest"])
def test_a_batch_killed_mid_way_resumes_from_its_checkpoints_to_the_same_results(strategy, tmp_path):
    protos, x, seeds, options, reference = _six_images(strategy)
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


class _Interrupt:
    """A denoiser that is stopped by Ctrl-C (or the SIGTERM handler) during its ``at``-th call."""

    def __init__(self, inner, at: int) -> None:
        self.inner, self.at, self.n = inner, at, 0

    def __call__(self, *args):
        self.n += 1
        if self.n == self.at:
            raise KeyboardInterrupt
        return self.inner(*args)


@pytest.mark.parametrize("strategy", ["full", "ttest"])
def test_an_interrupt_saves_every_image_in_flight_so_nothing_computed_is_lost(strategy, tmp_path):
    protos, x, seeds, options, reference = _six_images(strategy)
    total = sum(r.denoiser_calls for r in reference)
    keys = [f"img{i}" for i in range(6)]
    with ScoreStore(tmp_path / "s.sqlite") as store:
        stopped = _engine(options)
        stopped.checkpoint_s = float("inf")            # no periodic save: only the one on the interrupt
        stopped.denoiser = _Interrupt(stopped.denoiser, at=9)
        with pytest.raises(KeyboardInterrupt):
            stopped.score(x, seeds, cands(protos), checkpoints=StoreCheckpoints(store, keys))
        ran = stopped.stats.denoiser_calls                # 8 denoiser batches, none of the 9th
        assert ran > 0 and stopped.stats.denoiser_batches == 8 and not stopped.stats.images
        # each value is written once: the rows hold exactly the calls run, not whole error tensors
        parts = store.get_partial_parts(keys)
        assert sum(len(p) for p in parts.values()) == len(parts) <= 6
        resumed = _engine(options)
        results = resumed.score(x, seeds, cands(protos), checkpoints=StoreCheckpoints(store, keys),
                                on_done=lambda i, r: store.put(keys[i], r.to_payload()))
        assert not store.get_partial_parts(keys) and not store.get_partials(keys)   # stored: checkpoints gone
    assert resumed.stats.denoiser_calls == total - ran                   # all of the interrupted run's work kept
    for a, b in zip(results, reference):
        assert torch.equal(a.outcome.rank, b.outcome.rank) and a.denoiser_calls == b.denoiser_calls


def test_a_save_writes_only_what_was_computed_since_the_previous_one(tmp_path):
    cerr = torch.full((1000, 80, 4), float("nan"))
    with ScoreStore(tmp_path / "s.sqlite") as store:
        saver = StoreCheckpoints(store, ["a"])
        first = torch.tensor([[0, 0, 0], [999, 79, 3]])
        cerr[first[:, 0], first[:, 1], first[:, 2]] = torch.tensor([1.5, -2.0])
        saver.save(0, cerr, 2, first)
        second = torch.tensor([[5, 6, 1]])
        cerr[5, 6, 1] = 3.25
        saver.save(0, cerr, 3, second)
        sizes = [len(p) for p in store.get_partial_parts(["a"])["a"]]
        assert max(sizes) < 200                          # a whole tensor would be ~1.3 MB
        back, calls = StoreCheckpoints(store, ["a"]).load(0)
    assert calls == 3 and int((~back.isnan()).sum()) == 3
    assert back[0, 0, 0] == 1.5 and back[999, 79, 3] == -2.0 and back[5, 6, 1] == 3.25


def test_a_whole_tensor_checkpoint_of_an_older_version_is_still_resumed(tmp_path):
    cerr = torch.full((3, 2, 4), float("nan"))
    cerr[0, 0, 0] = 1.0
    with ScoreStore(tmp_path / "s.sqlite") as store:
        store.put_partial("a", encode(cerr, 1))
        cerr[1, 1, 2] = 2.0
        StoreCheckpoints(store, ["a"]).save(0, cerr, 2, torch.tensor([[1, 1, 2]]))
        back, calls = StoreCheckpoints(store, ["a"]).load(0)
    assert calls == 2 and back[0, 0, 0] == 1.0 and back[1, 1, 2] == 2.0 and int((~back.isnan()).sum()) == 2
