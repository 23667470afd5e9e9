"""SDXL base: a UNet with two CLIP text encoders, a pooled embedding and size conditioning."""
from __future__ import annotations

from typing import Any

import torch

from clip_benchmark_diffusion.families.base import Family, TextSide
from clip_benchmark_diffusion.options import ScoringOptions
from clip_benchmark_diffusion.scoring.engine import Conditioning, Levels


class SDXLFamily(Family):
    name = "sdxl"
    pipeline = "StableDiffusionXLPipeline"
    text = (TextSide("tokenizer", "text_encoder"), TextSide("tokenizer_2", "text_encoder_2"))
    required = ("unet", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler")
    description = ("SDXL: UNet2DConditionModel with text_time embedding; CLIP-L + OpenCLIP bigG (hidden[-2] "
                   "concatenated, pooled bigG), size ids; epsilon")

    def encode_prompts(self, pipe: Any, texts: list[str], device: torch.device,
                       options: ScoringOptions) -> Conditioning:
        embeds, _, pooled, _ = pipe.encode_prompt(texts, device=device, num_images_per_prompt=1,
                                                  do_classifier_free_guidance=False)  # (P, 77, 2048), (P, 1280)
        return {"encoder_hidden_states": embeds, "text_embeds": pooled}

    def time_ids(self, height: int, width: int, n: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """(original size, crop top-left, target size) at the scoring size, each (height, width) as the
        pipeline's ``_get_add_time_ids`` orders them: an uncropped image of exactly that size."""
        ids = torch.tensor([height, width, 0, 0, height, width], dtype=dtype, device=device)
        return ids.expand(n, 6)

    def call_denoiser(self, pipe: Any, x_t: torch.Tensor, levels: Levels, cond: Conditioning,
                      options: ScoringOptions) -> torch.Tensor:
        f = self.vae_scale_factor(pipe)
        ids = self.time_ids(x_t.shape[-2] * f, x_t.shape[-1] * f, len(x_t), x_t.device, x_t.dtype)
        added = {"text_embeds": cond["text_embeds"], "time_ids": ids}
        return pipe.unet(x_t, levels.model_time, encoder_hidden_states=cond["encoder_hidden_states"],
                         added_cond_kwargs=added).sample
