"""Write Fashion-MNIST test images as a clip_benchmark webdataset folder.

Default: the shipped demo set ``demo/clip_benchmark_diffusion_demo/fashion_mnist_1k/``, a fixed,
seeded, class-balanced subset of 1,000 official test images (100 per class), interleaved so any
prefix of 10k images is balanced. ``--full OUT_DIR`` writes all 10,000 test images in their
official order instead; ``--validation OUT_DIR`` the 1,000 train images that the training
scripts hold out for choosing between runs.

Usage:
    python scripts/build_fashion_mnist.py                  # the demo subset
    python scripts/build_fashion_mnist.py --full /data/fashion_mnist
Then:
    clip_benchmark eval --dataset wds/fashion_mnist --dataset_root <folder> ...
"""

from __future__ import annotations

import argparse
import io
import shutil
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

from clip_benchmark_diffusion_demo import DATASET_DIR
from clip_benchmark_diffusion_demo.captions import CLASSNAMES, EVAL_TEMPLATES
from clip_benchmark_diffusion_demo.fashion_mnist import (
    DEBIAN_DIR,
    DEMO_PER_CLASS,
    DEMO_SEED,
    MIT_NOTICE,
    VALIDATION_SEED,
    demo_test_indices,
    load_split,
    validation_indices,
)

_LICENSE = """\
# Fashion-MNIST ({what})

Images and labels are from **Fashion-MNIST** by Zalando Research
(Han Xiao, Kashif Rasul, Roland Vollgraf, *Fashion-MNIST: a Novel Image Dataset for Benchmarking
Machine Learning Algorithms*, arXiv:1708.07747), <https://github.com/zalandoresearch/fashion-mnist>,
released under the MIT License:

{notice}
## Provenance

- Source files: Debian package `dataset-fashion-mnist`,
  `{debian}/{prefix}-images-idx3-ubyte.gz` and `{prefix}-labels-idx1-ubyte.gz` (the official {split} split).
- Written by `scripts/build_fashion_mnist.py` of clip_benchmark_diffusion: each image as a
  lossless 28x28 grayscale PNG (`<key>.png`) with its integer label (`<key>.cls`); sample keys
  are `{split}<index>`, the 0-based index into the official {split} split.
- Selection: {selection}
- Class names (label order): {classnames}.
- `zeroshot_classification_templates.txt` holds prompts that the demo models never saw in training.
{indices}"""


def _png_bytes(image: np.ndarray) -> bytes:
    """Encode one (28, 28) uint8 image as a grayscale PNG."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="png")
    return buffer.getvalue()


def write_wds_folder(
    out_dir: Path, images: np.ndarray, labels: np.ndarray, indices: np.ndarray, license_text: str,
    key_prefix: str = "test",
) -> None:
    """Write the clip_benchmark ``wds/`` layout: metadata files and one ``test/0.tar`` shard."""
    if out_dir.exists():
        shutil.rmtree(out_dir / "test", ignore_errors=True)
    (out_dir / "test").mkdir(parents=True, exist_ok=True)
    (out_dir / "classnames.txt").write_text("\n".join(CLASSNAMES) + "\n")
    (out_dir / "zeroshot_classification_templates.txt").write_text("\n".join(EVAL_TEMPLATES) + "\n")
    # Fixed mtime so rebuilding gives byte-identical tar files.
    with wds.TarWriter(str(out_dir / "test" / "0.tar"), mtime=0.0) as sink:
        for i in indices:
            sink.write({"__key__": f"{key_prefix}{i:05d}", "png": _png_bytes(images[i]), "cls": int(labels[i])})
    (out_dir / "test" / "nshards.txt").write_text("1\n")
    (out_dir / "LICENSE.md").write_text(license_text)


def _license(what: str, selection: str, indices_block: str, split: str = "test") -> str:
    return _LICENSE.format(
        what=what,
        notice=MIT_NOTICE,
        debian=DEBIAN_DIR,
        prefix={"test": "t10k", "train": "train"}[split],
        split=split,
        selection=selection,
        classnames=", ".join(f"{i} {c}" for i, c in enumerate(CLASSNAMES)),
        indices=indices_block,
    )


def build_demo(out_dir: Path = DATASET_DIR) -> np.ndarray:
    """Write the class-balanced demo subset; return the test-split indices in shard order."""
    images, labels = load_split("test")
    indices = demo_test_indices(labels)
    selection = (
        f"{DEMO_PER_CLASS} images per class ({len(indices)} in all), drawn without replacement with "
        f"`numpy.random.default_rng({DEMO_SEED})` by `balanced_interleaved_indices` in "
        "`demo/clip_benchmark_diffusion_demo/fashion_mnist.py`, then interleaved round-robin (one image "
        "of every class per round, classes shuffled within a round), so the first 10k samples "
        "of the shard are class-balanced."
    )
    rows = [" ".join(str(i) for i in indices[r : r + 20]) for r in range(0, len(indices), 20)]
    block = "\n## Test-split indices, in shard order\n\n```\n" + "\n".join(rows) + "\n```\n"
    write_wds_folder(out_dir, images, labels, indices, _license("demo subset", selection, block))
    return indices


def build_full(out_dir: Path) -> None:
    """Write all 10,000 official test images in their official order."""
    images, labels = load_split("test")
    indices = np.arange(len(labels))
    selection = "all 10,000 test images, in the official order."
    write_wds_folder(out_dir, images, labels, indices, _license("full test split", selection, ""))


def build_validation(out_dir: Path) -> None:
    """Write the validation split: train images held out by the training scripts, for model selection."""
    images, labels = load_split("train")
    indices = validation_indices(labels)
    selection = (
        f"the validation split of `validation_indices` in `demo/clip_benchmark_diffusion_demo/fashion_mnist.py` "
        f"({len(indices)} train images, class-balanced, seed {VALIDATION_SEED}); training scripts run "
        "with `--val-per-class 100` never train on them. Not for reporting: for choosing between runs."
    )
    write_wds_folder(out_dir, images, labels, indices, _license("validation split", selection, "", split="train"),
                     key_prefix="train")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", type=Path, metavar="OUT_DIR", help="write all 10k test images here")
    parser.add_argument("--validation", type=Path, metavar="OUT_DIR",
                        help="write the 1k validation images held out of the train split here")
    parser.add_argument("--out", type=Path, default=DATASET_DIR, help="demo subset folder (default: shipped)")
    args = parser.parse_args(argv)
    if args.validation is not None:
        build_validation(args.validation)
        print(f"wrote the validation split to {args.validation}")
    elif args.full is not None:
        build_full(args.full)
        print(f"wrote 10000 test images to {args.full}")
    else:
        indices = build_demo(args.out)
        print(f"wrote {len(indices)} test images to {args.out}")


if __name__ == "__main__":
    main()
