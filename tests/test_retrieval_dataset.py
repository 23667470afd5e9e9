"""The shipped two-garment retrieval set (issue 26): what clip_benchmark reads, what it holds, how it rebuilds."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from cli_helpers import load_script
from clip_benchmark_diffusion_demo.pairs import EVAL_WRAPPERS, RELATIONS, caption, untint
from clip_benchmark_diffusion_demo.pairs_data import (RETRIEVAL_CAPTIONS, RETRIEVAL_DIR, SHIPPED_RETRIEVAL_SCENES,
                                                      shipped_eval_sets)
from wds_data import needs_fashion_mnist

needs_debian = needs_fashion_mnist("t10k-images-idx3-ubyte.gz")


@needs_debian
def test_shipped_scenes_are_unused_test_images_with_captions_that_describe_only_them(tmp_path: Path) -> None:
    from clip_benchmark.datasets.builder import build_dataset

    items = list(build_dataset(dataset_name="wds/fashion_pairs_retrieval", root=str(RETRIEVAL_DIR), transform=None,
                               split="test", download=False, task="zeroshot_retrieval"))
    assert len(items) == SHIPPED_RETRIEVAL_SCENES and {len(c) for _, c in items} == {RETRIEVAL_CAPTIONS}
    sets = shipped_eval_sets(n_retrieval=SHIPPED_RETRIEVAL_SCENES)
    scenes = sets.retrieval
    descriptions = set()
    for i, (image, captions) in enumerate(items):
        left, right = untint(np.asarray(image))                          # the PNG holds the test images exactly
        assert (left == sets.images[scenes.left_index[i]]).all() and (right == sets.images[scenes.right_index[i]]).all()
        sides = ((int(scenes.left_garment[i]), int(scenes.left_colour[i])),
                 (int(scenes.right_garment[i]), int(scenes.right_colour[i])))
        assert sides[0][0] != sides[1][0] and sides[0][1] != sides[1][1]
        wordings = {caption(*sides, r, w) for r in range(len(RELATIONS)) for w in EVAL_WRAPPERS}
        assert set(captions) <= wordings and len(set(captions)) == RETRIEVAL_CAPTIONS   # held-out wrappers only
        descriptions.add(sides)
    assert len(descriptions) == SHIPPED_RETRIEVAL_SCENES                 # no caption fits two scenes
    used = [*scenes.left_index, *scenes.right_index]
    others = {int(x) for s in (sets.classification, sets.probes) for x in (*s.left_index, *s.right_index)}
    assert len(set(used)) == len(used) and not set(used) & others     # no image shared with the other sets

    # The build script rebuilds the shipped folder byte for byte.
    assert load_script("build_fashion_retrieval").main(["--out", str(tmp_path)]) == 0
    files = sorted(p.relative_to(RETRIEVAL_DIR) for p in RETRIEVAL_DIR.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / RETRIEVAL_DIR.name)
                           for p in (tmp_path / RETRIEVAL_DIR.name).rglob("*") if p.is_file())
    for name in files:
        assert (tmp_path / RETRIEVAL_DIR.name / name).read_bytes() == (RETRIEVAL_DIR / name).read_bytes(), name
