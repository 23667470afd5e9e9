"""The CLIP shortlist's pieces: mask, merged ranks, recall@k, and the demo CLIP as a real shortlister."""
from __future__ import annotations

import pytest
import torch

from clip_benchmark_diffusion.adapter.shortlist import (ShortlistSpec, Shortlister, merge_ranks, recall_at_k,
                                                        shortlist_mask)
from clip_benchmark_diffusion_demo import (CLIP_PAIRS_NAME, CLIP_PAIRS_WEIGHTS, CLIP_TINY_DIR, CLIP_TINY_NAME,
                                          CLIP_TINY_WEIGHTS, DATASET_DIR)
from clip_benchmark_diffusion.errors import UserError


def test_mask_merge_and_recall_on_a_hand_case():
    scores = torch.tensor([[0.9, 0.1, 0.5, 0.7, 0.3]])               # CLIP order: 0, 3, 2, 4, 1
    allowed = shortlist_mask(scores, 3)
    assert allowed.tolist() == [[True, False, True, True, False]]
    # The diffusion model prefers 2, then 3, then 0 among the shortlist; unscored classes it ranked last.
    diffusion_rank = torch.tensor([[2, 3, 0, 1, 4]])
    assert merge_ranks(diffusion_rank, allowed, scores).tolist() == [[2, 4, 0, 1, 3]]
    assert recall_at_k(allowed, torch.tensor([2])) == 1.0 and recall_at_k(allowed, torch.tensor([1])) == 0.0
    assert shortlist_mask(scores, 9).all()
    with pytest.raises(UserError, match="shortlist_k"):
        ShortlistSpec("m", "p", 0)


@pytest.mark.skipif(not (CLIP_TINY_DIR / "open_clip_model.safetensors").is_file(), reason="demo CLIP not built")
def test_demo_clip_shortlists_the_shipped_images():
    from clip_benchmark.datasets.builder import build_dataset

    from clip_benchmark_diffusion.adapter.transform import image_transform
    from clip_benchmark_diffusion_demo import register_open_clip_configs

    register_open_clip_configs()
    spec = ShortlistSpec(CLIP_TINY_NAME, str(CLIP_TINY_WEIGHTS), k=3)
    assert spec.label == f"hybrid:{CLIP_TINY_NAME}/{CLIP_TINY_WEIGHTS}@top3"
    ds = build_dataset(dataset_name="wds/fashion_mnist", root=str(DATASET_DIR), transform=image_transform(28, 1),
                       split="test", download=False)
    pairs = [pair for _, pair in zip(range(100), ds)]
    x, y = torch.stack([p[0] for p in pairs]), torch.tensor([int(p[1]) for p in pairs])
    shortlister = Shortlister(spec)
    class_emb = shortlister.class_embeddings([[t.format(c=c) for t in ds.templates] for c in ds.classes])
    scores = shortlister.scores(x, class_emb)                           # (100, 10)
    top1 = float((scores.argmax(1) == y).float().mean())
    recall = recall_at_k(shortlist_mask(scores, spec.k), y)
    assert 0.8 <= top1 <= recall <= 1.0, (top1, recall)                # chance is 0.1 and 0.3
    assert recall >= 0.97, recall


@pytest.mark.skipif(not CLIP_PAIRS_WEIGHTS.is_file(), reason="the trained CLIP pair model is not shipped")
def test_a_non_square_clip_shortlists_the_pair_scenes():
    # The pair CLIP's size comes from its JSON config as a list, [28, 56] (open_clip's own configs give
    # tuples); it once reached F.interpolate as a list of lists and crashed the hybrid.
    from clip_benchmark.datasets.builder import build_dataset

    from clip_benchmark_diffusion.adapter.transform import image_transform
    from clip_benchmark_diffusion_demo.pairs_data import PAIRS_DATASET_DIR

    shortlister = Shortlister(ShortlistSpec(CLIP_PAIRS_NAME, str(CLIP_PAIRS_WEIGHTS), k=5))
    assert shortlister.size == (28, 56)
    ds = build_dataset(dataset_name="wds/fashion_pairs_100", root=str(PAIRS_DATASET_DIR),
                       transform=image_transform((28, 56), 3), split="test", download=False)
    pairs = [pair for _, pair in zip(range(100), ds)]
    x, y = torch.stack([p[0] for p in pairs]), torch.tensor([int(p[1]) for p in pairs])
    scores = shortlister.scores(x, shortlister.class_embeddings([[t.format(c=c) for t in ds.templates] for c in ds.classes]))
    assert scores.shape == (100, 100)
    top1, recall = float((scores.argmax(1) == y).float().mean()), recall_at_k(shortlist_mask(scores, 5), y)
    assert 0.4 <= top1 <= recall and recall >= 0.8, (top1, recall)     # chance: 0.01 and 0.05


