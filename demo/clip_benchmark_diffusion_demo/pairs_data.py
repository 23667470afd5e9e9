"""Where the two-garment scenes come from: which split, which source images, which seed.

The evaluation sets are made by one procedure, :func:`eval_sets`, applied to the official *test*
split (the shipped sets) or to the validation hold-out of the *train* split (the training
scripts' progress checks), so a check measures the same thing as the final evaluation without
seeing a test image. Training scenes are drawn afresh every step from the rest of the train split.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from clip_benchmark_diffusion_demo import DEMO_DIR
from clip_benchmark_diffusion_demo.fashion_mnist import VALIDATION_PER_CLASS, load_split, validation_indices
from clip_benchmark_diffusion_demo.pairs import (ProbeItem, Scenes, SourceImages, classification_scenes, probe_items,
                                                  probe_scenes, retrieval_captions, retrieval_scenes)

if TYPE_CHECKING:
    import torch

PAIRS_DATASET_DIR = DEMO_DIR / "fashion_pairs_100"
PROBES_DIR = DEMO_DIR / "fashion_pairs_probes"
WINOGROUND_DIR = DEMO_DIR / "fashion_winoground"
RETRIEVAL_DIR = DEMO_DIR / "fashion_pairs_retrieval"
# Shipped sizes: 10 scenes per ordered pair (1,000) and 500 probe scenes (one item per probe each).
SHIPPED_PER_CLASS = 10
SHIPPED_PROBE_SCENES = 500
# Winoground-format instances made from the first probe scenes (half position swaps, half colour swaps).
SHIPPED_WINOGROUND = 200
# Retrieval: scenes drawn after the shipped sets from the images they left, each with 5 captions.
SHIPPED_RETRIEVAL_SCENES = 100
RETRIEVAL_CAPTIONS = 5
TEST_SEED = 0
VALIDATION_SEED = 1


@dataclass(frozen=True)
class EvalSets:
    """The classification scenes and probe scenes of one split, with the probe items."""

    split: str
    images: np.ndarray          # the whole split's grey images; scenes index into it
    classification: Scenes
    probes: Scenes
    items: dict[str, list[ProbeItem]]
    retrieval: Scenes | None = None                 # retrieval scenes, when asked for
    retrieval_captions: list[list[str]] | None = None   # their captions


def eval_sets(split: str, images: np.ndarray, labels: np.ndarray, pool: np.ndarray, seed: int,
              per_class: int, n_probe_scenes: int, n_retrieval: int = 0) -> EvalSets:
    """Classification scenes first, then probe scenes, then retrieval scenes (after everything the other
    sets draw, so asking for them changes none of those), from disjoint source images of ``pool``."""
    rng = np.random.default_rng(seed)
    sources = SourceImages(labels, pool, rng)
    classification = classification_scenes(rng, sources, per_class)
    probes = probe_scenes(rng, sources, n_probe_scenes)
    items = probe_items(probes, rng)
    if not n_retrieval:
        return EvalSets(split, images, classification, probes, items)
    retrieval = retrieval_scenes(rng, sources, n_retrieval)
    return EvalSets(split, images, classification, probes, items, retrieval,
                    retrieval_captions(retrieval, rng, RETRIEVAL_CAPTIONS))


def shipped_eval_sets(per_class: int = SHIPPED_PER_CLASS, n_probe_scenes: int = SHIPPED_PROBE_SCENES,
                      n_retrieval: int = 0) -> EvalSets:
    """The evaluation sets from the official test split (the shipped ones at the default sizes)."""
    images, labels = load_split("test")
    return eval_sets("test", images, labels, np.arange(len(labels)), TEST_SEED, per_class, n_probe_scenes,
                     n_retrieval)


def validation_eval_sets(per_class: int, n_probe_scenes: int, n_retrieval: int = 0) -> EvalSets:
    """The same kind of sets from the train split's validation hold-out (never trained on)."""
    images, labels = load_split("train")
    pool = np.sort(validation_indices(labels, VALIDATION_PER_CLASS))
    return eval_sets("validation", images, labels, pool, VALIDATION_SEED, per_class, n_probe_scenes, n_retrieval)


def training_pool() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train-split images, labels, indices that training scenes may use): all but the hold-out."""
    images, labels = load_split("train")
    keep = np.ones(len(labels), dtype=bool)
    keep[validation_indices(labels, VALIDATION_PER_CLASS)] = False
    return images, labels, np.flatnonzero(keep)


def scenes_to_unit_range(pixels: np.ndarray) -> "torch.Tensor":
    """uint8 (N, 28, 56, 3) -> float32 (N, 3, 28, 56) in [-1, 1], the diffusion model's input."""
    import torch

    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div(127.5).sub(1.0).contiguous()
