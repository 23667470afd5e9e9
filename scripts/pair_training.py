"""What both training scripts need for the two-garment scenes (``--data pairs``): batches and checks.

Training batches are fresh scenes every step (random garments from the train split minus the
validation hold-out, random colours, random training caption). The progress checks use scenes made
from the hold-out by the same procedure as the shipped test sets (:func:`pairs_data.eval_sets`):
top-1 over the 100 ordered pairs with the held-out wrappers, and the accuracy of each probe.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np

from clip_benchmark_diffusion_demo.pairs import (
    N_PAIR_CLASSES,
    PROBES,
    compose,
    random_scenes,
    training_captions,
)
from clip_benchmark_diffusion_demo.pairs_data import training_pool, validation_eval_sets

# Longest caption: 25 tokens with start and end (tests/test_pairs_dataset.py checks it fits).
PAIRS_CONTEXT_LENGTH = 32


class PairBatches:
    """Seeded source of training batches: ``sample(n) -> (uint8 (n, 28, 56, 3), captions)``."""

    def __init__(self, seed: int, train_limit: int = 0) -> None:
        self.images, self.labels, pool = training_pool()
        self.pool = pool[:train_limit] if train_limit else pool
        self.rng = np.random.default_rng(seed)

    def sample(self, n: int) -> tuple[np.ndarray, list[str]]:
        scenes = random_scenes(self.rng, self.labels, self.pool, n)
        return compose(self.images, scenes), training_captions(scenes, self.rng)

    def state(self) -> str:
        """The generator's state (JSON: its integers exceed 64 bits), for a training checkpoint."""
        return json.dumps(self.rng.bit_generator.state)

    def restore(self, state: str) -> None:
        self.rng.bit_generator.state = json.loads(state)


@dataclass(frozen=True)
class PairChecks:
    """Validation scenes: classification pixels and labels, probe pixels and each probe's captions."""

    pixels: np.ndarray                                 # (N, 28, 56, 3) uint8
    labels: np.ndarray                                 # (N,) pair classes
    probe_pixels: np.ndarray                           # (M, 28, 56, 3) uint8
    probe_captions: dict[str, list[tuple[str, str]]]   # probe -> M (positive, negative)

    def candidates(self, scene: int) -> list[str]:
        """Scene ``scene``'s positive caption, then each probe's negative (in ``PROBES`` order)."""
        first = next(iter(self.probe_captions.values()))[scene][0]
        return [first] + [self.probe_captions[p][scene][1] for p in PROBES]


def load_pair_checks(n_classification: int, n_probe_scenes: int) -> PairChecks:
    """The first ``n_classification`` classification scenes (whole rounds of 100) and
    ``n_probe_scenes`` probe scenes of the validation hold-out."""
    per_class = max(1, math.ceil(n_classification / N_PAIR_CLASSES))
    try:
        sets = validation_eval_sets(per_class, n_probe_scenes)
    except ValueError as exc:  # the hold-out has 100 images per garment, each used once
        raise SystemExit(f"clip_benchmark_diffusion: --eval-images {n_classification} with --eval-probe-scenes "
                         f"{n_probe_scenes} needs more validation images than the hold-out has ({exc}); "
                         "e.g. --eval-images 200 --eval-probe-scenes 200") from None
    cls = sets.classification
    n = min(n_classification, len(cls))
    captions = {p: [(it.caption, it.negative_caption) for it in items] for p, items in sets.items.items()}
    return PairChecks(compose(sets.images, cls)[:n], cls.pair_class[:n], compose(sets.images, sets.probes), captions)


def check_summary(class_scores: np.ndarray, labels: np.ndarray, candidate_scores: np.ndarray) -> dict[str, float]:
    """Accuracies from scores (higher = better match). ``candidate_scores`` (M, 1 + probes): each
    scene's positive then each probe's negative; a probe item is right when its positive wins."""
    out = {"top1_100": float((class_scores.argmax(1) == labels).mean())}
    for j, probe in enumerate(PROBES, start=1):
        out[probe] = float((candidate_scores[:, 0] > candidate_scores[:, j]).mean())
    return out


def format_summary(acc: dict[str, float]) -> str:
    return "  ".join(f"{k} {v:.3f}" for k, v in acc.items() if k in ("top1_100", *PROBES))
