"""Every model family: a tiny random instance saved with save_pretrained, scored end to end by the
stock ``clip_benchmark eval`` command, the inputs its denoiser receives, and its refusals."""
from __future__ import annotations

import json

import pytest
import torch

from cli_helpers import assert_clean_failure, clip_benchmark_eval, quick_options
from clip_benchmark_diffusion.scoring.engine import Levels
from tiny_families import TINY_FAMILIES, save_tiny


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {name: save_tiny(name, root / name) for name in TINY_FAMILIES}


def load(folder, recipe: str, tmp_path, **options):
    """``(model, transform, tokenizer)`` through clip_benchmark's own loader, as the CLI loads it."""
    from clip_benchmark_diffusion.integration.clip_benchmark import ensure_installed

    ensure_installed()
    from clip_benchmark.models import load_clip

    opts = quick_options(tmp_path, **options)
    return load_clip("open_clip", f"{recipe}@{opts}", str(folder), None, "cpu")


@pytest.fixture(scope="module")
def imagenet_wds(tmp_path_factory):
    """The digits 0-9 under the names of ImageNet classes 0-9 (the tiny DiT's id2label), one capitalised."""
    from wds_data import write_digits_wds

    names = ["tench", "Goldfish", "great white shark", "tiger shark", "hammerhead shark", "electric ray",
             "stingray", "cock", "hen", "ostrich"]
    return write_digits_wds(tmp_path_factory.mktemp("wds") / "imagenet10", per_class=2, classes=names)


# The stock command end to end for four families by default (a UNet, SDXL's extra inputs, an MMDiT, FLUX's
# packing); the rest under -m slow: every family's denoiser path is also checked in-process against its own
# diffusers pipeline by tests/test_pipeline_parity*.py, at a fraction of a subprocess's cost.
FAST_STOCK_FAMILIES = ("stable_diffusion", "sdxl", "sd3", "flux_dev")


@pytest.mark.parametrize("name", [n if n in FAST_STOCK_FAMILIES else pytest.param(n, marks=pytest.mark.slow)
                                  for n in TINY_FAMILIES])
