"""Per-image noise derived from the seed and the image content.

An image's (t, noise) samples depend only on the scoring seed and the image itself, never on
the batch it arrives in, its position, or the denoiser batch size.
"""
from __future__ import annotations

import hashlib

import torch

CHUNK = 64  # samples generated per generator seed: amortises generator set-up


def image_seed(digest: str, seed: int) -> int:
    """A 63-bit noise seed from the scoring seed and the image's content digest."""
    h = hashlib.blake2b(digest.encode(), digest_size=8, key=str(seed).encode())
    return int.from_bytes(h.digest(), "little") >> 1


class NoiseBank:
    """Lazily generated ``eps_k`` for one image, ``k`` = sample index."""

    def __init__(self, seed: int, shape: tuple[int, ...], device: torch.device | str) -> None:
        self.seed, self.shape, self.device = seed, shape, torch.device(device)
        self._chunks: dict[int, torch.Tensor] = {}

    def _chunk(self, c: int) -> torch.Tensor:
        if c not in self._chunks:
            # Generated on CPU so the noise is the same on every device type.
            g = torch.Generator().manual_seed((self.seed + 1_000_003 * c) % (2**63))
            self._chunks[c] = torch.randn((CHUNK, *self.shape), generator=g).to(self.device)
        return self._chunks[c]

    def get(self, k: torch.Tensor) -> torch.Tensor:
        """Noise for sample indices ``k`` (N,) -> (N, *shape)."""
        k = k.cpu()
        chunks, which = torch.unique(k // CHUNK, return_inverse=True)
        table = torch.cat([self._chunk(c) for c in chunks.tolist()])  # (len(chunks) * CHUNK, *shape)
        return table[(which * CHUNK + k % CHUNK).to(self.device)]
