"""Write the two-garment evaluation sets (issue 11) in clip_benchmark's own formats.

From the official Fashion-MNIST *test* split (Debian's dataset-fashion-mnist), seeded:

- ``fashion_pairs_100/``: zero-shot classification, 100 classes = the ordered garment pairs
  (``"a bag on the left and a sneaker on the right"``), ``--per-class`` scenes per class (default
  10: 1,000 images), written by clip_benchmark's ``convert_dataset`` as a ``wds/`` folder;
- ``fashion_pairs_probes/``: image-caption selection, clip_benchmark's ``sugar_crepe/<task>``
  layout (``val2017/<file>.png`` + ``<task>.json``), one item per probe on each of
  ``--probe-scenes`` scenes (default 500): swap_obj (position swap), swap_att (colour swap),
  replace_obj and replace_att (controls);
- ``fashion_winoground/``: image-caption selection with two images per instance, Winoground's release
  layout (``examples.jsonl`` + ``images/``; ``clip_benchmark eval --dataset winoground --dataset_root
  <it>`` reads it through this package's loader, see ``integration/winoground_local.py``): each of
  the first ``--winoground`` probe scenes (default 200) with its *swapped twin*, the same two source
  garments in the other order (even instances: position swap) or with their colours exchanged (odd:
  colour swap), each image with the caption that describes it (caption i matches image i).

Positive captions and class-name templates use held-out wrappers (``EVAL_WRAPPERS``). The two sets
use disjoint source images. Defaults rebuild the shipped folders byte for byte.

``--validation`` writes the same 100-class set from the *train* split's validation hold-out (the
1,000 images no demo model trained on; ``--per-class`` at most 5, no probes) instead: the images
that a recipe's temperature is fitted on (``scripts/fit_temperature.py --dataset wds/fashion_pairs_100``).

Usage:
    python scripts/build_fashion_pairs.py                                  # the shipped sets
    python scripts/build_fashion_pairs.py --out /data/pairs --per-class 40 --probe-scenes 2000
    python scripts/build_fashion_pairs.py --validation --out runs/fashion_pairs_validation --per-class 2
    python scripts/build_fashion_pairs.py --validation-winoground --out runs/winoground_validation
Then:
    clip_benchmark eval --dataset wds/fashion_pairs_100 --dataset_root <out>/fashion_pairs_100 ...
    clip_benchmark eval --dataset sugar_crepe/swap_att --dataset_root <out>/fashion_pairs_probes ...
"""
from __future__ import annotations

import argparse
import io
import json
import shutil
import sys
import tarfile
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from clip_benchmark_diffusion_demo import DEMO_DIR
from clip_benchmark_diffusion_demo.fashion_mnist import DEBIAN_DIR, MIT_NOTICE
from clip_benchmark_diffusion_demo.pairs import (
    COLOURS,
    EVAL_WRAPPERS,
    GARMENTS,
    N_PAIR_CLASSES,
    PAIR_CLASSNAMES,
    PROBES,
    RELATIONS,
    Scenes,
    compose,
)
from clip_benchmark_diffusion_demo.pairs_data import (
    PAIRS_DATASET_DIR,
    PROBES_DIR,
    SHIPPED_PER_CLASS,
    SHIPPED_PROBE_SCENES,
    SHIPPED_WINOGROUND,
    WINOGROUND_DIR,
    TEST_SEED,
    VALIDATION_SEED,
    EvalSets,
    shipped_eval_sets,
    validation_eval_sets,
)
from clip_benchmark_diffusion.errors import UserError

# Each source image is used once: a garment class's 1,000 test images allow 50 scenes per pair
# class (every pair class uses each garment once on one side: 20 uses per scene round).
MAX_PER_CLASS = 50
# The validation hold-out has 100 images per garment: 5 rounds of the 100 pair classes use them all.
MAX_VALIDATION_PER_CLASS = 5

