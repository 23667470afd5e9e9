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
    from clip_benchmark_diffusion_demo.pairs import untint
    from pair_training import PairBatches

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

    from pair_training import load_pair_checks

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

    from clip_benchmark_diffusion_demo import CLIP_PAIRS_NAME
    from pair_training import load_pair_checks

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


RESUME_ARGS = {"train_diffusion_tiny": ["--batch-size", "4", "--eval-timesteps", "1", "--final-eval-timesteps", "0"],
               "train_clip_tiny": ["--batch-size", "16"]}


@pytest.mark.parametrize("name", sorted(RESUME_ARGS))
def test_a_run_split_by_stop_after_ends_bit_for_bit_where_the_whole_run_does(tmp_path, name) -> None:
    """The pair models take hours on these cores, so a run is split across sessions: the
    checkpoint must carry every weight, optimiser moment, schedule step, EMA and generator state."""
    from safetensors.torch import load_file

    script = load_script(name)
    args = ["--data", "pairs", *RESUME_ARGS[name], *SMALL_CHECKS[:-4], "--steps", "4", "--train-limit", "512"]
    whole = script.main([*args, "--out", str(tmp_path / "whole")])
    ckpt = tmp_path / "run.ckpt"
    first = script.main([*args, "--out", str(tmp_path / "split"), "--checkpoint", str(ckpt), "--stop-after", "2"])
    assert first["stopped"] and first["steps_done"] == 2 and ckpt.exists()
    assert not (tmp_path / "split").joinpath("training_summary.json").exists()
    # The checks read the EMA weights and draw from their own generators: a resumed run may change them.
    second = script.main([*args, "--out", str(tmp_path / "split"), "--checkpoint", str(ckpt), "--eval-every", "3"])
    assert second["steps_done"] == 4
    assert [(s["from_step"], s["to_step"]) for s in second["segments"]] == [(0, 2), (2, 4)]
    weights = sorted(p.relative_to(tmp_path / "whole") for p in (tmp_path / "whole").rglob("*.safetensors"))
    assert weights
    for rel in weights:
        a, b = load_file(tmp_path / "whole" / rel), load_file(tmp_path / "split" / rel)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), rel
    assert second["curve"][-1] == whole["curve"][-1] and [c["step"] for c in second["curve"]] == [3, 4]


def test_a_checkpoint_is_refused_under_other_settings(tmp_path) -> None:
    script = load_script("train_clip_tiny")
    args = ["--data", "pairs", "--batch-size", "16", *SMALL_CHECKS[:-4], "--steps", "4", "--train-limit", "512",
            "--out", str(tmp_path / "out"), "--checkpoint", str(tmp_path / "run.ckpt")]
    script.main([*args, "--stop-after", "1"])
    before = (tmp_path / "run.ckpt").read_bytes()
    with pytest.raises(SystemExit, match=r"belongs to another run \(lr 0.002 -> 0.001\)"):
        script.main([*args, "--lr", "0.001"])
    assert (tmp_path / "run.ckpt").read_bytes() == before
    with pytest.raises(SystemExit, match="--stop-after needs --checkpoint"):
        script.main([*args[:-2], "--stop-after", "1"])
