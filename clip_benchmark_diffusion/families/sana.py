"""Sana: a linear-attention SanaTransformer2DModel on masked Gemma-2, DC-AE latents, rectified flow."""
from __future__ import annotations

from typing import Any

import torch

from clip_benchmark_diffusion.errors import UserError
from clip_benchmark_diffusion.families.base import Family
from clip_benchmark_diffusion.options import ScoringOptions
from clip_benchmark_diffusion.scoring.engine import Conditioning, Levels


class SanaFamily(Family):
    name = "sana"
    classic_attention = False
    pipeline = "SanaPipeline"
    denoiser = "transformer"
    time = "flow"
    cuda_dtype = "bfloat16"
    required = ("transformer", "text_encoder", "tokenizer", "scheduler", "vae")
    default_max_sequence_length = 300
    sequence_encoders = ("text_encoder",)
    description = ("Sana: SanaTransformer2DModel (linear attention) on Gemma-2 (300 tokens, masked); DC-AE "
                   "latents; rectified flow, timestep = sigma * 1000 * timestep_scale, the scheduler's flow_shift")

    def encode_images(self, pipe: Any, images: torch.Tensor) -> torch.Tensor:
        """DC-AE is deterministic: ``encode(x).latent`` (no posterior) times ``scaling_factor``, no shift."""
        vae = pipe.vae
        return vae.encode(images.to(vae.dtype)).latent.float() * float(vae.config.scaling_factor)

    def flow_shift(self, pipe: Any, resolution: int) -> float:
        return float(pipe.scheduler.config.get("flow_shift", 1.0))

    def flow_time_scale(self, pipe: Any) -> float:
        return 1000.0 * float(pipe.transformer.config.timestep_scale)

    def encode_prompts(self, pipe: Any, texts: list[str], device: torch.device,
                       options: ScoringOptions) -> Conditioning:
        # complex_human_instruction=None: the pipeline's __call__ prepends a long "complex human
        # instruction" to enhance prompts for generation; that changes the conditioning (Gemma is
        # causal) away from the class prompt being scored. Scoring wants the prompt itself; the
        # instruction could become an option later.
        embeds, mask, _, _ = pipe.encode_prompt(texts, do_classifier_free_guidance=False, device=device,
                                                clean_caption=False, complex_human_instruction=None,
                                                max_sequence_length=self.max_sequence_length(options))
        return {"encoder_hidden_states": embeds, "encoder_attention_mask": mask}   # (P, L, D), (P, L)

    def call_denoiser(self, pipe: Any, x_t: torch.Tensor, levels: Levels, cond: Conditioning,
                      options: ScoringOptions) -> torch.Tensor:
        return pipe.transformer(x_t, encoder_hidden_states=cond["encoder_hidden_states"],
                                encoder_attention_mask=cond["encoder_attention_mask"],
                                timestep=levels.model_time).sample

    def check(self, pipe: Any, location: str) -> None:
        cfg = pipe.scheduler.config
        if cfg.get("prediction_type") != "flow_prediction" or not cfg.get("use_flow_sigmas", False):
            raise UserError(f"{location!r} has a {type(pipe.scheduler).__name__} with prediction_type "
                            f"{cfg.get('prediction_type')!r} and use_flow_sigmas {cfg.get('use_flow_sigmas')}; "
                            "the sana family scores flow-matching Sana models (flow_prediction, use_flow_sigmas)")
