"""The two-garment evaluation sets (issue 11): what clip_benchmark reads, what they hold, how they rebuild."""
from __future__ import annotations

import json
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from cli_helpers import load_script
from clip_benchmark_diffusion_demo.fashion_mnist import load_split
from clip_benchmark_diffusion_demo.pairs import (
    COLOURS,
    EVAL_WRAPPERS,
    GARMENTS,
    PAIR_CLASSNAMES,
    PROBES,
    RELATIONS,
    TRAIN_WRAPPERS,
    caption,
    noun_phrase,
    random_scenes,
    tint,
    training_captions,
    untint,
)
from clip_benchmark_diffusion_demo.pairs_data import PAIRS_DATASET_DIR, PROBES_DIR, WINOGROUND_DIR

from wds_data import needs_fashion_mnist  # noqa: E402

needs_debian = needs_fashion_mnist("t10k-images-idx3-ubyte.gz")


def _ann(probe: str) -> dict:
    return json.loads((PROBES_DIR / f"{probe}.json").read_text())


def test_tint_keeps_the_grey_image_exactly() -> None:
    gray = np.random.default_rng(0).integers(0, 256, size=(4, 28, 28), dtype=np.uint8)
    colours = np.array([0, 1, 2, 3])
    rgb = tint(gray, colours)
    assert rgb.shape == (4, 28, 28, 3) and rgb.dtype == np.uint8
    np.testing.assert_array_equal(rgb.max(-1), gray)
    assert (rgb[0, ..., 1:] == 0).all() and (rgb[3, ..., 2] == 0).all()  # red; yellow = red + green
    left, right = untint(np.concatenate([rgb[0], rgb[1]], axis=1))
    np.testing.assert_array_equal(left, gray[0])
    np.testing.assert_array_equal(right, gray[1])


def test_words() -> None:
    assert noun_phrase(9, None) == "an ankle boot"
    assert noun_phrase(8, 0) == "a red bag"
    assert caption((8, 0), (7, 2), 0, "a photo of {c}.") == "a photo of a red bag on the left and a blue sneaker on the right."
    assert caption((8, 0), (7, 2), 3, "{c}") == "a blue sneaker to the right of a red bag"
    assert len(set(PAIR_CLASSNAMES)) == 100
    assert PAIR_CLASSNAMES[8 * 10 + 7] == "a bag on the left and a sneaker on the right"
    assert not set(EVAL_WRAPPERS) & set(TRAIN_WRAPPERS)
    assert all("{c}" in w for w in EVAL_WRAPPERS + TRAIN_WRAPPERS)


def test_longest_caption_fits_the_planned_context_length() -> None:
    import open_clip

    longest = max((caption((g, c), (g, c), r, w) for g in range(10) for c in range(4)
                   for r in range(len(RELATIONS)) for w in TRAIN_WRAPPERS + EVAL_WRAPPERS), key=len)
    tokens = open_clip.tokenize([longest], context_length=77)[0]
    assert int((tokens != 0).sum()) <= 32, longest


def test_training_captions_are_seeded_and_mostly_coloured() -> None:
    labels = np.repeat(np.arange(10), 5)
    scenes = random_scenes(np.random.default_rng(0), labels, np.arange(50), 400)
    first = training_captions(scenes, np.random.default_rng(1))
    assert first == training_captions(scenes, np.random.default_rng(1))
    coloured = sum(any(c in text for c in COLOURS) for text in first)
    assert 0.65 < coloured / len(first) < 0.85  # COLOURLESS_SHARE = 0.25
    assert not any(w != "{c}" and w.format(c="") in text for text in first for w in EVAL_WRAPPERS)