def test_stock_command_scores_every_family(name, tiny_folders, digits_wds, imagenet_wds, tmp_path):
    from clip_benchmark_diffusion.registry import get_family, get_recipe

    recipe = TINY_FAMILIES[name][0]
    # Class-conditional families (DiT) score ImageNet-named classes, with one conditioning per class.
    text = get_family(get_recipe(recipe).family).text_conditioned
    data, rows_per_class = (digits_wds, 2) if text else (imagenet_wds, 1)
    opts = quick_options(tmp_path, strategy="full", n_samples=[2])
    proc = clip_benchmark_eval(
        "--model", f"{recipe}@{opts}", "--pretrained", str(tiny_folders[name]), "--dataset", "wds/digits",
        "--dataset_root", str(data), "--batch_size", "20", "--output", str(tmp_path / "out.json"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "deprecated" not in proc.stderr, proc.stderr[-3000:]
    result = json.loads((tmp_path / "out.json").read_text())
    meta = result["diffusion_classifier"]
    assert meta["family"] == get_recipe(recipe).family
    assert meta["objective"] == ("flow" if meta["family"] in ("sd3", "flux", "sana") else "epsilon")
    assert meta["resolution"] == 16
    assert len(meta["noise_levels"]["log_snr"]) == 2
    assert result["metrics"]["denoiser_calls_per_image"] == 10 * rows_per_class * 2   # classes x templates x samples
    assert 0 <= result["metrics"]["acc1"] <= result["metrics"]["acc5"] <= 1


def _captured_call(model, images, texts_per_class):
    """Run one classification batch and capture the denoiser's keyword inputs."""
    seen: list[dict] = []
    denoiser = model.model.denoiser
    hook = denoiser.register_forward_pre_hook(lambda mod, args, kwargs: seen.append({"args": args, **kwargs}),
                                              with_kwargs=True)
    try:
        model.begin_task("zeroshot_classification")
        for prompts in texts_per_class:
            model.encode_text(model.tokenizer(prompts))
        model.encode_image(images)
    finally:
        hook.remove()
    return seen


def test_sdxl_denoiser_gets_pooled_text_and_size_ids(tiny_folders, tmp_path):
    model, transform, _ = load(tiny_folders["sdxl"], "diffusion_sdxl", tmp_path, strategy="full", n_samples=[2])
    seen = _captured_call(model, torch.zeros(1, 3, 16, 16), [["a photo of the number one."], ["a photo of the number two."]])
    added = seen[0]["added_cond_kwargs"]
    assert added["text_embeds"].shape == (4, 16)                          # 2 classes x 2 samples, pooled bigG
    assert added["time_ids"].tolist() == [[16, 16, 0, 0, 16, 16]] * 4    # uncropped square at 16 px
    assert seen[0]["encoder_hidden_states"].shape == (4, 16, 32)         # hidden[-2] of both encoders concatenated


def test_sd3_denoiser_gets_sigma_times_1000_and_pooled_projections(tiny_folders, tmp_path):
    model, _, _ = load(tiny_folders["sd3"], "diffusion_sd3", tmp_path, strategy="full", n_samples=[4],
                       max_sequence_length=8)
    seen = _captured_call(model, torch.zeros(1, 3, 16, 16), [["a photo of the number one."], ["a photo of the number two."]])
    call = seen[0]
    assert call["pooled_projections"].shape == (8, 32)                   # pooled CLIP-L || pooled bigG
    assert call["encoder_hidden_states"].shape == (8, 16 + 8, 32)        # 16 CLIP tokens, then 8 T5 tokens
    sigma = 3 * ((torch.arange(4) + 0.5) / 4) / (1 + 2 * ((torch.arange(4) + 0.5) / 4))   # shift 3 grid
    assert torch.allclose(torch.sort(call["timestep"].unique()).values, (1000 * sigma).float(), atol=1e-3)
    assert model.result_metadata("open_clip")["flow_shift"] == 3.0


def test_a_folder_of_another_family_is_refused_before_compute(tiny_folders, digits_wds, tmp_path):
    proc = clip_benchmark_eval("--model", "diffusion_sd2", "--pretrained", str(tiny_folders["sd3"]),
                               "--dataset", "wds/digits", "--dataset_root", str(digits_wds), cwd=tmp_path)
    assert_clean_failure(proc, "StableDiffusion3Pipeline (sd3 family)", "diffusion_sd3", cwd=tmp_path)


def test_a_class_name_cut_off_by_the_token_limit_is_refused(tiny_folders, tmp_path):
    from wds_data import write_digits_wds

    long = "a black and white low resolution photograph of a small handwritten thing, namely a {c}."
    data = write_digits_wds(tmp_path / "long", per_class=1, templates=[long])
    proc = clip_benchmark_eval("--model", f"diffusion_sd2@{quick_options(tmp_path)}", "--pretrained",
                               str(tiny_folders["stable_diffusion"]), "--dataset", "wds/digits",
                               "--dataset_root", str(data), cwd=tmp_path)
    assert_clean_failure(proc, "beyond the 16 tokens tokenizer reads", cwd=tmp_path)


# Scores of two real digits under the tiny SD model with a VAE (epsilon, 4 samples, full), and
# under the tiny SD3 model (flow, VAE shift and scale): dropping the VAE scaling factor, its
# shift, a sign of the flow conversion or the shift of the time grid changes these numbers.
# FLUX-dev adds packing, the resolution-dependent shift, sigma as timestep and the guidance input
# (dropping the VAE shift, the dynamic shift or guidance 3.5 fails it); IF adds pixel space, the
# cosine schedule and the learned-variance split (keeping the last 3 channels instead fails it).
PINNED = {
    "stable_diffusion": ("diffusion_sd2", [[1.17801166, 1.17751551, 1.17616177], [1.10267568, 1.10255325, 1.10250688]]),
    "sd3": ("diffusion_sd3", [[0.26992828, 0.27053934, 0.26943496], [0.25860104, 0.25935078, 0.25830236]]),
    "flux_dev": ("diffusion_flux_dev", [[0.32995784, 0.33053714, 0.32940644], [0.33447078, 0.33407936, 0.33429259]]),
    "if": ("diffusion_if", [[1.07598042, 1.07194006, 1.07688034], [1.05609775, 1.05676389, 1.06198871]]),
}


@pytest.mark.parametrize("name", list(PINNED))
def test_pinned_scores(name, tiny_folders, digits_wds, tmp_path):
    from clip_benchmark.datasets.builder import build_dataset

    recipe, expected = PINNED[name]
    model, transform, _ = load(tiny_folders[name], recipe, tmp_path, strategy="full", n_samples=[4],
                               max_sequence_length=8)
    ds = build_dataset(dataset_name="wds/digits", root=str(digits_wds), transform=transform, split="test")
    images = torch.stack([img for img, _ in list(ds)[:2]])
    model.begin_task("zeroshot_classification")
    for c in ("zero", "one", "two"):
        model.encode_text(model.tokenizer([f"a photo of the number {c}."]))
    model.encode_image(images)
    errors = torch.stack([r.outcome.mean_error for r in model.record.results])      # (2 images, 3 classes)
    # Dropping the VAE scaling factor moves these by 0.7% (SD) and 7.5% (SD3): far beyond the tolerance.
    assert torch.allclose(errors, torch.tensor(expected), rtol=2e-5, atol=0), errors.tolist()


TWO_DIGITS = [["a photo of the number one."], ["a photo of the number two."]]


def test_flux_denoiser_gets_packed_latents_ids_sigma_and_guidance(tiny_folders, tmp_path):
    from clip_benchmark_diffusion.scoring.timesteps import dynamic_shift, shift_sigma

    model, _, _ = load(tiny_folders["flux_dev"], "diffusion_flux_dev", tmp_path, strategy="full", n_samples=[4],
                       max_sequence_length=8, guidance=2.0)
    call = _captured_call(model, torch.zeros(1, 3, 16, 16), TWO_DIGITS)[0]
    assert call["hidden_states"].shape == (8, 16, 64)          # 16 px -> 8x8x16 latents -> (8/2)^2 tokens x 4*16
    rows, cols = torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij")
    assert torch.equal(call["img_ids"], torch.stack([torch.zeros(16), rows.flatten(), cols.flatten()], 1))
    assert torch.equal(call["txt_ids"], torch.zeros(8, 3))     # 2-D ids: (T5 tokens, 3)
    assert call["encoder_hidden_states"].shape == (8, 8, 32) and call["pooled_projections"].shape == (8, 16)
    assert torch.equal(call["guidance"], torch.full((8,), 2.0))
    # timestep = sigma in (0, 1) (x1000 inside), on the midpoint grid shifted by e^mu(16 tokens) ~ 1.58
    k = dynamic_shift(16, 256, 4096, 0.5, 1.15)
    sigma = shift_sigma((torch.arange(4) + 0.5) / 4, k)
    assert torch.allclose(torch.sort(call["timestep"].unique()).values, sigma.float(), atol=1e-6)
    assert model.result_metadata("open_clip")["flow_shift"] == pytest.approx(k)


def test_flux_schnell_gets_no_guidance_and_its_constant_shift(tiny_folders, tmp_path):
    model, _, _ = load(tiny_folders["flux_schnell"], "diffusion_flux_schnell", tmp_path, strategy="full",
                       n_samples=[4], max_sequence_length=8)
    call = _captured_call(model, torch.zeros(1, 3, 16, 16), TWO_DIGITS)[0]
    assert call["guidance"] is None
    assert torch.allclose(torch.sort(call["timestep"].unique()).values, (torch.arange(4) + 0.5) / 4)  # shift 1
    meta = model.result_metadata("open_clip")
    assert meta["flow_shift"] == 1.0 and meta["guidance"] is None


def test_flux_output_is_unpacked_to_the_latent_layout_it_was_packed_from(tiny_folders, tmp_path):
    model, _, _ = load(tiny_folders["flux_schnell"], "diffusion_flux_schnell", tmp_path, strategy="full", n_samples=[2])
    loaded = model.model
    # An identity transformer: the family's unpacked output must be x_t itself, element for element.
    hook = loaded.denoiser.register_forward_hook(
        lambda mod, args, kwargs, out: type(out)(sample=kwargs["hidden_states"]), with_kwargs=True)
    try:
        x_t = torch.randn(3, 16, 8, 8)
        levels = Levels(a=torch.full((3,), 0.5), b=torch.full((3,), 0.5), model_time=torch.full((3,), 0.5))
        cond = loaded.encode_prompts(["a photo of the number one."] * 3, model.options)
        out = loaded.family.call_denoiser(loaded.pipe, x_t, levels, cond, model.options)
    finally:
        hook.remove()
    assert torch.equal(out, x_t)


@pytest.mark.parametrize("name, micro", [("pixart_alpha", False), ("pixart_alpha_ms", True), ("pixart_sigma", False)])
def test_pixart_denoiser_gets_t5_mask_and_micro_conditions_only_when_trained_with_them(name, micro, tiny_folders,
                                                                                       tmp_path):
    recipe = TINY_FAMILIES[name][0]
    model, _, _ = load(tiny_folders[name], recipe, tmp_path, strategy="full", n_samples=[2], max_sequence_length=12)
    call = _captured_call(model, torch.zeros(1, 3, 16, 16), TWO_DIGITS)[0]
    mask = call["encoder_attention_mask"]
    assert call["encoder_hidden_states"].shape == (4, 12, 32) and mask.shape == (4, 12)
    assert mask[:, :8].eq(1).all() and mask[:, 8:].eq(0).all()   # "a photo of the number one ." + </s>, padding
    assert sorted(call["timestep"].unique().tolist()) == [250.0, 750.0]    # Li et al.'s uniform grid, n = 2
    added = call["added_cond_kwargs"]
    if micro:
        assert added["resolution"].tolist() == [[16.0, 16.0]] * 4 and added["aspect_ratio"].tolist() == [[1.0]] * 4
    else:
        assert added == {"resolution": None, "aspect_ratio": None}


def test_pixart_default_token_limits_are_the_pipelines(tiny_folders, tmp_path):
    for name, limit in (("pixart_alpha", 120), ("pixart_sigma", 300)):
        model, _, _ = load(tiny_folders[name], TINY_FAMILIES[name][0], tmp_path)
        assert [lim for _, _, lim in model.model.token_limits(model.options)] == [limit]


def test_sana_denoiser_gets_dc_ae_latents_gemma_mask_and_scaled_sigma(tiny_folders, tmp_path):
    from clip_benchmark_diffusion.scoring.timesteps import shift_sigma

    model, _, _ = load(tiny_folders["sana"], "diffusion_sana", tmp_path, strategy="full", n_samples=[4],
                       max_sequence_length=10)
    loaded = model.model
    images = torch.rand(1, 3, 16, 16) * 2 - 1
    x0 = loaded.encode_images(images)
    assert torch.equal(x0, loaded.vae.encode(images).latent * 0.41407)        # no posterior, no shift
    call = _captured_call(model, images, TWO_DIGITS)[0]
    assert call["args"][0].shape == (8, 8, 8, 8)                                # 16 px / 2 -> 8x8, 8 channels
    assert call["encoder_hidden_states"].shape == (8, 10, 32)
    assert call["encoder_attention_mask"][0].tolist() == [1] * 8 + [0] * 2       # <bos> + 7 words, right padding
    sigma = shift_sigma((torch.arange(4) + 0.5) / 4, 3.0)                      # the scheduler's flow_shift
    scale = 1000 * loaded.denoiser.config.timestep_scale
    assert torch.allclose(torch.sort(call["timestep"].unique()).values, (scale * sigma).float(), atol=1e-3)


def test_if_denoiser_gets_pixels_and_77_t5_tokens_without_a_mask(tiny_folders, tmp_path):
    model, _, _ = load(tiny_folders["if"], "diffusion_if", tmp_path, strategy="full", n_samples=[2])
    images = torch.rand(1, 3, 16, 16) * 2 - 1
    assert torch.equal(model.model.encode_images(images), images)              # pixel space: no VAE
    call = _captured_call(model, images, TWO_DIGITS)[0]
    assert call["args"][0].shape == (4, 3, 16, 16)
    assert call["encoder_hidden_states"].shape == (4, 77, 32)                  # max_length 77, hard-coded by IF
    assert call.get("encoder_attention_mask") is None and call.get("attention_mask") is None
    assert [lim for _, _, lim in model.model.token_limits(model.options)] == [77]


@pytest.mark.parametrize("weighting", ["uniform", "elbo", "native", "exp7"])
def test_if_cosine_schedule_at_alpha_bar_1e_9_stays_finite_under_every_weighting(weighting, tiny_folders, tmp_path):
    from clip_benchmark_diffusion.scoring import math as smath

    model, _, _ = load(tiny_folders["if"], "diffusion_if", tmp_path, strategy="full", n_samples=[2],
                       weighting=weighting)
    loaded = model.model
    grid = loaded.grid(1000, model.options)          # every training step (uniform), or the ELBO's 1000 levels
    k = int(grid.a.argmin())
    if weighting != "elbo":
        assert grid.a[k] ** 2 < 1e-8                   # alpha_bar(999) = 2.4e-9: lam = -19.8
    weight, scale = smath.sample_weighting(grid, weighting, loaded.objective)
    x0 = torch.rand(1, 3, 16, 16) * 2 - 1
    eps = torch.randn(1, 3, 16, 16)
    levels = Levels(a=grid.a[k:k + 1].float(), b=grid.b[k:k + 1].float(), model_time=grid.model_time[k:k + 1].float())
    cond = loaded.encode_prompts(["a photo of the number one."], model.options)
    eps_hat = loaded.denoise(smath.add_noise(x0, eps, levels.a, levels.b), levels, cond, model.options)
    err = smath.sample_error(eps, eps_hat, "l2", None if scale is None else scale[k:k + 1]) * weight[k]
    plain = smath.sample_error(eps, eps_hat, "l2")
    assert torch.isfinite(err).all() and torch.isfinite(weight).all()
    assert err.item() <= plain.item() * float(torch.exp(torch.tensor(10.0))) * 1.0001   # lam clamped at -10


def test_dit_denoiser_gets_imagenet_label_ids_and_no_text(tiny_folders, tmp_path):
    model, _, _ = load(tiny_folders["dit"], "diffusion_dit", tmp_path, strategy="full", n_samples=[2])
    seen: list[dict] = []
    hook = model.model.denoiser.register_forward_pre_hook(lambda m, a, kw: seen.append(kw), with_kwargs=True)
    try:
        model.begin_task("zeroshot_classification", classnames=["Goldfish", "ostrich", "tench"])
        for c in ("Goldfish", "ostrich", "tench"):                        # clip_benchmark still encodes prompts
            model.encode_text(model.tokenizer([f"a photo of a {c}."]))
        model.encode_image(torch.zeros(1, 3, 16, 16))
    finally:
        hook.remove()
    assert sorted(seen[0]["class_labels"].tolist()) == [0, 0, 1, 1, 9, 9]     # 3 classes x 2 samples
    assert "encoder_hidden_states" not in seen[0]


def test_dit_refuses_a_dataset_of_non_imagenet_classes_before_compute(tiny_folders, digits_wds, tmp_path):
    proc = clip_benchmark_eval("--model", f"diffusion_dit@{quick_options(tmp_path)}", "--pretrained",
                               str(tiny_folders["dit"]), "--dataset", "wds/digits", "--dataset_root", str(digits_wds),
                               cwd=tmp_path)
    last = assert_clean_failure(proc, "serves only ImageNet-class datasets", "10 of 10", "'zero', 'one'", cwd=tmp_path)
    assert "diffusion scoring" not in proc.stderr                              # refused before the first image
    assert len(last) < 400


def test_dit_maps_clip_benchmarks_imagenet_names_by_position():
    """clip_benchmark's imagenet1k names ("rooster", two "sunglasses") are in label order: class g is id g."""
    import types
    from importlib import resources

    from clip_benchmark_diffusion.errors import UserError
    from clip_benchmark_diffusion.registry import get_family

    names = json.loads(resources.files("clip_benchmark.datasets").joinpath("en_classnames.json").read_text())["imagenet1k"]
    dit = get_family("dit")
    full = types.SimpleNamespace(labels={f"synonym {i}": i for i in range(1000)})    # a 1000-class model
    assert torch.equal(dit.encode_classes(full, names)["class_labels"], torch.arange(1000))
    with pytest.raises(UserError, match="1000 of 1000 class names"):                  # out of order: by name only
        dit.encode_classes(full, names[::-1])


def test_more_samples_than_training_timesteps_is_refused_before_loading(tiny_folders, digits_wds, tmp_path):
    opts = quick_options(tmp_path, strategy="full", n_samples=[1001])
    proc = clip_benchmark_eval("--model", f"diffusion_sd2@{opts}", "--pretrained", str(tiny_folders["stable_diffusion"]),
                               "--dataset", "wds/digits", "--dataset_root", str(digits_wds), cwd=tmp_path)
    assert_clean_failure(proc, "only 1000 training timesteps", cwd=tmp_path)


def test_a_non_square_model_sees_the_whole_image(tmp_path):
    """A UNet with sample_size (h, w) (the two-garment scenes are 28 x 56) is fed the image resized to
    exactly that shape, not centre-cropped to a square that would cut half of it off."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from PIL import Image

    from tiny_models import tiny_components

    torch.manual_seed(0)
    parts = tiny_components()
    parts["unet"] = UNet2DConditionModel(**{**parts["unet"].config, "sample_size": (8, 16)})
    StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(tmp_path / "wide")
    model, transform, _ = load(tmp_path / "wide", "diffusion_sd2", tmp_path, strategy="full", n_samples=[1])
    image = transform(Image.new("RGB", (56, 28), "white"))
    assert image.shape == (3, 16, 32)
    assert model.result_metadata("open_clip")["resolution"] == (16, 32)
    model.begin_task("zeroshot_classification")
    for c in ("one", "two"):
        model.encode_text(model.tokenizer([f"a photo of the number {c}."]))
    assert model.encode_image(image[None]).shape[0] == 1


def _size_rule(name: str, folder):
    from clip_benchmark_diffusion.registry import get_family, get_recipe
    from clip_benchmark_diffusion.weights import WeightsSource, read_config

    family = get_family(get_recipe(TINY_FAMILIES[name][0]).family)
    source = WeightsSource(str(folder), local=True)
    return family.size_rule(read_config(source, "model_index.json"), read_config(source, "vae/config.json"),
                            read_config(source, f"{family.denoiser}/config.json"))


@pytest.mark.parametrize("name", list(TINY_FAMILIES))
def test_every_family_scores_the_sizes_its_configs_allow(name, tiny_folders, digits_wds, imagenet_wds, tmp_path,
                                                         inproc):
    """The size rule read from the configs (no weights) agrees with the loaded model: the next allowed
    side above the native one scores through the stock command (an odd latent side for the UNets
    that forward skip sizes, e.g. 18 px = 9 latents for the tiny SD)."""
    from clip_benchmark_diffusion.registry import get_family, get_recipe

    rule = _size_rule(name, tiny_folders[name])
    assert rule is not None
    rule.check(16)                                           # every tiny model's native size
    expected = {"sd3": 4, "flux_dev": 4, "stable_diffusion": 2, "if": 2, "sd3_pixels": 2, "pixart_alpha": 4,
                "dit": 4, "sana": 2}
    assert rule.multiple == expected.get(name, rule.multiple), rule
    recipe = TINY_FAMILIES[name][0]
    data = digits_wds if get_family(get_recipe(recipe).family).text_conditioned else imagenet_wds
    opts = quick_options(tmp_path, strategy="full", n_samples=[1], resolution=16 + rule.multiple)
    proc = inproc("--model", f"{recipe}@{opts}", "--pretrained", str(tiny_folders[name]), "--dataset", "wds/digits",
                  "--dataset_root", str(data), "--output", str(tmp_path / "out.json"), cwd=tmp_path,
                  env={"CLIP_BENCHMARK_DIFFUSION_STORE": "off"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "out.json").read_text())["diffusion_classifier"]["resolution"] == 16 + rule.multiple


@pytest.mark.parametrize("name, resolution, needle", [
    ("sd3", 18, "multiples of 4 px (the VAE's 2x downsampling times 2x2 latent patches) and at least 4 px; "
                "use 16 or 20"),
    ("flux_dev", 18, "2x2 packed latents) and at least 4 px; use 16 or 20"),
    ("stable_diffusion", 17, "multiples of 2 px (the VAE's 2x downsampling) and at least 4 px; use 16 or 18"),
    ("stable_diffusion", 2, "use 4"),
    ("if", 3, "multiples of 2 px (the UNet's 2x downsampling) and at least 2 px; use 2 or 4"),
], ids=["sd3 18 px", "flux 18 px", "sd 17 px", "sd 2 px", "pixel unet 3 px"])
def test_a_resolution_the_model_cannot_take_is_one_line_before_loading(name, resolution, needle, tiny_folders,
                                                                       digits_wds, tmp_path, inproc):
    opts = quick_options(tmp_path, resolution=resolution)
    proc = inproc("--model", f"{TINY_FAMILIES[name][0]}@{opts}", "--pretrained", str(tiny_folders[name]),
                  "--dataset", "wds/digits", "--dataset_root", str(digits_wds), "--output", "digits.json",
                  cwd=tmp_path)
    assert_clean_failure(proc, f"resolution={resolution} cannot be scored by this model", needle, cwd=tmp_path)
    assert "Running" not in proc.stdout


def test_a_t5_with_padding_rows_beyond_its_tokenizer_scores(tmp_path, digits_wds, inproc):
    """Embedding tables padded past the tokenizer (T5's 32128 rows for 32100 tokens, fine-tunes padded
    further) are valid: a size heuristic refused this folder as 'tokenizer files are missing'."""
    from transformers import T5Config, T5EncoderModel

    from tiny_families import WORDS, sd3_pipeline

    torch.manual_seed(0)
    pipe = sd3_pipeline()
    cfg = T5Config(vocab_size=4 * (len(WORDS) + 3), d_model=32, d_kv=4, d_ff=32, num_layers=2, num_heads=4,
                   feed_forward_proj="gated-gelu", is_encoder_decoder=False, pad_token_id=0, eos_token_id=1)
    pipe.register_modules(text_encoder_3=T5EncoderModel(cfg))      # 3 of every 4 rows never indexed
    pipe.save_pretrained(tmp_path / "padded", safe_serialization=True)
    opts = quick_options(tmp_path, strategy="full", n_samples=[1])
    proc = inproc("--model", f"diffusion_sd3@{opts}", "--pretrained", str(tmp_path / "padded"), "--dataset",
                  "wds/digits", "--dataset_root", str(digits_wds), "--output", str(tmp_path / "out.json"),
                  cwd=tmp_path, env={"CLIP_BENCHMARK_DIFFUSION_STORE": "off"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "out.json").read_text())["metrics"]["acc1"] >= 0


def test_a_tokenizer_of_another_model_is_refused_before_any_image(tiny_folders, digits_wds, tmp_path, inproc):
    """SD3's T5 tokenizer replaced by a CLIP one: ids past the T5 table (an IndexError mid-run before;
    a larger tokenizer than the table, so no size rule refused it)."""
    import shutil

    from tiny_families import clip_tokenizer

    folder = shutil.copytree(tiny_folders["sd3"], tmp_path / "sd3")
    shutil.rmtree(folder / "tokenizer_3")
    clip_tokenizer().save_pretrained(folder / "tokenizer_3")
    proc = inproc("--model", f"diffusion_sd3@{quick_options(tmp_path)}", "--pretrained", str(folder), "--dataset",
                  "wds/digits", "--dataset_root", str(digits_wds), "--output", "digits.json", cwd=tmp_path)
    assert_clean_failure(proc, "tokenizer_3 does not fit text_encoder_3", "beyond the 21 embeddings",
                         "tokenizer files are missing or do not belong to this model", cwd=tmp_path)


# The families whose attention diffusers also writes in the classic form (AttnProcessor: baddbmm,
# softmax, bmm); SD3's joint attention, FLUX's and Sana's exist only as SDPA processors.
CLASSIC_ATTENTION = {"stable_diffusion", "sdxl", "pixart_alpha", "pixart_alpha_ms", "pixart_sigma", "if", "dit"}


@pytest.mark.parametrize("name", list(TINY_FAMILIES))
def test_classic_attention_scores_as_sdpa_where_diffusers_has_it_and_is_refused_elsewhere(name, tiny_folders, tmp_path):
    """attention=classic against diffusers' own SDPA processors as the oracle: the same errors in float32
    (two implementations of one attention), a different store key, and sdpa put back exactly."""
    from clip_benchmark_diffusion.errors import UserError
    from clip_benchmark_diffusion.families.fast_path import attention_modules, set_attention
    from clip_benchmark_diffusion.registry import get_family, get_recipe

    recipe = TINY_FAMILIES[name][0]
    family = get_family(get_recipe(recipe).family)
    assert family.classic_attention == (name in CLASSIC_ATTENTION)   # the flag the run plan checks before loading
    model, _, _ = load(tiny_folders[name], recipe, tmp_path, strategy="full", n_samples=[3])
    denoiser = model.model.denoiser
    sdpa_processors = {k: m.processor for k, m in attention_modules(denoiser).items()}
    if name not in CLASSIC_ATTENTION:
        with pytest.raises(UserError, match=rf"attention=classic: the {family.name} family's attention has no classic "
                                            r"form in diffusers \(only SDPA processors\); use attention=sdpa"):
            model.set_options(model.options.replace(attention="classic"))
        assert model.options.attention == "sdpa"                     # the refused options were not taken
        with pytest.raises(UserError, match=r"this denoiser's attention \((Joint|Flux|Sana).+\) has no classic form"):
            set_attention(denoiser, "classic")                         # the loaded processors, checked again
        assert {k: m.processor for k, m in attention_modules(denoiser).items()} == sdpa_processors
        return
    names = ["one", "two"] if family.text_conditioned else ["tench", "Goldfish"]
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1

    def errors() -> torch.Tensor:
        model.begin_task("zeroshot_classification", classnames=names, templates=["a photo of the {c}."])
        for c in names:
            model.encode_text(model.tokenizer([f"a photo of the {c}."]))
        model.encode_image(images)
        return torch.stack([r.outcome.mean_error for r in model.record.results])

    sdpa = errors()
    key = model.options.fingerprint_dict()
    model.set_options(model.options.replace(attention="classic"))
    assert {type(m.processor).__name__ for m in attention_modules(denoiser).values()} <= {"AttnProcessor",
                                                                                       "AttnAddedKVProcessor"}
    assert model.result_metadata("open_clip")["fast_path"]["attention"] == "classic"
    assert model.options.fingerprint_dict()["attention"] == "classic" and "attention" not in key
    classic = errors()
    assert torch.allclose(classic, sdpa, rtol=1e-5, atol=1e-7) and not torch.isnan(sdpa).any()
    model.set_options(model.options.replace(attention="sdpa"))
    assert {k: m.processor for k, m in attention_modules(denoiser).items()} == sdpa_processors
    assert torch.equal(errors(), sdpa)
