"""The demo training scripts run end to end on a few images and write folders the stock loaders read."""

from __future__ import annotations

import json

import pytest
import torch

from cli_helpers import load_script

from wds_data import needs_fashion_mnist  # noqa: E402

pytestmark = needs_fashion_mnist("train-images-idx3-ubyte.gz")


@pytest.fixture(scope="module")
def diffusion_run(tmp_path_factory):
    script = load_script("train_diffusion_tiny")
    out = tmp_path_factory.mktemp("diffusion_tiny")
    summary = script.main([
        "--out", str(out), "--steps", "3", "--train-limit", "128", "--batch-size", "8",
        "--eval-every", "0", "--eval-images", "10", "--eval-timesteps", "1",
        "--final-eval-timesteps", "1", "--log-every", "1", "--threads", "1",
    ])
    return script, out, summary


def test_diffusion_folder_layout(diffusion_run) -> None:
    _, out, summary = diffusion_run
    index = json.loads((out / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    assert index["tokenizer"] == ["transformers", "CLIPTokenizer"]
    assert index["scheduler"] == ["diffusers", "DDPMScheduler"]
    assert index["vae"] == [None, None]
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (out / "text_encoder" / "model.safetensors").is_file()
    assert summary["steps_done"] == 3
    assert summary["params"]["unet"] == 985_521
    # Seeded run on CPU: the first three losses are reproducible.
    assert summary["final_loss_mean_last_200"] == pytest.approx(1.1605, abs=1e-3)


def test_diffusion_folder_loads_and_scores(diffusion_run) -> None:
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    script, out, summary = diffusion_run
    unet = UNet2DConditionModel.from_pretrained(out, subfolder="unet")
    text_encoder = CLIPTextModel.from_pretrained(out, subfolder="text_encoder")
    tokenizer = CLIPTokenizer.from_pretrained(out, subfolder="tokenizer")
    scheduler = DDPMScheduler.from_pretrained(out, subfolder="scheduler")
    assert (unet.config.in_channels, unet.config.out_channels, unet.config.sample_size) == (1, 1, 28)
    assert scheduler.config.num_train_timesteps == 1000
    assert scheduler.config.prediction_type == "epsilon"
    assert tokenizer.model_max_length == 16

    import open_clip

    ids = tokenizer(["a photo of a sneaker."], padding="max_length", return_tensors="pt").input_ids
    reference = open_clip.tokenize(["a photo of a sneaker."], context_length=16)
    assert ids[0, :8].tolist() == reference[0, :8].tolist()
    with torch.no_grad():
        states = text_encoder(ids).last_hidden_state
        eps = unet(torch.zeros(1, 1, 28, 28), 500, encoder_hidden_states=states).sample
    assert states.shape == (1, 16, 64) and eps.shape == (1, 1, 28, 28)

    # The saved weights are the ones the training-time evaluation scored, on held-out train images.
    from clip_benchmark_diffusion_demo.fashion_mnist import to_unit_range, train_validation_split

    assert summary["config"]["val_per_class"] == 100
    *_, val_images, val_labels = train_validation_split(100)
    acc = script.evaluate(unet, text_encoder, tokenizer, scheduler, to_unit_range(val_images[:10]),
                          torch.from_numpy(val_labels[:10]), n_timesteps=1, full=False)
    assert acc["heldout"] == summary["curve"][-1]["heldout"]
    assert acc["train_template"] == summary["curve"][-1]["train_template"]


def test_clip_training_writes_an_open_clip_model(tmp_path, caplog) -> None:
    import open_clip
    from PIL import Image

    script = load_script("train_clip_tiny")
    summary = script.main([
        "--out", str(tmp_path), "--steps", "3", "--train-limit", "256", "--batch-size", "32",
        "--eval-every", "0", "--eval-images", "50", "--log-every", "1", "--threads", "1",
    ])
    assert summary["steps_done"] == 3
    assert "No pretrained weights" not in caplog.text      # training from scratch is not worth a warning

    open_clip.add_model_config(tmp_path / f"{script.MODEL_NAME}.json")
    model, _, preprocess = open_clip.create_model_and_transforms(
        script.MODEL_NAME, pretrained=str(tmp_path / script.WEIGHTS_NAME)
    )
    tokenizer = open_clip.get_tokenizer(script.MODEL_NAME)
    local_model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{tmp_path}")

    # clip_benchmark hands a grayscale PNG over as PIL RGB; the transform must match training's.
    from clip_benchmark_diffusion_demo.fashion_mnist import train_validation_split

    *_, images, labels = train_validation_split(100)  # the checks ran on held-out train images
    images, labels = images[:50], labels[:50]
    pp = model.visual.preprocess_cfg
    x = script.normalize_gray(torch.from_numpy(images), pp["mean"], pp["std"])
    assert torch.allclose(preprocess(Image.fromarray(images[3]).convert("RGB")), x[3], atol=1e-5)
    model.eval()
    local_model.eval()
    with torch.no_grad():
        assert torch.allclose(model.encode_image(x[:4]), local_model.encode_image(x[:4]))
    y = torch.from_numpy(labels)
    acc = script.zeroshot_accuracy(model, tokenizer, x, y, script.EVAL_TEMPLATES)
    assert acc == summary["curve"][-1]["heldout"]


def test_shipped_clip_tiny_reproduces_its_recorded_accuracy() -> None:
    import open_clip

    from clip_benchmark_diffusion_demo import CLIP_TINY_DIR, CLIP_TINY_NAME
    from clip_benchmark_diffusion_demo.fashion_mnist import demo_test_indices, load_split

    script = load_script("train_clip_tiny")
    summary = json.loads((CLIP_TINY_DIR / "training_summary.json").read_text())
    open_clip.add_model_config(CLIP_TINY_DIR / f"{CLIP_TINY_NAME}.json")
    model, _, _ = open_clip.create_model_and_transforms(
        CLIP_TINY_NAME, pretrained=str(CLIP_TINY_DIR / script.WEIGHTS_NAME)
    )
    images, labels = load_split("test")
    idx = demo_test_indices(labels)
    pp = model.visual.preprocess_cfg
    x = script.normalize_gray(torch.from_numpy(images[idx]), pp["mean"], pp["std"])
    tokenizer = open_clip.get_tokenizer(CLIP_TINY_NAME)
    y = torch.from_numpy(labels[idx])
    acc = script.zeroshot_accuracy(model, tokenizer, x, y, script.EVAL_TEMPLATES)
    assert acc == summary["curve"][-1]["heldout"] == pytest.approx(0.891)


def test_shipped_diffusion_tiny_classifies() -> None:
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from clip_benchmark_diffusion_demo import DIFFUSION_TINY_DIR as d
    from clip_benchmark_diffusion_demo.fashion_mnist import demo_test_indices, load_split, to_unit_range

    script = load_script("train_diffusion_tiny")
    images, labels = load_split("test")
    idx = demo_test_indices(labels)[:20]
    acc = script.evaluate(
        UNet2DConditionModel.from_pretrained(d, subfolder="unet"),
        CLIPTextModel.from_pretrained(d, subfolder="text_encoder"),
        CLIPTokenizer.from_pretrained(d, subfolder="tokenizer"),
        DDPMScheduler.from_pretrained(d, subfolder="scheduler"),
        to_unit_range(images[idx]), torch.from_numpy(labels[idx]), n_timesteps=3, full=False,
    )
    # 20 balanced images, 3 timesteps: a coarse pin that any broken weight or scoring change trips.
    assert acc == {"heldout": pytest.approx(0.8), "train_template": pytest.approx(0.8)}


@pytest.fixture(scope="module")
def flow_run(tmp_path_factory):
    script = load_script("train_flow_tiny")
    out = tmp_path_factory.mktemp("diffusion_tiny_flow")
    summary = script.main([
        "--out", str(out), "--steps", "3", "--train-limit", "128", "--batch-size", "8",
        "--eval-every", "0", "--eval-images", "10", "--eval-levels", "2",
        "--final-eval-levels", "1", "--log-every", "1", "--threads", "1",
    ])
    return script, out, summary


def test_flow_folder_has_the_sd3_layout(flow_run) -> None:
    script, out, summary = flow_run
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline"
    assert index["transformer"] == ["diffusers", "SD3Transformer2DModel"]
    assert index["text_encoder"] == index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
    assert index["tokenizer"] == index["tokenizer_2"] == ["transformers", "CLIPTokenizer"]
    assert index["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    assert index["vae"] == index["text_encoder_3"] == index["tokenizer_3"] == [None, None]
    weights = sorted(p.relative_to(out).as_posix() for p in out.rglob("*")
                     if p.suffix in (".safetensors", ".bin", ".pt", ".pth", ".ckpt"))
    assert weights == ["text_encoder/model.safetensors", "text_encoder_2/model.safetensors",
                       "transformer/diffusion_pytorch_model.safetensors"]
    assert summary["steps_done"] == 3
    assert summary["max_sequence_length"] == script.MAX_SEQ == 1
    assert summary["command"].startswith("python scripts/train_flow_tiny.py --out ")
    assert summary["params"]["transformer"] == 3_475_728
    # Seeded run on CPU: the first three losses are reproducible.
    assert summary["final_loss_mean_last_200"] == pytest.approx(1.8641, abs=1e-3)


def test_flow_folder_reloads_as_sd3_and_scores(flow_run) -> None:
    from diffusers import StableDiffusion3Pipeline

    script, out, summary = flow_run
    # Components marked null in model_index.json must be passed as None (diffusers' rule for SD3 without T5).
    pipe = StableDiffusion3Pipeline.from_pretrained(out, use_safetensors=True, vae=None,
                                                    text_encoder_3=None, tokenizer_3=None)
    tr = pipe.transformer.config
    assert (tr.in_channels, tr.out_channels, tr.sample_size, tr.patch_size) == (1, 1, 28, 4)
    assert tr.joint_attention_dim == 64 + 32 and tr.pooled_projection_dim == 64 + 32
    assert tr.caption_projection_dim == tr.num_attention_heads * tr.attention_head_dim
    assert pipe.scheduler.config.shift == 1.0 and pipe.scheduler.config.num_train_timesteps == 1000
    assert pipe.tokenizer_max_length == 16

    embeds, pooled = script.encode(pipe, ["a photo of a sneaker.", "bag"])
    # 16 CLIP tokens, then MAX_SEQ zero tokens standing in for T5; features CLIP-1 | CLIP-2.
    assert embeds.shape == (2, 16 + script.MAX_SEQ, 96) and pooled.shape == (2, 96)
    assert embeds[:, 16:].abs().max() == 0
    with torch.no_grad():
        v = pipe.transformer(hidden_states=torch.zeros(2, 1, 28, 28), timestep=torch.tensor([500.0, 500.0]),
                             encoder_hidden_states=embeds, pooled_projections=pooled).sample
    assert v.shape == (2, 1, 28, 28)

    # The saved weights are the ones the training-time check scored, on held-out train images.
    from clip_benchmark_diffusion_demo.fashion_mnist import to_unit_range, train_validation_split

    *_, val_images, val_labels = train_validation_split(100)
    acc = script.evaluate(pipe, to_unit_range(val_images[:10]), torch.from_numpy(val_labels[:10]),
                          n_levels=1, full=True)
    assert acc == {k: summary["final"][k] for k in ("heldout", "train_template")}


def test_flow_training_passes_gradients_through_encode_prompt() -> None:
    script = load_script("train_flow_tiny")
    pipe = script.build_pipeline(script.TrainConfig())
    embeds, pooled = script.encode(pipe, ["a coat", "a dress"])
    (embeds.square().sum() + pooled.square().sum()).backward()
    script._check_text_gradients(pipe)  # raises when a text encoder got no gradient
    assert pipe.text_encoder.text_model.embeddings.token_embedding.weight.grad.abs().sum() > 0
    assert pipe.text_encoder_2.text_projection.weight.grad.abs().sum() > 0


def test_flow_levels_follow_the_scheduler_shift() -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler

    script = load_script("train_flow_tiny")
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    u = torch.linspace(1.0, 0.001, 1000)  # the scheduler's unshifted sigmas
    assert torch.allclose(script.shift_levels(u, 3.0), sched.sigmas.float(), atol=1e-5)
    assert torch.allclose(script.level_grid(4, 1.0), torch.tensor([0.125, 0.375, 0.625, 0.875]))


def test_flow_script_refuses_an_unknown_density(capsys, tmp_path) -> None:
    script = load_script("train_flow_tiny")
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--out", str(tmp_path / "x"), "--s-density", "beta"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith("clip_benchmark_diffusion: --s-density must be one of")
    assert not (tmp_path / "x").exists()
