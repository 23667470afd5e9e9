"""The built-in recipes: a plugin like any other."""
from __future__ import annotations

from typing import Callable

from clip_benchmark_diffusion.hookspecs import hookimpl
from clip_benchmark_diffusion.registry import Recipe


@hookimpl
def register_models(register: Callable[[Recipe], None]) -> None:
    register(Recipe(
        name="diffusion_sd2",
        family="stable_diffusion",
        default_weights="stabilityai/stable-diffusion-2-base",
        description="Stable Diffusion 2.x base: epsilon prediction, 512 px (Li et al.'s SD 2.0 setting)",
        weights_tags={"sd2-base": "stabilityai/stable-diffusion-2-base",
                      "sd21-base": "stabilityai/stable-diffusion-2-1-base"},
        prediction_type="epsilon",
        resolution=512,
    ))
    register(Recipe(
        name="diffusion_sd2_768",
        family="stable_diffusion",
        default_weights="stabilityai/stable-diffusion-2",
        description="Stable Diffusion 2.x: v-prediction, 768 px",
        weights_tags={"sd2": "stabilityai/stable-diffusion-2",
                      "sd21": "stabilityai/stable-diffusion-2-1"},
        prediction_type="v_prediction",
        resolution=768,
    ))
    register(Recipe(
        name="diffusion_sd15",
        family="stable_diffusion",
        default_weights="stable-diffusion-v1-5/stable-diffusion-v1-5",
        description="Stable Diffusion 1.5: epsilon prediction, 512 px",
        weights_tags={"sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5",
                      "sd14": "CompVis/stable-diffusion-v1-4"},
        prediction_type="epsilon",
        resolution=512,
    ))
    register(Recipe(
        name="diffusion_tiny",
        family="stable_diffusion",
        default_weights="demo:diffusion_tiny",
        description="The embedded demo: a pixel-space diffusion model trained here on Fashion-MNIST",
        resolution=28,
        # From scripts/benchmark_strategies.py on this model: t-test elimination after 10 samples
        # and one conditioning per class (mean prompt embedding) keep full evaluation's accuracy
        # at a fraction of its calls.
        scoring={"strategy": "ttest", "min_samples": 10, "max_samples": 50, "template_ensemble": "embedding_mean",
                 "batch_size": 200},
    ))
    register(Recipe(
        name="diffusion_sdxl",
        family="sdxl",
        default_weights="stabilityai/stable-diffusion-xl-base-1.0",
        description="SDXL base 1.0: two CLIP text encoders, pooled embedding and size ids; epsilon, 1024 px",
        weights_tags={"sdxl-base": "stabilityai/stable-diffusion-xl-base-1.0"},
        prediction_type="epsilon",
        resolution=1024,
    ))
    register(Recipe(
        name="diffusion_sd3",
        family="sd3",
        default_weights="stabilityai/stable-diffusion-3-medium-diffusers",
        description="SD3 medium: MMDiT on CLIP-L + bigG + T5-XXL, rectified flow (shift 3), 1024 px",
        weights_tags={"sd3-medium": "stabilityai/stable-diffusion-3-medium-diffusers"},
        resolution=1024,
    ))
    register(Recipe(
        name="diffusion_sd35_medium",
        family="sd3",
        default_weights="stabilityai/stable-diffusion-3.5-medium",
        description="SD3.5 medium: MMDiT-X (dual attention, QK norm), rectified flow, 1024 px",
        weights_tags={"sd35-medium": "stabilityai/stable-diffusion-3.5-medium"},
        resolution=1024,
    ))
    register(Recipe(
        name="diffusion_sd35_large",
        family="sd3",
        default_weights="stabilityai/stable-diffusion-3.5-large",
        description="SD3.5 large: 8B MMDiT with QK norm, rectified flow, 1024 px (turbo: timestep-distilled)",
        weights_tags={"sd35-large": "stabilityai/stable-diffusion-3.5-large",
                      "sd35-large-turbo": "stabilityai/stable-diffusion-3.5-large-turbo"},
        resolution=1024,
    ))
