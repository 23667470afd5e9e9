"""Write the two-garment retrieval set (issue 26) in clip_benchmark's ``wds`` retrieval format.

From the official Fashion-MNIST *test* split (Debian's dataset-fashion-mnist), seeded: ``--scenes``
scenes (default 100) drawn after the shipped classification, probe and Winoground sets, from the
test images those left unused, each with two different garments in two different colours and no
two scenes with the same description; each with 5 captions that name both garments, their colours
and their order in different wordings, all with wrappers held out of training. Written by
clip_benchmark's own ``convert_retrieval_dataset`` (``<key>.png`` + ``<key>.txt``, one caption a
line, ``dataset_type.txt`` = retrieval). Defaults rebuild the shipped folder byte for byte.

``--validation`` draws the same kind of set from the train split's validation hold-out (images no
demo model trained on), to choose settings on; the shipped set is for reporting only.

Usage:
    python scripts/build_fashion_retrieval.py                   # the shipped fashion_pairs_retrieval/
    python scripts/build_fashion_retrieval.py --validation --out runs/retrieval_validation
Then:
    clip_benchmark eval --task zeroshot_retrieval --dataset wds/fashion_pairs_retrieval \\
        --dataset_root <out>/fashion_pairs_retrieval ...
"""
from __future__ import annotations

import argparse
import shutil
import sys
import warnings
from pathlib import Path

from PIL import Image

from build_fashion_pairs import fix_tar_times  # a sibling: scripts/ is sys.path[0]
from clip_benchmark_diffusion_demo import DEMO_DIR
from clip_benchmark_diffusion_demo.fashion_mnist import DEBIAN_DIR, MIT_NOTICE
from clip_benchmark_diffusion_demo.pairs import COLOURS, EVAL_WRAPPERS, GARMENTS, compose
from clip_benchmark_diffusion_demo.pairs_data import (RETRIEVAL_CAPTIONS, RETRIEVAL_DIR, SHIPPED_PER_CLASS,
                                                      SHIPPED_PROBE_SCENES, SHIPPED_RETRIEVAL_SCENES, TEST_SEED,
                                                      VALIDATION_SEED, EvalSets, shipped_eval_sets,
                                                      validation_eval_sets)
from clip_benchmark_diffusion.errors import UserError

MAX_SCENES = 400   # the shipped sets leave about 700 test images per garment; 400 scenes take about 80

_LICENSE = """\
# Fashion-MNIST two-garment scenes (image-text retrieval)

Built from **Fashion-MNIST** by Zalando Research (Han Xiao, Kashif Rasul, Roland Vollgraf,
arXiv:1708.07747), <https://github.com/zalandoresearch/fashion-mnist>, released under the MIT License:

{notice}
## Provenance

- Source: Debian package `dataset-fashion-mnist`, `{debian}/{source}`.
- Written by `scripts/build_fashion_retrieval.py` of clip_benchmark_diffusion (seed {seed}) with
  clip_benchmark's `convert_retrieval_dataset`: each scene is two {split} images side by side (28x56 RGB
  PNG), each multiplied by a colour's channel mask ({colours}). The scenes are drawn after the
  shipped classification, probe and Winoground sets, from the images those left, so no image is shared.
- {n} scenes, each with two different garments ({garments}) in two different colours, no two
  with the same description; {captions} captions per scene (`<key>.txt`, one a line), each naming both
  garments, their colours and their order, with wrappers held out of training ({wrappers}).
  Sample `s{{i:07d}}` is the i-th scene.

## {split_name} indices (left/right) of the scenes, in order

```
{rows}
```
"""
_SOURCES = {"test": "t10k-*-ubyte.gz (the official test split)",
            "validation": "train-*-ubyte.gz (the validation hold-out of the train split)"}


class _RetrievalScenes:
    """(PIL image, captions) items, the input of ``convert_retrieval_dataset``."""

    def __init__(self, sets: EvalSets) -> None:
        self.pixels = compose(sets.images, sets.retrieval)
        self.captions = sets.retrieval_captions

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, i: int):
        return Image.fromarray(self.pixels[i]), list(self.captions[i])


def write_retrieval(sets: EvalSets, out_dir: Path) -> int:
    """The ``wds/`` retrieval folder; returns the scene count."""
    from clip_benchmark.webdataset_builder import convert_retrieval_dataset

    if out_dir.exists():
        shutil.rmtree(out_dir)
    with warnings.catch_warnings():  # its DataLoader asks for 8 workers on any machine: nothing a user can act on
        warnings.filterwarnings("ignore", message="This DataLoader will create", category=UserWarning)
        convert_retrieval_dataset(_RetrievalScenes(sets), "test", str(out_dir), image_format="png", verbose=False)
    for shard in sorted((out_dir / "test").glob("*.tar")):
        fix_tar_times(shard)
    scenes = sets.retrieval
    rows = [" ".join(f"{a}/{b}" for a, b in zip(scenes.left_index[r:r + 10], scenes.right_index[r:r + 10]))
            for r in range(0, len(scenes), 10)]
    (out_dir / "LICENSE.md").write_text(_LICENSE.format(
        notice=MIT_NOTICE, debian=DEBIAN_DIR, source=_SOURCES[sets.split], split=sets.split, n=len(scenes),
        seed=TEST_SEED if sets.split == "test" else VALIDATION_SEED, colours=", ".join(COLOURS),
        garments=", ".join(GARMENTS), captions=RETRIEVAL_CAPTIONS, wrappers="; ".join(EVAL_WRAPPERS),
        split_name="Test-split" if sets.split == "test" else "Train-split (validation hold-out)",
        rows="\n".join(rows)))
    return len(scenes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEMO_DIR, help="parent folder of fashion_pairs_retrieval/")
    parser.add_argument("--scenes", type=int, default=SHIPPED_RETRIEVAL_SCENES, help="scenes (images)")
    parser.add_argument("--validation", action="store_true",
                        help="from the train split's validation hold-out (needs --out)")
    args = parser.parse_args(argv)
    try:
        if args.validation and args.out == DEMO_DIR:
            raise UserError("--validation needs --out: the shipped folder holds test scenes")
        limit = 100 if args.validation else MAX_SCENES
        if not 1 <= args.scenes <= limit:
            raise UserError(f"--scenes must be 1..{limit} (each source image is used once), got {args.scenes}")
    except UserError as exc:
        print(exc, file=sys.stderr)
        return 2
    if args.validation:
        sets = validation_eval_sets(0, 0, args.scenes)
    else:
        sets = shipped_eval_sets(SHIPPED_PER_CLASS, SHIPPED_PROBE_SCENES, args.scenes)
    folder = args.out / RETRIEVAL_DIR.name
    n = write_retrieval(sets, folder)
    print(f"wrote {n} {sets.split} scenes x {RETRIEVAL_CAPTIONS} captions to {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
