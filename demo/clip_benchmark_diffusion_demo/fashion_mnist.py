"""Read Debian's Fashion-MNIST files and pick the fixed, class-balanced demo subset."""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

# Debian package dataset-fashion-mnist (MIT, Zalando Research).
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
_PREFIX = {"train": "train", "test": "t10k"}
# The shipped demo subset: this many test images per class, drawn with this seed.
DEMO_PER_CLASS = 100
DEMO_SEED = 0
# The validation split: this many *train* images per class, held out from training when asked.
VALIDATION_PER_CLASS = 100
VALIDATION_SEED = 1
# Fashion-MNIST's licence, quoted in every folder of images built from it.
MIT_NOTICE = """\
> The MIT License (MIT) Copyright © 2017 Zalando SE, https://tech.zalando.com
>
> Permission is hereby granted, free of charge, to any person obtaining a copy of this software
> and associated documentation files (the "Software"), to deal in the Software without
> restriction, including without limitation the rights to use, copy, modify, merge, publish,
> distribute, sublicense, and/or sell copies of the Software, and to permit persons to whom the
> Software is furnished to do so, subject to the following conditions:
>
> The above copyright notice and this permission notice shall be included in all copies or
> substantial portions of the Software.
>
> THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED, INCLUDING
> BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY, FITNESS FOR A PARTICULAR PURPOSE AND
> NONINFRINGEMENT. IN NO EVENT SHALL THE AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM,
> DAMAGES OR OTHER LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
> OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE SOFTWARE.
"""


def _read_idx(path: Path) -> np.ndarray:
    """Parse one gzip'd IDX file (big-endian header: magic, then one uint32 per dimension)."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    if data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file (magic {data[:4].hex()})")
    ndim = data[3]
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    # Copy: frombuffer views are read-only, which torch.from_numpy warns about.
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape).copy()


def load_split(split: str, root: Path = DEBIAN_DIR) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(images uint8 (N, 28, 28), labels int64 (N,))`` of the official ``train``/``test`` split."""
    if split not in _PREFIX:
        raise ValueError(f"split must be one of {sorted(_PREFIX)}, got {split!r}")
    prefix = _PREFIX[split]
    try:
        images = _read_idx(root / f"{prefix}-images-idx3-ubyte.gz")
        labels = _read_idx(root / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64)
    except FileNotFoundError as e:
        raise FileNotFoundError(
            f"{e.filename} is missing: install the Debian package dataset-fashion-mnist "
            f"or pass the folder holding the four *-ubyte.gz files."
        ) from e
    if len(images) != len(labels):
        raise ValueError(f"{root}: {len(images)} images but {len(labels)} labels in split {split!r}")
    return images, labels


def balanced_interleaved_indices(labels: np.ndarray, per_class: int, seed: int = 0) -> np.ndarray:
    """Pick ``per_class`` random indices of every class and interleave them round-robin.

    Round r holds the r-th pick of every class (classes in a random order per round), so every
    prefix whose length is a multiple of the class count is exactly class-balanced: evaluating
    only the first 100 or 200 images of the result still gives a balanced set.
    """
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    picks = []
    for c in classes:
        members = np.flatnonzero(labels == c)
        if len(members) < per_class:
            raise ValueError(f"class {c} has {len(members)} images, fewer than per_class={per_class}")
        picks.append(rng.choice(members, size=per_class, replace=False))
    rounds = []
    for r in range(per_class):
        order = rng.permutation(len(classes))
        rounds.append([picks[c][r] for c in order])
    return np.asarray(rounds, dtype=np.int64).reshape(-1)


def demo_test_indices(test_labels: np.ndarray) -> np.ndarray:
    """Test-split indices of the shipped demo subset, in shard order (1,000 images)."""
    return balanced_interleaved_indices(test_labels, per_class=DEMO_PER_CLASS, seed=DEMO_SEED)


def demo_test_subset(n: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The first ``n`` (default all 1,000) images and labels of the shipped demo subset, uint8."""
    images, labels = load_split("test")
    idx = demo_test_indices(labels)[:n]
    return images[idx], labels[idx]


def validation_indices(train_labels: np.ndarray, per_class: int = VALIDATION_PER_CLASS) -> np.ndarray:
    """Train-split indices held out for model selection: ``per_class`` per class, interleaved.

    Training scripts that hold these out can compare checkpoints and runs without looking at
    any test image.
    """
    return balanced_interleaved_indices(train_labels, per_class=per_class, seed=VALIDATION_SEED)


def train_validation_split(per_class: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train images, train labels, validation images, validation labels) from the official train split.

    ``per_class=0`` returns all 60,000 images for training and an empty validation set.
    """
    images, labels = load_split("train")
    if per_class == 0:
        return images, labels, images[:0], labels[:0]
    held = validation_indices(labels, per_class)
    keep = np.ones(len(labels), dtype=bool)
    keep[held] = False
    return images[keep], labels[keep], images[held], labels[held]


def to_unit_range(images: np.ndarray) -> "torch.Tensor":
    """uint8 (N, 28, 28) -> float32 (N, 1, 28, 28) in [-1, 1], the demo models' input convention."""
    import torch

    return torch.from_numpy(images.astype(np.float32) / 127.5 - 1.0).unsqueeze(1)
