"""Conditioning tables: a family's per-prompt dicts of tensors, stacked or merged per class."""
from __future__ import annotations

import torch

from clip_benchmark_diffusion.scoring.engine import Conditioning


def stack_rows(rows: list[Conditioning]) -> Conditioning:
    """Per-prompt conditioning dicts -> one dict of stacked tensors (P, ...)."""
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def mean_rows(rows: list[Conditioning]) -> Conditioning:
    """One class's prompts as one conditioning (``embedding_mean``): embeddings and pooled vectors
    are averaged; attention masks are joined, so every token some prompt attends stays visible."""
    out = {}
    for k in rows[0]:
        stacked = torch.stack([r[k] for r in rows])
        out[k] = stacked.float().mean(0).to(stacked.dtype) if stacked.is_floating_point() else stacked.amax(0)
    return out