def test_classification_folder_loads_in_clip_benchmark() -> None:
    from clip_benchmark.datasets.builder import build_dataset

    ds = build_dataset(dataset_name="wds/fashion_pairs_100", root=str(PAIRS_DATASET_DIR), split="test",
                       transform=np.asarray)
    assert ds.classes == list(PAIR_CLASSNAMES)
    assert ds.templates == list(EVAL_WRAPPERS)
    samples = list(ds)
    labels = [y for _, y in samples]
    assert len(samples) == 1000
    assert Counter(labels[:100]) == {c: 1 for c in range(100)}
    assert Counter(labels) == {c: 10 for c in range(100)}
    assert samples[0][0].shape == (28, 56, 3) and samples[0][0].dtype == np.uint8


@pytest.mark.parametrize("probe", sorted(PROBES))
def test_probe_folder_loads_in_clip_benchmark(probe: str) -> None:
    from clip_benchmark.datasets.builder import build_dataset

    ds = build_dataset(dataset_name=f"sugar_crepe/{probe}", root=str(PROBES_DIR), split="test",
                       transform=np.asarray, download=False, task="image_caption_selection")
    ann = _ann(probe)
    assert len(ds) == len(ann) == 500
    image, (positive, negative) = ds[7]
    assert image.shape == (28, 56, 3)
    assert (positive, negative) == (ann["7"]["caption"], ann["7"]["negative_caption"])


@pytest.mark.parametrize("probe", sorted(PROBES))
def test_negatives_differ_only_in_the_probed_aspect(probe: str) -> None:
    for item in _ann(probe).values():
        (lg, lc), (rg, rc) = pos = [tuple(side) for side in item["positive"]]
        neg = [tuple(side) for side in item["negative"]]
        wrapper = EVAL_WRAPPERS[item["wrapper"]]  # a held-out wrapper
        assert item["caption"] == caption(*pos, item["relation"], wrapper)
        assert item["negative_caption"] == caption(*neg, item["relation"], wrapper)
        assert item["caption"] != item["negative_caption"]
        assert lg != rg and lc != rc  # probe scenes: two garments, two colours
        if probe == "swap_obj":
            assert neg == [(rg, rc), (lg, lc)]
        elif probe == "swap_att":
            assert neg == [(lg, rc), (rg, lc)]
        else:
            changed = [i for i in range(2) if neg[i] != pos[i]]
            assert len(changed) == 1
            (g0, c0), (g1, c1) = pos[changed[0]], neg[changed[0]]
            if probe == "replace_obj":
                assert c1 == c0 and g1 not in (lg, rg)  # a garment absent from the scene
            else:
                assert g1 == g0 and c1 not in (lc, rc)  # a colour absent from the scene


def test_probes_share_scenes_and_positives() -> None:
    anns = [_ann(p) for p in sorted(PROBES)]
    for key in anns[0]:
        assert len({(a[key]["filename"], a[key]["caption"]) for a in anns}) == 1


@needs_debian
def test_shipped_scenes_are_the_recorded_test_images() -> None:
    """Every scene half is the test image its provenance names; no test source image appears twice,
    and none of them is among the train images that training scenes are drawn from (by pixels)."""
    from clip_benchmark.datasets.builder import build_dataset
    from PIL import Image

    from clip_benchmark_diffusion_demo.pairs_data import training_pool

    images, labels = load_split("test")
    used: list[int] = []
    pairs = [tuple(map(int, cell.split("/"))) for cell in
             (PAIRS_DATASET_DIR / "LICENSE.md").read_text().split("```")[1].split()]
    ds = build_dataset(dataset_name="wds/fashion_pairs_100", root=str(PAIRS_DATASET_DIR), split="test",
                       transform=np.asarray)
    for (image, label), (left, right) in zip(ds, pairs, strict=True):
        a, b = untint(image)
        np.testing.assert_array_equal(a, images[left])
        np.testing.assert_array_equal(b, images[right])
        assert label == 10 * labels[left] + labels[right]
        used += [left, right]
    for i, item in _ann("swap_att").items():
        a, b = untint(np.asarray(Image.open(PROBES_DIR / "val2017" / item["filename"])))
        src = item["source"]
        np.testing.assert_array_equal(a, images[src["left"]])
        np.testing.assert_array_equal(b, images[src["right"]])
        assert [labels[src["left"]], labels[src["right"]]] == [side[0] for side in item["positive"]]
        used += [src["left"], src["right"]]
    assert len(used) == len(set(used)) == 2 * 1000 + 2 * 500

    train_images, _, pool = training_pool()
    train_rows = {row.tobytes() for row in train_images[pool].reshape(len(pool), -1)}
    assert not [i for i in used if images[i].tobytes() in train_rows]


