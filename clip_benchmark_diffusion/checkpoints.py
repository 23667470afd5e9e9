"""The engine's per-image checkpoints, kept in the score store beside the finished results.

A dataloader batch is scored in lockstep rounds, so its first image is decided only after most
of the batch's compute: a kill would lose all of it. The engine saves each undecided image's
errors every few seconds through :class:`StoreCheckpoints`; a resumed run restores them and
computes only the rest. The encoding is compact and exact: calls, shape, then float32 values.
"""
from __future__ import annotations

import struct
import zlib

import numpy as np
import torch

from clip_benchmark_diffusion.store import ScoreStore

_HEADER = struct.Struct("<q3i")  # calls, G, M, N


def encode(cerr: torch.Tensor, calls: int) -> bytes:
    """(G, M, N) float errors (NaN = not computed) and calls -> bytes."""
    values = cerr.detach().cpu().to(torch.float32).contiguous().numpy().astype("<f4")
    return zlib.compress(_HEADER.pack(calls, *cerr.shape) + values.tobytes(), 1)


def decode(data: bytes) -> tuple[torch.Tensor, int]:
    raw = zlib.decompress(data)
    calls, g, m, n = _HEADER.unpack_from(raw)
    values = np.frombuffer(raw, dtype="<f4", offset=_HEADER.size).reshape(g, m, n)
    return torch.from_numpy(values.astype(np.float32)), calls


class StoreCheckpoints:
    """:class:`~clip_benchmark_diffusion.scoring.engine.Checkpoints` for the images ``keys`` (in engine order)."""

    def __init__(self, store: ScoreStore, keys: list[str]) -> None:
        self.store, self.keys = store, keys
        self._saved = store.get_partials(keys)

    def load(self, i: int) -> tuple[torch.Tensor, int] | None:
        """The saved work of image ``i``, or None when there is none or it cannot be decoded (a
        damaged blob is only lost work: the image is scored from the start, never a traceback)."""
        data = self._saved.get(self.keys[i])
        if data is None:
            return None
        try:
            return decode(data)
        except (zlib.error, struct.error, ValueError, TypeError):
            return None

    def save(self, i: int, cerr: torch.Tensor, calls: int) -> None:
        self.store.put_partial(self.keys[i], encode(cerr, calls))
