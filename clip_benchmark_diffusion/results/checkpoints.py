"""The engine's per-image checkpoints, kept in the score store beside the finished results.

A dataloader batch is scored in lockstep rounds, so its first image is decided only after most
of the batch's compute: a kill would lose all of it. The engine saves each undecided image's
errors every few seconds through :class:`StoreCheckpoints`; a resumed run restores them and
computes only the rest.

A save appends only the errors computed since the image's previous save (one row per image and
save), so its cost follows the compute since then, not the size of the (classes x prompts x
samples) error tensor: at 1,000 classes x 80 templates a whole tensor is megabytes per image,
while 5 s of compute adds a few thousand values. A load replays an image's rows in order. The
encoding is exact: calls, shape, the flat positions, then float32 values. Stores written before
this kept one whole tensor per image (:func:`encode`); such a row is the base the parts add to.
"""
from __future__ import annotations

import struct
import zlib

import numpy as np
import torch

from clip_benchmark_diffusion.results.store import ScoreStore

_HEADER = struct.Struct("<q3i")    # calls, G, M, N
_PART = struct.Struct("<q3iq")     # calls, G, M, N, number of values


def encode(cerr: torch.Tensor, calls: int) -> bytes:
    """(G, M, N) float errors (NaN = not computed) and calls -> bytes (the whole tensor: the old format)."""
    values = cerr.detach().cpu().to(torch.float32).contiguous().numpy().astype("<f4")
    return zlib.compress(_HEADER.pack(calls, *cerr.shape) + values.tobytes(), 1)


def decode(data: bytes) -> tuple[torch.Tensor, int]:
    raw = zlib.decompress(data)
    calls, g, m, n = _HEADER.unpack_from(raw)
    values = np.frombuffer(raw, dtype="<f4", offset=_HEADER.size).reshape(g, m, n)
    return torch.from_numpy(values.astype(np.float32)), calls


def encode_part(shape: tuple[int, int, int], calls: int, new: torch.Tensor, values: torch.Tensor) -> bytes:
    """The errors ``values`` (q,) at ``new`` (q, 3: class, member, sample) of a (G, M, N) tensor, and the
    image's calls so far -> bytes."""
    _, m, n = shape
    flat = ((new[:, 0] * m + new[:, 1]) * n + new[:, 2]).cpu().numpy().astype("<i8")
    vals = values.detach().cpu().to(torch.float32).numpy().astype("<f4")
    return zlib.compress(_PART.pack(calls, *shape, len(flat)) + flat.tobytes() + vals.tobytes(), 1)


def decode_parts(parts: list[bytes], base: tuple[torch.Tensor, int] | None = None) -> tuple[torch.Tensor, int] | None:
    """Replay ``parts`` in order on ``base`` (or on an all-NaN tensor); None when there is nothing, or
    when a part's shape disagrees (a store written by other code: score the image again)."""
    cerr, calls = (base[0].clone(), base[1]) if base is not None else (None, 0)
    for data in parts:
        raw = zlib.decompress(data)
        part_calls, g, m, n, q = _PART.unpack_from(raw)
        if cerr is None:
            cerr = torch.full((g, m, n), float("nan"))
        if tuple(cerr.shape) != (g, m, n):
            return None
        flat = np.frombuffer(raw, dtype="<i8", count=q, offset=_PART.size)
        vals = np.frombuffer(raw, dtype="<f4", count=q, offset=_PART.size + 8 * q)
        cerr.view(-1)[torch.from_numpy(flat.copy())] = torch.from_numpy(vals.copy())
        calls = part_calls
    return (cerr, calls) if cerr is not None else None


class StoreCheckpoints:
    """:class:`~clip_benchmark_diffusion.scoring.engine.Checkpoints` for the images ``keys`` (in engine order)."""

    def __init__(self, store: ScoreStore, keys: list[str]) -> None:
        self.store, self.keys = store, keys
        self._whole = store.get_partials(keys)        # the old format: one whole tensor per image
        self._parts = store.get_partial_parts(keys)

    def load(self, i: int) -> tuple[torch.Tensor, int] | None:
        """The saved work of image ``i``, or None when there is none or it cannot be decoded (a
        damaged blob is only lost work: the image is scored from the start, never a traceback)."""
        key = self.keys[i]
        try:
            base = decode(self._whole[key]) if key in self._whole else None
            return decode_parts(self._parts.get(key, []), base)
        except (zlib.error, struct.error, ValueError, TypeError):
            return None

    def save(self, i: int, cerr: torch.Tensor, calls: int, new: torch.Tensor) -> None:
        """Append the errors at ``new`` (computed since image i's previous save)."""
        values = cerr[new[:, 0], new[:, 1], new[:, 2]]
        self.store.append_partial(self.keys[i], encode_part(tuple(cerr.shape), calls, new, values))