@needs_debian
def test_validation_sets_come_from_the_hold_out_only() -> None:
    from clip_benchmark_diffusion_demo.fashion_mnist import validation_indices
    from clip_benchmark_diffusion_demo.pairs_data import training_pool, validation_eval_sets

    sets = validation_eval_sets(per_class=2, n_probe_scenes=200)
    _, labels, pool = training_pool()
    held = set(validation_indices(labels).tolist())
    used = np.concatenate([s.left_index for s in (sets.classification, sets.probes)]
                          + [s.right_index for s in (sets.classification, sets.probes)]).tolist()
    assert set(used) <= held and not set(used) & set(pool.tolist())
    assert len(used) == len(set(used)) == 2 * 200 + 2 * 200
    assert Counter(sets.classification.pair_class.tolist()) == {c: 2 for c in range(100)}


@needs_debian
def test_build_script_reproduces_the_shipped_folders(tmp_path: Path) -> None:
    assert load_script("build_fashion_pairs").main(["--out", str(tmp_path)]) == 0
    for shipped in (PAIRS_DATASET_DIR, PROBES_DIR, WINOGROUND_DIR):
        files = sorted(p.relative_to(shipped) for p in shipped.rglob("*") if p.is_file())
        rebuilt = sorted(p.relative_to(tmp_path / shipped.name) for p in (tmp_path / shipped.name).rglob("*") if p.is_file())
        assert files == rebuilt
        for name in files:
            assert (tmp_path / shipped.name / name).read_bytes() == (shipped / name).read_bytes(), name


