"""``--data pairs`` (issue 11): both training scripts run a few steps and write folders the stock loaders read.

Plumbing only: three steps on a few scenes, checks on a handful of validation scenes. What it pins
is that the saved weights are the ones the training-time check scored.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cli_helpers import load_script

from wds_data import needs_fashion_mnist  # noqa: E402

pytestmark = needs_fashion_mnist("train-images-idx3-ubyte.gz")
SMALL_CHECKS = ["--eval-every", "0", "--eval-images", "3", "--eval-probe-scenes", "4", "--log-every", "1",
                "--threads", "1", "--steps", "3", "--train-limit", "512"]


def test_pair_batches_are_seeded_scenes_from_the_training_pool() -> None:
    from clip_benchmark_diffusion.demo.pairs import untint
    from clip_benchmark_diffusion.demo.pairs_training import PairBatches

    a, b = PairBatches(seed=3), PairBatches(seed=3)
    pixels, captions = a.sample(16)
    again, captions_again = b.sample(16)
    np.testing.assert_array_equal(pixels, again)
    assert captions == captions_again and pixels.shape == (16, 28, 56, 3)
    pool_rows = {row.tobytes() for row in a.images[a.pool].reshape(len(a.pool), -1)}
    for scene in pixels:
        assert all(half.tobytes() in pool_rows for half in untint(scene))


def test_diffusion_pairs_run_saves_a_loadable_rgb_folder(tmp_path) -> None:
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from clip_benchmark_diffusion.demo.pairs_training import load_pair_checks

    script = load_script("train_diffusion_tiny")
    summary = script.main(["--data", "pairs", "--out", str(tmp_path), "--batch-size", "4",
                           "--eval-timesteps", "1", "--final-eval-timesteps", "0", *SMALL_CHECKS])
    assert summary["steps_done"] == 3
    assert set(summary["curve"][-1]) >= {"top1_100", "swap_obj", "swap_att", "replace_obj", "replace_att"}
    assert json.loads((tmp_path / "model_index.json").read_text())["vae"] == [None, None]
    unet = UNet2DConditionModel.from_pretrained(tmp_path, subfolder="unet")
    text_encoder = CLIPTextModel.from_pretrained(tmp_path, subfolder="text_encoder")
    tokenizer = CLIPTokenizer.from_pretrained(tmp_path, subfolder="tokenizer")
    scheduler = DDPMScheduler.from_pretrained(tmp_path, subfolder="scheduler")
    assert (unet.config.in_channels, unet.config.out_channels, tuple(unet.config.sample_size)) == (3, 3, (28, 56))
    assert tokenizer.model_max_length == 32
    acc = script.evaluate_pairs(unet, text_encoder, tokenizer, scheduler, load_pair_checks(3, 4), 1, full=False)
    assert {k: summary["curve"][-1][k] for k in acc} == acc


def test_clip_pairs_run_saves_an_open_clip_model(tmp_path) -> None:
    import open_clip
    from PIL import Image

    from clip_benchmark_diffusion.demo import CLIP_PAIRS_NAME
    from clip_benchmark_diffusion.demo.pairs_training import load_pair_checks

    script = load_script("train_clip_tiny")
    summary = script.main(["--data", "pairs", "--out", str(tmp_path), "--batch-size", "16", *SMALL_CHECKS])
    assert summary["steps_done"] == 3 and summary["model_name"] == CLIP_PAIRS_NAME
    open_clip.add_model_config(tmp_path / f"{CLIP_PAIRS_NAME}.json")
    model, _, preprocess = open_clip.create_model_and_transforms(
        CLIP_PAIRS_NAME, pretrained=str(tmp_path / script.WEIGHTS_NAME))
    local_model, _, local_preprocess = open_clip.create_model_and_transforms(f"local-dir:{tmp_path}")
    checks = load_pair_checks(3, 4)
    pp = model.visual.preprocess_cfg
    x = script.normalize_rgb(torch.from_numpy(checks.pixels), pp["mean"], pp["std"])
    # clip_benchmark hands the scene over as a PIL RGB image; its transform must match training's.
    assert torch.allclose(preprocess(Image.fromarray(checks.pixels[1])), x[1], atol=1e-5)
    assert torch.allclose(local_preprocess(Image.fromarray(checks.pixels[1])), x[1], atol=1e-5)
    model.eval()
    local_model.eval()
    with torch.no_grad():
        assert torch.allclose(model.encode_image(x), local_model.encode_image(x))
    tokenizer = open_clip.get_tokenizer(CLIP_PAIRS_NAME)
    acc = script.evaluate_pairs(model, tokenizer, checks, pp["mean"], pp["std"])
    assert {k: summary["curve"][-1][k] for k in acc} == acc
