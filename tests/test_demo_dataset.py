"""The shipped Fashion-MNIST demo folder is what clip_benchmark reads, and what the script rebuilds."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from cli_helpers import load_script
from clip_benchmark_diffusion_demo import DATASET_DIR
from clip_benchmark_diffusion_demo.captions import CLASSNAMES, EVAL_TEMPLATES, TRAIN_TEMPLATES
from clip_benchmark_diffusion_demo.fashion_mnist import (
    balanced_interleaved_indices,
    demo_test_indices,
    load_split,
)

from wds_data import needs_fashion_mnist  # noqa: E402

needs_debian = needs_fashion_mnist("t10k-images-idx3-ubyte.gz")


def test_eval_templates_are_held_out() -> None:
    assert len(EVAL_TEMPLATES) == 3
    assert not set(EVAL_TEMPLATES) & set(TRAIN_TEMPLATES)
    assert all("{c}" in t for t in EVAL_TEMPLATES + TRAIN_TEMPLATES)


def test_interleaving_balances_every_prefix_of_whole_rounds() -> None:
    labels = np.repeat(np.arange(4), 7)
    picked = balanced_interleaved_indices(labels, per_class=5, seed=3)
    assert len(set(picked.tolist())) == 20
    for end in (4, 8, 20):
        assert Counter(labels[picked[:end]].tolist()) == {c: end // 4 for c in range(4)}


def test_shipped_folder_loads_in_clip_benchmark() -> None:
    from clip_benchmark.datasets.builder import build_dataset

    ds = build_dataset(
        dataset_name="wds/fashion_mnist", root=str(DATASET_DIR), split="test", transform=np.asarray
    )
    assert ds.classes == list(CLASSNAMES)
    assert ds.templates == list(EVAL_TEMPLATES)
    samples = list(ds)
    assert len(samples) == 1000
    labels = [y for _, y in samples]
    assert Counter(labels[:100]) == {c: 10 for c in range(10)}
    assert Counter(labels) == {c: 100 for c in range(10)}
    image = samples[0][0]
    assert image.shape == (28, 28, 3) and image.dtype == np.uint8  # PIL RGB from a gray PNG
    assert (image[..., 0] == image[..., 2]).all()


@needs_debian
def test_shipped_folder_is_the_documented_subset() -> None:
    from clip_benchmark.datasets.builder import build_dataset

    images, labels = load_split("test")
    idx = demo_test_indices(labels)
    ds = build_dataset(
        dataset_name="wds/fashion_mnist", root=str(DATASET_DIR), split="test", transform=np.asarray
    )
    for position, (image, label) in enumerate(ds):
        assert label == labels[idx[position]]
        np.testing.assert_array_equal(image[..., 0], images[idx[position]])


@needs_debian
def test_build_script_reproduces_the_shipped_shard(tmp_path: Path) -> None:
    load_script("build_fashion_mnist").main(["--out", str(tmp_path)])
    for name in ("test/0.tar", "test/nshards.txt", "classnames.txt",
                 "zeroshot_classification_templates.txt", "LICENSE.md"):
        assert (tmp_path / name).read_bytes() == (DATASET_DIR / name).read_bytes(), name


@needs_debian
def test_validation_split_is_held_out_of_training_and_balanced(tmp_path: Path) -> None:
    from clip_benchmark.datasets.builder import build_dataset

    from clip_benchmark_diffusion_demo.fashion_mnist import train_validation_split, validation_indices

    images, labels = load_split("train")
    held = validation_indices(labels)
    assert len(set(held.tolist())) == 1000
    assert Counter(labels[held[:100]].tolist()) == {c: 10 for c in range(10)}
    train_x, train_y, val_x, val_y = train_validation_split(100)
    assert len(train_x) == 59_000 and len(val_x) == 1000
    np.testing.assert_array_equal(val_x, images[held])
    # No validation image is among the training images (compared by pixels, not index).
    train_rows = {row.tobytes() for row in train_x.reshape(len(train_x), -1)}
    duplicates_in_train = sum(row.tobytes() in train_rows for row in val_x.reshape(len(val_x), -1))
    assert duplicates_in_train == 0

    load_script("build_fashion_mnist").main(["--validation", str(tmp_path)])
    ds = build_dataset(dataset_name="wds/fashion_mnist", root=str(tmp_path), split="test", transform=np.asarray)
    assert [y for _, y in ds] == val_y.tolist()
    assert "official train split" in (tmp_path / "LICENSE.md").read_text()