def test_build_script_refuses_sizes_that_reuse_images(tmp_path: Path, capsys) -> None:
    assert load_script("build_fashion_pairs").main(["--out", str(tmp_path), "--per-class", "51"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("clip_benchmark_diffusion: --per-class must be 1..50")
    assert not list(tmp_path.iterdir())


@needs_fashion_mnist("train-images-idx3-ubyte.gz")
def test_validation_folder_holds_hold_out_scenes_that_clip_benchmark_reads(tmp_path: Path) -> None:
    """``--validation`` (what fit_temperature.py fits on): the validation sets' classification scenes
    as a wds folder, pixel for pixel, labelled as the shipped set is, never a test or training image."""
    from clip_benchmark.datasets.builder import build_dataset

    from clip_benchmark_diffusion_demo.pairs import compose
    from clip_benchmark_diffusion_demo.pairs_data import validation_eval_sets

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert load_script("build_fashion_pairs").main(["--validation", "--out", str(tmp_path), "--per-class", "1"]) == 0
    assert not [w for w in caught if "DataLoader" in str(w.message)]  # clip_benchmark's writer's worker warning
    folder = tmp_path / "fashion_pairs_100"
    ds = build_dataset(dataset_name="wds/fashion_pairs_100", root=str(folder), transform=None, split="test",
                       download=False)
    assert ds.classes == list(PAIR_CLASSNAMES) and ds.templates == list(EVAL_WRAPPERS)
    sets = validation_eval_sets(per_class=1, n_probe_scenes=0)
    pixels = compose(sets.images, sets.classification)
    got = [(np.asarray(image), int(label)) for image, label in ds]
    assert [label for _, label in got] == sets.classification.pair_class.tolist()
    for (image, _), expected in zip(got, pixels):
        np.testing.assert_array_equal(image, expected)
    assert "validation hold-out of the train split" in (folder / "LICENSE.md").read_text()
    test_images, _ = load_split("test")
    test_rows = {row.tobytes() for row in test_images.reshape(len(test_images), -1)}
    assert not [i for i in sets.classification.left_index if sets.images[i].tobytes() in test_rows]


def test_validation_build_refuses_sizes_past_the_hold_out_and_the_shipped_folder(tmp_path: Path, capsys) -> None:
    script = load_script("build_fashion_pairs")
    assert script.main(["--validation", "--out", str(tmp_path), "--per-class", "6"]) == 2
    assert script.main(["--validation", "--per-class", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and err[0].startswith("clip_benchmark_diffusion: --per-class must be 1..5 with --validation")
    assert err[1] == "clip_benchmark_diffusion: --validation needs --out: the shipped folders hold test scenes"
    assert not list(tmp_path.iterdir())


def test_winoground_folder_loads_through_clip_benchmarks_winoground_builder() -> None:
    """``--dataset winoground --dataset_root <folder>``: clip_benchmark's own builder, our local loader."""
    from clip_benchmark.datasets.builder import build_dataset, get_dataset_collate_fn

    from clip_benchmark_diffusion.integration.clip_benchmark import ensure_installed
    from clip_benchmark_diffusion.integration.winoground_local import read_examples

    ensure_installed()
    import torch

    ds = build_dataset(dataset_name="winoground", root=str(WINOGROUND_DIR), task="image_caption_selection",
                       transform=lambda im: torch.from_numpy(np.asarray(im).copy()))
    assert len(ds) == 200
    images, captions = ds[3]
    assert images.shape == (2, 28, 56, 3) and images.dtype == torch.uint8
    assert captions == [read_examples(WINOGROUND_DIR)[3][f"caption_{k}"] for k in (0, 1)]
    assert get_dataset_collate_fn("winoground") is not None


def test_winoground_twins_differ_only_by_the_swap() -> None:
    """Image 0 is the probe scene (same pixels, same positive caption); image 1 is made of the same two
    source garments, swapped in position (even ids) or in colour (odd ids), and caption 1 is the
    probe's negative caption, which describes it."""
    from PIL import Image

    from clip_benchmark_diffusion.integration.winoground_local import read_examples

    examples = read_examples(WINOGROUND_DIR)
    assert [ex["tag"] for ex in examples[:4]] == ["position swap", "colour swap"] * 2
    for ex in examples:
        i, probe = ex["id"], ("swap_obj", "swap_att")[ex["id"] % 2]
        item = _ann(probe)[str(i)]
        img0 = np.asarray(Image.open(WINOGROUND_DIR / "images" / f"{ex['image_0']}.png"))
        img1 = np.asarray(Image.open(WINOGROUND_DIR / "images" / f"{ex['image_1']}.png"))
        np.testing.assert_array_equal(img0, np.asarray(Image.open(PROBES_DIR / "val2017" / item["filename"])))
        assert (ex["caption_0"], ex["caption_1"]) == (item["caption"], item["negative_caption"])
        (lg, lc), (rg, rc) = item["positive"]
        a0, b0 = untint(img0)
        a1, b1 = untint(img1)
        if probe == "swap_obj":   # the garments change places, each with its colour
            np.testing.assert_array_equal(a1, b0), np.testing.assert_array_equal(b1, a0)
        else:                     # the garments stay, the colours change places
            np.testing.assert_array_equal(a1, a0), np.testing.assert_array_equal(b1, b0)
        assert item["negative"] == ([[rg, rc], [lg, lc]] if probe == "swap_obj" else [[lg, rc], [rg, lc]])
        left_colour = int(np.flatnonzero(img1[..., :28, :].reshape(-1, 3).max(0))[0])
        assert left_colour == [0, 1, 2, 0][rc]   # the twin's left garment wears the right one's colour