_LICENSE = """\
# Fashion-MNIST two-garment scenes ({what})

Built from **Fashion-MNIST** by Zalando Research (Han Xiao, Kashif Rasul, Roland Vollgraf,
arXiv:1708.07747), <https://github.com/zalandoresearch/fashion-mnist>, released under the MIT License:

{notice}
## Provenance

- Source: Debian package `dataset-fashion-mnist`, `{debian}/{source}.
- Written by `scripts/build_fashion_pairs.py` of clip_benchmark_diffusion (seed {seed}): each scene
  is two {split} images side by side (28x56 RGB PNG), each multiplied by a colour's channel mask
  ({colours}), so the maximum over channels is the source image exactly. Scenes and captions:
  `demo/clip_benchmark_diffusion_demo/pairs.py`; which images: `pairs_data.py`. Each {split} image is used
  at most once across the classification set and the probes.
{body}"""
_SOURCES = {
    "test": "t10k-*-ubyte.gz` (the official test split)",
    "validation": ("train-*-ubyte.gz` (the validation hold-out of the train split, `validation_indices` in "
                   "`fashion_mnist.py`: images no demo model trained on)"),
}


class _ClassificationScenes:
    """(PIL image, label) items with ``classes``/``templates``, the input of ``convert_dataset``."""

    def __init__(self, sets: EvalSets) -> None:
        self.pixels = compose(sets.images, sets.classification)
        self.labels = sets.classification.pair_class
        self.classes = list(PAIR_CLASSNAMES)
        self.templates = list(EVAL_WRAPPERS)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return Image.fromarray(self.pixels[i]), int(self.labels[i])


def fix_tar_times(path: Path) -> None:
    """Rewrite a tar with every member's mtime at 0: ``convert_dataset`` stamps the build time,
    and a rebuild should give the same bytes (the shard is committed)."""
    buffer = io.BytesIO()
    with tarfile.open(path) as src, tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as dst:
        for member in src:
            data = src.extractfile(member).read() if member.isfile() else None
            member.mtime = 0
            dst.addfile(member, io.BytesIO(data) if data is not None else None)
    path.write_bytes(buffer.getvalue())


def write_classification(sets: EvalSets, out_dir: Path) -> int:
    """The 100-class ``wds/`` folder, by clip_benchmark's own writer; returns the image count."""
    from clip_benchmark.webdataset_builder import convert_dataset

    if out_dir.exists():
        shutil.rmtree(out_dir)
    dataset = _ClassificationScenes(sets)
    with warnings.catch_warnings():  # its DataLoader asks for 8 workers on any machine: nothing a user can act on
        warnings.filterwarnings("ignore", message="This DataLoader will create", category=UserWarning)
        convert_dataset(dataset, "test", str(out_dir), image_format="png", verbose=False)
    for shard in sorted((out_dir / "test").glob("*.tar")):
        fix_tar_times(shard)
    scenes = sets.classification
    rows = [" ".join(f"{a}/{b}" for a, b in zip(scenes.left_index[r:r + 10], scenes.right_index[r:r + 10]))
            for r in range(0, len(scenes), 10)]
    body = (f"- Classification: {len(scenes)} scenes, {len(scenes) // N_PAIR_CLASSES} per ordered pair "
            f"(label = 10 x left garment + right garment; garments in Fashion-MNIST label order: "
            f"{', '.join(GARMENTS)}), in rounds of one scene per class (every 100-prefix is balanced), "
            f"colours uniform and independent. Sample `s{{i:07d}}` is the i-th scene.\n"
            f"- `zeroshot_classification_templates.txt` holds wrappers never seen in training.\n\n"
            f"## {_INDEX_NAMES[sets.split]} indices (left/right) of the scenes, in order\n\n```\n" + "\n".join(rows)
            + "\n```\n")
    (out_dir / "LICENSE.md").write_text(_license("100-class zero-shot classification", body, sets.split))
    return len(scenes)


def write_probes(sets: EvalSets, out_dir: Path) -> int:
    """The ``sugar_crepe/<task>`` folder: one PNG per scene, one JSON per probe; returns the scene count."""
    if out_dir.exists():
        shutil.rmtree(out_dir)
    (out_dir / "val2017").mkdir(parents=True)
    scenes = sets.probes
    pixels = compose(sets.images, scenes)
    names = [f"scene{i:05d}.png" for i in range(len(scenes))]
    for name, image in zip(names, pixels):
        Image.fromarray(image).save(out_dir / "val2017" / name, format="png")
    for probe, items in sets.items.items():
        ann = {
            str(i): {
                "filename": names[i], "caption": item.caption, "negative_caption": item.negative_caption,
                # Not read by clip_benchmark: the structured descriptions, for checks and analyses.
                "source": {"split": sets.split, "left": int(scenes.left_index[i]), "right": int(scenes.right_index[i])},
                "positive": [list(side) for side in item.positive],
                "negative": [list(side) for side in item.negative],
                "relation": item.relation, "wrapper": item.wrapper,
            }
            for i, item in enumerate(items)
        }
        lines = ",\n".join(f"{json.dumps(key)}: {json.dumps(value)}" for key, value in ann.items())
        (out_dir / f"{probe}.json").write_text("{\n" + lines + "\n}\n")  # one item per line
    body = (f"- Probes: {len(scenes)} scenes, each with two different garments in two different colours; "
            "one item per scene in each of " + ", ".join(f"`{p}.json` ({d})" for p, d in PROBES.items()) +
            ". A scene's positive caption is the same in every probe; `positive`/`negative` give "
            "[[left garment, left colour], [right garment, right colour]] (indices into the garment and "
            f"colour lists: {', '.join(GARMENTS)}; {', '.join(COLOURS)}), `relation` indexes {list(RELATIONS)}, "
            f"`wrapper` indexes the held-out wrappers {list(EVAL_WRAPPERS)}; `source` the test-split indices.\n")
    (out_dir / "LICENSE.md").write_text(_license("image-caption selection probes", body))
    return len(scenes)