def test_bad_shortlister_is_a_user_error():
    with pytest.raises(UserError, match="cannot load the shortlist model"):
        Shortlister(ShortlistSpec("ViT-B-32", "/nonexistent/weights.bin", 5))


@pytest.mark.skipif(not CLIP_TINY_WEIGHTS.is_file(), reason="demo CLIP not built")
def test_shortlist_weights_of_another_architecture_are_one_line_before_any_image(tiny_sd, digits_wds, tmp_path,
                                                                                  inproc):
    """RN50 with the tiny ViT's weights: open_clip fails an assert ("text pos_embed width changed!"),
    which was a traceback at the first batch."""
    from cli_helpers import assert_clean_failure, quick_options

    opts = quick_options(tmp_path, shortlist_model="RN50", shortlist_pretrained=str(CLIP_TINY_WEIGHTS),
                         shortlist_k=3)
    proc = inproc("--model", f"diffusion_sd2@{opts}", "--pretrained", str(tiny_sd), "--dataset", "wds/digits",
                  "--dataset_root", str(digits_wds), "--output", "digits_{model}.json", cwd=tmp_path)
    assert_clean_failure(proc, "cannot load the shortlist model 'RN50'", "AssertionError", cwd=tmp_path)
    assert proc.returncode == 2 and not list(tmp_path.rglob("*.sqlite"))      # no image was scored


@pytest.mark.skipif(not (CLIP_TINY_DIR / "open_clip_model.safetensors").is_file(), reason="demo CLIP not built")
def test_hybrid_through_the_stock_command(tmp_path):
    import json

    from cli_helpers import clip_benchmark_eval
    from clip_benchmark_diffusion_demo.run import subset_dataset
    from clip_benchmark_diffusion.predictions import PREDICTIONS_ENV, predictions_path

    data = subset_dataset(20, tmp_path / "data")
    opts = f"strategy=anytime,max_samples=50,shortlist_model={CLIP_TINY_NAME},shortlist_pretrained={CLIP_TINY_WEIGHTS},shortlist_k=3"
    proc = clip_benchmark_eval("--model", "diffusion_tiny", "--pretrained", "default", "--dataset", "wds/fashion_mnist",
                               "--dataset_root", str(data), "--output", str(tmp_path / "out.json"), cwd=tmp_path,
                               env={"CLIP_BENCHMARK_DIFFUSION_OPTIONS": opts, PREDICTIONS_ENV: "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "out.json").read_text())
    label = f"hybrid:{CLIP_TINY_NAME}/{CLIP_TINY_WEIGHTS}@top3"
    assert res["model"] == f"diffusion_tiny+{label}" and res["diffusion_classifier"]["hybrid"] == label
    m = res["metrics"]
    assert 0.9 <= m["shortlist_recall_at_k"] <= 1.0 and m["acc1"] <= m["shortlist_recall_at_k"]
    assert 3 * 4 <= m["denoiser_calls_per_image"] <= 3 * 50                # only the 3 shortlisted classes
    assert m["acc1"] >= 0.7
    rows = [json.loads(line) for line in predictions_path(tmp_path / "out.json").read_text().splitlines()]
    assert all(len(set(r["top5"])) == 5 for r in rows)                       # the rest ranked below, in CLIP's order
