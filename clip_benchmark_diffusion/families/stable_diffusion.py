"""Stable Diffusion 1.x / 2.x: a UNet2DConditionModel on one CLIP text encoder, epsilon or v prediction."""
from __future__ import annotations

from typing import Any

import torch

from clip_benchmark_diffusion.families.base import Family
from clip_benchmark_diffusion.options import ScoringOptions
from clip_benchmark_diffusion.scoring.engine import Conditioning, Levels


class StableDiffusionFamily(Family):
    name = "stable_diffusion"
    pipeline = "StableDiffusionPipeline"
    description = "SD 1.x/2.x: UNet2DConditionModel + one CLIP text encoder; epsilon or v prediction; VAE or pixels"

    def encode_prompts(self, pipe: Any, texts: list[str], device: torch.device,
                       options: ScoringOptions) -> Conditioning:
        embeds, _ = pipe.encode_prompt(texts, device, 1, False)                       # (P, 77, D)
        return {"encoder_hidden_states": embeds}

    def call_denoiser(self, pipe: Any, x_t: torch.Tensor, levels: Levels, cond: Conditioning,
                      options: ScoringOptions) -> torch.Tensor:
        return pipe.unet(x_t, levels.model_time, encoder_hidden_states=cond["encoder_hidden_states"]).sample