_INDEX_NAMES = {"test": "Test-split", "validation": "Train-split (validation hold-out)"}
# Winoground instance kinds, alternating: the probe whose negative caption describes the twin image.
WINOGROUND_SWAPS = (("swap_obj", "position swap"), ("swap_att", "colour swap"))


def swapped_twins(scenes: Scenes, probes: list[str]) -> Scenes:
    """Scene i with its two garments exchanged (``swap_obj``: each keeps its colour) or its two
    colours exchanged (``swap_att``): the scene that scene i's negative caption under that probe describes."""
    pos = np.array([p == "swap_obj" for p in probes])
    return Scenes(left_index=np.where(pos, scenes.right_index, scenes.left_index),
                  right_index=np.where(pos, scenes.left_index, scenes.right_index),
                  left_garment=np.where(pos, scenes.right_garment, scenes.left_garment),
                  right_garment=np.where(pos, scenes.left_garment, scenes.right_garment),
                  # both swaps exchange the colours of the two sides: with the garments, or without them
                  left_colour=scenes.right_colour, right_colour=scenes.left_colour)


def write_winoground(sets: EvalSets, out_dir: Path, n: int) -> int:
    """The Winoground-layout folder from the first ``n`` probe scenes; returns the instance count."""
    if n > len(sets.probes):
        raise UserError(f"--winoground {n} needs as many probe scenes; there are {len(sets.probes)}")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    (out_dir / "images").mkdir(parents=True)
    first = Scenes(*(getattr(sets.probes, f)[:n] for f in Scenes.__dataclass_fields__))
    probes = [WINOGROUND_SWAPS[i % 2][0] for i in range(n)]
    twins = swapped_twins(first, probes)
    pixels, twin_pixels = compose(sets.images, first), compose(sets.images, twins)
    lines = []
    for i in range(n):
        item = sets.items[probes[i]][i]
        names = [f"ex_{i}_img_0", f"ex_{i}_img_1"]
        for name, image in zip(names, (pixels[i], twin_pixels[i])):
            Image.fromarray(image).save(out_dir / "images" / f"{name}.png", format="png")
        lines.append(json.dumps({
            "id": i, "caption_0": item.caption, "caption_1": item.negative_caption,
            "image_0": names[0], "image_1": names[1], "tag": WINOGROUND_SWAPS[i % 2][1],
            # Not read by the loader: the structured descriptions, for checks and analyses.
            "source": {"split": sets.split, "left": int(first.left_index[i]), "right": int(first.right_index[i])},
            "positive": [list(side) for side in item.positive], "negative": [list(side) for side in item.negative],
        }))
    (out_dir / "examples.jsonl").write_text("\n".join(lines) + "\n")
    body = (f"- Winoground layout (`examples.jsonl`, `images/`): {n} instances from the first {n} probe scenes "
            "of `fashion_pairs_probes` (the same scenes and captions); image 0 is the probe scene with its "
            "positive caption (caption 0), image 1 its twin, made from the same two source images, with the "
            "probe's negative caption (caption 1), which describes it exactly. Even ids: position swap (the "
            "garments in the other order, each keeping its colour); odd ids: colour swap (the two colours "
            "exchanged). `positive`/`negative` describe image 0/image 1 as in the probes; `source` gives the "
            f"{sets.split}-split indices.\n")
    (out_dir / "LICENSE.md").write_text(_license("Winoground-format instances", body, sets.split))
    return n


