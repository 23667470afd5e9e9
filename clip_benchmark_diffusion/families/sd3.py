"""SD3 / SD3.5: an MMDiT (SD3Transformer2DModel) on CLIP-L + bigG + T5, rectified flow."""
from __future__ import annotations

import math
from typing import Any

import torch

from clip_benchmark_diffusion.families.base import Family, TextSide
from clip_benchmark_diffusion.options import ScoringOptions
from clip_benchmark_diffusion.scoring.engine import Conditioning, Levels
from clip_benchmark_diffusion.scoring.timesteps import dynamic_shift


class SD3Family(Family):
    name = "sd3"
    classic_attention = False
    pipeline = "StableDiffusion3Pipeline"
    denoiser = "transformer"
    time = "flow"
    cuda_dtype = "bfloat16"
    text = (TextSide("tokenizer", "text_encoder"), TextSide("tokenizer_2", "text_encoder_2"),
            TextSide("tokenizer_3", "text_encoder_3"))
    required = ("transformer", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler")
    default_max_sequence_length = 256  # the pipeline's default; T5 padding is attended, so it matters
    description = ("SD3 / SD3.5: SD3Transformer2DModel; CLIP-L + bigG (hidden[-2], pooled) + T5-XXL; "
                   "rectified flow, timestep = sigma * 1000, the scheduler's shift")

    def encode_prompts(self, pipe: Any, texts: list[str], device: torch.device,
                       options: ScoringOptions) -> Conditioning:
        embeds, _, pooled, _ = pipe.encode_prompt(prompt=texts, prompt_2=None, prompt_3=None, device=device,
                                                  do_classifier_free_guidance=False,
                                                  max_sequence_length=self.max_sequence_length(options))
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}   # (P, 77 + L, D), (P, 2048)

    def flow_shift(self, pipe: Any, resolution: int | tuple[int, int]) -> float:
        """The scheduler's ``shift``; or, when its config asks for ``use_dynamic_shifting``, the shift
        the SD3 pipelines then use instead: mu linear in the image's token count (``calculate_shift``
        on the latent size over the patch size), e^mu for the "exponential" time shift, mu for "linear"."""
        cfg = pipe.scheduler.config
        if not cfg.get("use_dynamic_shifting", False):
            return float(cfg.get("shift", 1.0))
        h, w = resolution if isinstance(resolution, (list, tuple)) else (resolution, resolution)
        f, p = self.vae_scale_factor(pipe), int(self.denoiser_module(pipe).config.patch_size)
        tokens = (int(h) // f // p) * (int(w) // f // p)
        k = dynamic_shift(tokens, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                          cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.16))
        return math.log(k) if cfg.get("time_shift_type", "exponential") == "linear" else k

    def token_limits(self, pipe: Any, options: ScoringOptions) -> list[tuple[str, Any, int]]:
        out = []
        for side in self.text_sides(pipe):
            tok = getattr(pipe, side.tokenizer)
            limit = self.max_sequence_length(options) if side.encoder == "text_encoder_3" else pipe.tokenizer_max_length
            out.append((side.tokenizer, tok, int(limit)))
        return out

    def call_denoiser(self, pipe: Any, x_t: torch.Tensor, levels: Levels, cond: Conditioning,
                      options: ScoringOptions) -> torch.Tensor:
        return pipe.transformer(hidden_states=x_t, timestep=levels.model_time,
                                encoder_hidden_states=cond["encoder_hidden_states"],
                                pooled_projections=cond["pooled_projections"]).sample
