"""results.fetch_or_score: each image's payload comes from the store or is scored, stored at once, exactly once."""
from __future__ import annotations

from clip_benchmark_diffusion.distributed import World
from clip_benchmark_diffusion.results.checkpoints import StoreCheckpoints
from clip_benchmark_diffusion.results.fetch import RunResults
from clip_benchmark_diffusion.results.store import ScoreStore

ALONE = World(rank=0, world_size=1, local_rank=0)
KEYS = ["run/a", "run/b", "run/c", "run/d"]


def _scorer(asked: list[list[int]], store: ScoreStore | None = None):
    """A score function that records what it was asked and checks each payload is in the store on ``save``."""
    def score(request):
        asked.append(list(request.indices))
        assert (request.checkpoints is None) == (store is None)
        if store is not None:
            assert isinstance(request.checkpoints, StoreCheckpoints)
            assert request.checkpoints.keys == [KEYS[i] for i in request.indices]    # engine order
        for i in request.indices:
            request.save(i, {"image": i})
            if store is not None:
                assert store.get_many([KEYS[i]]) == {KEYS[i]: {"image": i}}          # durable at once
    return score


def test_without_a_store_every_image_is_scored_in_one_call():
    asked: list[list[int]] = []
    fetched = RunResults(ALONE).fetch_or_score(KEYS, _scorer(asked))
    assert asked == [[0, 1, 2, 3]]
    assert fetched.payloads == {i: {"image": i} for i in range(4)}
    assert (fetched.reused, fetched.scored) == (0, 4)


def test_a_store_hands_back_what_it_holds_and_only_the_rest_is_scored(tmp_path):
    path = tmp_path / "s.sqlite"
    with ScoreStore(path) as store:
        store.put(KEYS[1], {"image": 1, "from": "store"})
        store.put(KEYS[3], {"image": 3, "from": "store"})
    first = RunResults(ALONE)
    first.attach(ScoreStore(path))
    asked: list[list[int]] = []
    try:
        fetched = first.fetch_or_score(KEYS, _scorer(asked, first.store))
    finally:
        first.close()
    assert asked == [[0, 2]]
    assert fetched.payloads == {0: {"image": 0}, 1: {"image": 1, "from": "store"}, 2: {"image": 2},
                                3: {"image": 3, "from": "store"}}
    assert (fetched.reused, fetched.scored) == (2, 2)

    again = RunResults(ALONE)                       # a rerun: nothing left to score
    again.attach(ScoreStore(path))
    asked = []
    try:
        fetched_again = again.fetch_or_score(KEYS, _scorer(asked, again.store))
        assert again.store_path == path
    finally:
        again.close()
    assert asked == [] and fetched_again.payloads == fetched.payloads
    assert (fetched_again.reused, fetched_again.scored) == (4, 0)
    assert not (tmp_path / "s.sqlite-wal").exists()   # close folds the WAL back