def _license(what: str, body: str, split: str = "test") -> str:
    seed = TEST_SEED if split == "test" else VALIDATION_SEED
    return _LICENSE.format(what=what, notice=MIT_NOTICE, debian=DEBIAN_DIR, source=_SOURCES[split], seed=seed,
                           split=split, colours=", ".join(COLOURS), body=body)


def check_sizes(per_class: int, probe_scenes: int, validation: bool = False) -> None:
    """Sizes that would reuse a source image are a user error, found before any work."""
    if validation:
        if not 1 <= per_class <= MAX_VALIDATION_PER_CLASS:
            raise UserError(f"--per-class must be 1..{MAX_VALIDATION_PER_CLASS} with --validation (the hold-out has "
                            f"100 images per garment, each used once), got {per_class}")
        return
    if not 1 <= per_class <= MAX_PER_CLASS:
        raise UserError(f"--per-class must be 1..{MAX_PER_CLASS} (each test image is used once), got {per_class}")
    # Probe scenes take two different garments: about 2/10 of scenes use a given garment.
    free = 1000 - 2 * N_PAIR_CLASSES // len(GARMENTS) * per_class
    limit = int(free * len(GARMENTS) / 2 * 0.9)  # 10% margin for the random draw's spread
    if not 1 <= probe_scenes <= limit:
        raise UserError(f"--probe-scenes must be 1..{limit} with --per-class {per_class}, got {probe_scenes}")


def build_validation(folder: Path, per_class: int) -> int:
    """The 100-class set from the validation hold-out, written to ``folder``; returns the scene count."""
    check_sizes(per_class, 0, validation=True)
    return write_classification(validation_eval_sets(per_class, 0), folder)


def build_validation_winoground(folder: Path, n: int) -> int:
    """Winoground instances from the validation hold-out's probe scenes (to choose settings on), in ``folder``."""
    return write_winoground(validation_eval_sets(0, n), folder, n)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEMO_DIR,
                        help="parent folder of fashion_pairs_100/ and fashion_pairs_probes/ (default: shipped)")
    parser.add_argument("--per-class", type=int, default=SHIPPED_PER_CLASS, help="classification scenes per class")
    parser.add_argument("--probe-scenes", type=int, default=SHIPPED_PROBE_SCENES, help="items per probe")
    parser.add_argument("--validation", action="store_true",
                        help="only the 100-class set, from the train split's validation hold-out (needs --out)")
    parser.add_argument("--winoground", type=int, default=SHIPPED_WINOGROUND,
                        help="Winoground-format instances (at most --probe-scenes)")
    parser.add_argument("--validation-winoground", action="store_true",
                        help="only the Winoground-format set, from the validation hold-out (needs --out)")
    args = parser.parse_args(argv)
    try:
        check_sizes(args.per_class, args.probe_scenes, args.validation)
        if (args.validation or args.validation_winoground) and args.out == DEMO_DIR:
            raise UserError("--validation needs --out: the shipped folders hold test scenes")
        if not 1 <= args.winoground <= (400 if args.validation_winoground else args.probe_scenes):
            raise UserError(f"--winoground must be 1..{400 if args.validation_winoground else args.probe_scenes} "
                            f"(one instance per probe scene), got {args.winoground}")
    except UserError as exc:
        print(exc, file=sys.stderr)
        return 2
    if args.validation:
        folder = args.out / PAIRS_DATASET_DIR.name
        print(f"wrote {build_validation(folder, args.per_class)} validation classification scenes to {folder}")
        return 0
    if args.validation_winoground:
        folder = args.out / WINOGROUND_DIR.name
        print(f"wrote {build_validation_winoground(folder, args.winoground)} validation Winoground instances to {folder}")
        return 0
    sets = shipped_eval_sets(args.per_class, args.probe_scenes)
    n_cls = write_classification(sets, args.out / PAIRS_DATASET_DIR.name)
    n_probe = write_probes(sets, args.out / PROBES_DIR.name)
    n_wino = write_winoground(sets, args.out / WINOGROUND_DIR.name, args.winoground)
    print(f"wrote {n_cls} classification scenes to {args.out / PAIRS_DATASET_DIR.name}, "
          f"{n_probe} probe scenes x {len(PROBES)} probes to {args.out / PROBES_DIR.name} and "
          f"{n_wino} Winoground instances to {args.out / WINOGROUND_DIR.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
