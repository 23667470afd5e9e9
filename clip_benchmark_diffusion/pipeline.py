"""Load the parts of a text-to-image diffusers pipeline that scoring needs, safely.

Only safetensors weights are read (no pickle), no remote code runs, and the scheduler is read
for its noise schedule alone. A pipeline without a VAE is a pixel-space model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from clip_benchmark_diffusion.errors import UserError
from clip_benchmark_diffusion.scoring.engine import Schedule
from clip_benchmark_diffusion.weights import WeightsSource, model_index


@dataclass
class Components:
    unet: Any
    vae: Any | None
    text_encoder: Any
    tokenizer: Any
    schedule: Schedule

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1) if self.vae is not None else 1

    @property
    def resolution(self) -> int:
        """Image side the model was trained at, as diffusers computes it."""
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    @property
    def image_channels(self) -> int:
        return int(self.vae.config.in_channels) if self.vae is not None else int(self.unet.config.in_channels)

    @property
    def latent_scale(self) -> float:
        return float(self.vae.config.scaling_factor) if self.vae is not None else 1.0


def load_components(source: WeightsSource, dtype: torch.dtype, cache_dir: str | None = None,
                    expected_prediction: str | None = None) -> Components:
    """Load UNet, optional VAE, text encoder, tokenizer and noise schedule from ``source``."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    kw = dict(cache_dir=cache_dir)
    index = model_index(source)
    try:
        unet = UNet2DConditionModel.from_pretrained(source.location, subfolder="unet", torch_dtype=dtype,
                                                    use_safetensors=True, **kw)
        has_vae = isinstance(index.get("vae"), list) and index["vae"][0]
        vae = (AutoencoderKL.from_pretrained(source.location, subfolder="vae", torch_dtype=torch.float32,
                                             use_safetensors=True, **kw) if has_vae else None)
        text_encoder = CLIPTextModel.from_pretrained(source.location, subfolder="text_encoder", torch_dtype=dtype,
                                                     use_safetensors=True, **kw)
        tokenizer = CLIPTokenizer.from_pretrained(source.location, subfolder="tokenizer", **kw)
        scheduler = DDPMScheduler.from_pretrained(source.location, subfolder="scheduler", **kw)
    except (OSError, ValueError, RuntimeError, EnvironmentError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"could not load the weights from {source.location!r}: {first} "
                        "(corrupted, incomplete, non-safetensors, or not downloadable offline)") from None
    prediction = scheduler.config.prediction_type
    if expected_prediction and prediction != expected_prediction:
        raise UserError(f"{source.location!r} is a {prediction} model but the recipe expects "
                        f"{expected_prediction}; pick the matching recipe (see list-models)")
    schedule = Schedule(alphas_cumprod=scheduler.alphas_cumprod.to(torch.float64), prediction_type=prediction)
    return Components(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, schedule=schedule)
