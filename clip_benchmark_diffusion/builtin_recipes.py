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
    register(Recipe(
        name="diffusion_flux_dev",
        family="flux",
        default_weights="black-forest-labs/FLUX.1-dev",
        description="FLUX.1-dev: 12B guidance-distilled rectified-flow transformer (guidance option, default 3.5), "
                    "resolution-dependent shift, 1024 px",
        weights_tags={"flux-dev": "black-forest-labs/FLUX.1-dev"},
        resolution=1024,
    ))
    register(Recipe(
        name="diffusion_flux_schnell",
        family="flux",
        default_weights="black-forest-labs/FLUX.1-schnell",
        description="FLUX.1-schnell: timestep-distilled FLUX (no guidance input, shift 1), 1024 px",
        weights_tags={"flux-schnell": "black-forest-labs/FLUX.1-schnell"},
        resolution=1024,
    ))
    register(Recipe(
        name="diffusion_pixart_alpha",
        family="pixart_alpha",
        default_weights="PixArt-alpha/PixArt-XL-2-512x512",
        description="PixArt-alpha XL-2: T5-conditioned DiT, epsilon + learned sigma, 512 px (tag 1024-MS: "
                    "1024 px with size micro-conditions)",
        weights_tags={"pixart-alpha-512": "PixArt-alpha/PixArt-XL-2-512x512",
                      "pixart-alpha-1024-ms": "PixArt-alpha/PixArt-XL-2-1024-MS"},
        prediction_type="epsilon",
        resolution=512,
    ))
    register(Recipe(
        name="diffusion_pixart_sigma",
        family="pixart_sigma",
        default_weights="PixArt-alpha/PixArt-Sigma-XL-2-1024-MS",
        description="PixArt-Sigma XL-2: T5 (300 tokens), SDXL VAE, epsilon + learned sigma, 1024 px",
        weights_tags={"pixart-sigma-1024-ms": "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS",
                      "pixart-sigma-512": "PixArt-alpha/PixArt-Sigma-XL-2-512-MS"},
        prediction_type="epsilon",
        resolution=1024,
    ))
    register(Recipe(
        name="diffusion_sana",
        family="sana",
        default_weights="Efficient-Large-Model/Sana_1600M_1024px_diffusers",
        description="Sana 1.6B: linear-attention DiT on Gemma-2, DC-AE (32x), rectified flow (flow_shift 3), 1024 px",
        weights_tags={"sana-1600m": "Efficient-Large-Model/Sana_1600M_1024px_diffusers",
                      "sana-600m": "Efficient-Large-Model/Sana_600M_1024px_diffusers"},
        resolution=1024,
    ))
    register(Recipe(
        name="diffusion_if",
        family="if",
        default_weights="DeepFloyd/IF-I-XL-v1.0",
        description="DeepFloyd IF stage I XL: pixel-space 64 px UNet on T5-XXL, cosine schedule, epsilon "
                    "(Imagen-style; gated licence)",
        weights_tags={"if-i-xl": "DeepFloyd/IF-I-XL-v1.0", "if-i-l": "DeepFloyd/IF-I-L-v1.0",
                      "if-i-m": "DeepFloyd/IF-I-M-v1.0"},
        prediction_type="epsilon",
        resolution=64,
    ))
    register(Recipe(
        name="diffusion_dit",
        family="dit",
        default_weights="facebook/DiT-XL-2-256",
        description="DiT-XL/2: class-conditional ImageNet model (ImageNet-class datasets only), epsilon, 256 px "
                    "(tag dit-512: Li et al.'s 79.1% model)",
        weights_tags={"dit-256": "facebook/DiT-XL-2-256", "dit-512": "facebook/DiT-XL-2-512"},
        prediction_type="epsilon",
        resolution=256,
    ))
