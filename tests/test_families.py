"""Every model family: a tiny random instance saved with save_pretrained, scored end to end by the
stock ``clip_benchmark eval`` command, the inputs its denoiser receives, and its refusals."""
from __future__ import annotations

import json

import pytest
import torch

from cli_helpers import assert_clean_failure, clip_benchmark_eval, quick_options
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


@pytest.mark.parametrize("name", list(TINY_FAMILIES))
def test_stock_command_scores_every_family(name, tiny_folders, digits_wds, tmp_path):
    recipe = TINY_FAMILIES[name][0]
    opts = quick_options(tmp_path, strategy="full", n_samples=[2])
    proc = clip_benchmark_eval(
        "--model", f"{recipe}@{opts}", "--pretrained", str(tiny_folders[name]), "--dataset", "wds/digits",
        "--dataset_root", str(digits_wds), "--batch_size", "20", "--output", str(tmp_path / "out.json"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "deprecated" not in proc.stderr, proc.stderr[-3000:]
    result = json.loads((tmp_path / "out.json").read_text())
    meta = result["diffusion_classifier"]
    from clip_benchmark_diffusion.registry import get_recipe

    assert meta["family"] == get_recipe(recipe).family
    assert meta["objective"] == ("flow" if meta["family"] in ("sd3", "flux", "sana") else "epsilon")
    assert meta["resolution"] == 16
    assert len(meta["noise_levels"]["log_snr"]) == 2
    assert result["metrics"]["denoiser_calls_per_image"] == 10 * 2 * 2     # classes x templates x samples
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
PINNED = {
    "stable_diffusion": ("diffusion_sd2", [[1.17801166, 1.17751551, 1.17616177], [1.10267568, 1.10255325, 1.10250688]]),
    "sd3": ("diffusion_sd3", [[0.26992828, 0.27053934, 0.26943496], [0.25860104, 0.25935078, 0.25830236]]),
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


def test_more_samples_than_training_timesteps_is_refused_before_loading(tiny_folders, digits_wds, tmp_path):
    opts = quick_options(tmp_path, strategy="full", n_samples=[1001])
    proc = clip_benchmark_eval("--model", f"diffusion_sd2@{opts}", "--pretrained", str(tiny_folders["stable_diffusion"]),
                               "--dataset", "wds/digits", "--dataset_root", str(digits_wds), cwd=tmp_path)
    assert_clean_failure(proc, "only 1000 training timesteps", cwd=tmp_path)
