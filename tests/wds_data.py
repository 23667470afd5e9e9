"""Local clip_benchmark webdataset folders made from real labelled images."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

def needs_fashion_mnist(filename: str):
    """Skip unless Debian's dataset-fashion-mnist provides ``filename`` (e.g. the train images)."""
    import pytest

    from clip_benchmark_diffusion_demo.fashion_mnist import DEBIAN_DIR

    return pytest.mark.skipif(not (DEBIAN_DIR / filename).exists(),
                              reason="needs the Debian package dataset-fashion-mnist")


DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
DIGIT_TEMPLATES = ["a photo of the number {c}.", "a handwritten digit {c}."]


class _Digits:
    """scikit-learn's bundled 8x8 digits as a (PIL image, label) dataset with classes/templates."""

    def __init__(self, per_class: int, templates: list[str], classes: list[str] = DIGIT_NAMES) -> None:
        from sklearn.datasets import load_digits

        digits = load_digits()
        picks = [i for c in range(len(classes)) for i in np.flatnonzero(digits.target == c)[:per_class]]
        picks.sort()
        self.images = [digits.images[i] for i in picks]
        self.labels = [int(digits.target[i]) for i in picks]
        self.classes = list(classes)
        self.templates = templates

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        pixels = (self.images[i] / 16.0 * 255).astype(np.uint8)
        return Image.fromarray(pixels, mode="L").resize((32, 32), Image.NEAREST), self.labels[i]


def write_wds(dataset, folder: Path) -> Path:
    """Write a (PIL image, label) dataset with ``classes``/``templates`` as a clip_benchmark
    webdataset test split, with clip_benchmark's own ``convert_dataset``; returns the folder."""
    from clip_benchmark.webdataset_builder import convert_dataset

    convert_dataset(dataset, "test", str(folder), image_format="png", verbose=False)
    return Path(folder)


def write_digits_wds(folder: Path, per_class: int = 2, templates: list[str] | None = None,
                     classes: list[str] | None = None) -> Path:
    """The digits as a webdataset folder; ``classes`` renames digits 0, 1, ... (and drops the rest)."""
    return write_wds(_Digits(per_class, templates or DIGIT_TEMPLATES, classes or DIGIT_NAMES), folder)
