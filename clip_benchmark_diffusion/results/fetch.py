"""Where each image's result comes from: the store, another process's lease, another rank, or scoring here.

:meth:`RunResults.fetch_or_score` is the one place that decides it. Alone on a store, a process
leases the images it is missing (``leases.score_shared``), so identical commands sharing the store
split them; under torchrun the ranks claim chunks of each batch and gather the results
(``distributed.score_batch_distributed``); in both, an image already in the store is read back, and
one scored here is stored the moment it is decided, beside the checkpoints of those still in flight.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from clip_benchmark_diffusion import distributed as dist_util
from clip_benchmark_diffusion.results.checkpoints import StoreCheckpoints
from clip_benchmark_diffusion.results.leases import Claims, score_shared
from clip_benchmark_diffusion.results.store import ScoreStore

_BATCH_IDS = itertools.count()  # same sequence on every rank: every rank scores every batch


@dataclass
class ScoreRequest:
    """The images a score function must compute (batch indices, in engine order), their saved work,
    and ``save(index, payload)``, to call the moment an image is decided (it is stored at once)."""

    indices: list[int]
    checkpoints: StoreCheckpoints | None
    save: Callable[[int, dict], None]


ScoreFn = Callable[[ScoreRequest], None]


@dataclass
class Fetched:
    """Every image's payload, and where they came from in this process."""

    payloads: dict[int, dict]
    reused: int    # read back from the store (an earlier run, or another process sharing it)
    scored: int    # scored by this process


class RunResults:
    """This process's results: the score store (optional), its leases, and its place among the ranks."""

    def __init__(self, world: dist_util.World, claimer: dist_util.WorkClaimer | None = None) -> None:
        self.world, self.claimer = world, claimer
        self.store: ScoreStore | None = None
        self.leases: Claims | None = None

    def attach(self, store: ScoreStore | None) -> None:
        """Persist every image's result in ``store`` and reuse what it already holds."""
        self.store = store
        self.leases = Claims(store.path) if store is not None else None

    def fetch_or_score(self, keys: list[str], score_fn: ScoreFn) -> Fetched:
        """The payload of each of ``keys`` (one per image of a batch). ``score_fn`` computes the images
        of a :class:`ScoreRequest` that no store and no other process has, calling its ``save``."""
        counts = {"reused": 0, "scored": 0}

        def subset(idx: list[int]) -> dict[int, dict]:
            cached = self.store.get_many([keys[i] for i in idx]) if self.store is not None else {}
            out = {i: cached[keys[i]] for i in idx if keys[i] in cached}
            todo = [i for i in idx if i not in out]
            counts["reused"] += len(out)
            counts["scored"] += len(todo)
            if todo:
                def save(i: int, payload: dict) -> None:
                    out[i] = payload
                    if self.store is not None:
                        self.store.put(keys[i], payload)

                saved = StoreCheckpoints(self.store, [keys[i] for i in todo]) if self.store is not None else None
                score_fn(ScoreRequest(todo, saved, save))
            return out

        if self.store is not None and self.leases is not None and not self.world.is_distributed:
            payloads = score_shared(keys, self.store, self.leases, subset)
            # images read back here were stored earlier or by another process sharing the store
            return Fetched(payloads, reused=len(keys) - counts["scored"], scored=counts["scored"])
        chunk = max(1, len(keys) // (4 * self.world.world_size))
        payloads = dist_util.score_batch_distributed(next(_BATCH_IDS), len(keys), subset, self.world,
                                                     self.claimer, chunk)
        return Fetched(payloads, reused=counts["reused"], scored=counts["scored"])

    @property
    def store_path(self) -> Path | None:
        return self.store.path if self.store is not None else None

    def leave(self) -> None:
        """No longer scoring from the store: the other processes stop leaving a share for this one."""
        if self.leases is not None:
            self.leases.leave()

    def close(self) -> None:
        """Leave, and close the store's connections (folding the WAL back into the file)."""
        if self.leases is not None:
            self.leases.leave()
            self.leases.close()
        if self.store is not None:
            self.store.close()
