"""PixArt-alpha / PixArt-Sigma: a PixArtTransformer2DModel on masked T5, epsilon with learned sigma, VP schedule."""
from __future__ import annotations

from typing import Any

import torch

from clip_benchmark_diffusion.families.base import Family
from clip_benchmark_diffusion.options import ScoringOptions
from clip_benchmark_diffusion.scoring.engine import Conditioning, Levels


class PixArtAlphaFamily(Family):
    name = "pixart_alpha"
    pipeline = "PixArtAlphaPipeline"
    denoiser = "transformer"
    cuda_dtype = "bfloat16"   # T5-XXL overflows in float16
    required = ("transformer", "text_encoder", "tokenizer", "scheduler", "vae")
    default_max_sequence_length = 120
    sequence_encoders = ("text_encoder",)
    description = ("PixArt-alpha: PixArtTransformer2DModel on T5-XXL (120 tokens, masked); resolution and "
                   "aspect-ratio micro-conditions on the 1024-MS checkpoint; epsilon + learned sigma")

    def encode_prompts(self, pipe: Any, texts: list[str], device: torch.device,
                       options: ScoringOptions) -> Conditioning:
        # clean_caption=False: the prompt is scored as written (cleaning also needs bs4 + ftfy).
        embeds, mask, _, _ = pipe.encode_prompt(texts, do_classifier_free_guidance=False, device=device,
                                                clean_caption=False,
                                                max_sequence_length=self.max_sequence_length(options))
        return {"encoder_hidden_states": embeds, "encoder_attention_mask": mask}   # (P, L, D), (P, L)

    def micro_conditions(self, pipe: Any, x_t: torch.Tensor) -> dict[str, torch.Tensor | None]:
        """Image size and aspect ratio in pixels, only for models trained with them (alpha 1024-MS).

        The resolved attribute, not the config: the config keeps ``None`` when the flag was
        defaulted from ``sample_size == 128``.
        """
        if not pipe.transformer.use_additional_conditions:
            return {"resolution": None, "aspect_ratio": None}
        n, (height, width) = len(x_t), (d * self.vae_scale_factor(pipe) for d in x_t.shape[-2:])
        return {"resolution": torch.tensor([[height, width]], dtype=x_t.dtype, device=x_t.device).expand(n, 2),
                "aspect_ratio": torch.tensor([[height / width]], dtype=x_t.dtype, device=x_t.device).expand(n, 1)}

    def call_denoiser(self, pipe: Any, x_t: torch.Tensor, levels: Levels, cond: Conditioning,
                      options: ScoringOptions) -> torch.Tensor:
        return pipe.transformer(x_t, encoder_hidden_states=cond["encoder_hidden_states"],
                                encoder_attention_mask=cond["encoder_attention_mask"], timestep=levels.model_time,
                                added_cond_kwargs=self.micro_conditions(pipe, x_t)).sample   # (N, 2C, h, w)


class PixArtSigmaFamily(PixArtAlphaFamily):
    name = "pixart_sigma"
    pipeline = "PixArtSigmaPipeline"
    default_max_sequence_length = 300
    # Micro-conditions follow the model's own flag, as for alpha: released Sigma models have it off
    # (its pipeline always passes None, which a model with the flag on could not run).
    description = "PixArt-Sigma: PixArtTransformer2DModel on T5-XXL (300 tokens, masked); epsilon + learned sigma"
