"""FLUX.1 dev / schnell: a FluxTransformer2DModel on pooled CLIP-L + T5, packed 2x2 latents, rectified flow."""
from __future__ import annotations

import math
from typing import Any

import torch

from clip_benchmark_diffusion.families.base import Family, TextSide
from clip_benchmark_diffusion.options import ScoringOptions
from clip_benchmark_diffusion.scoring.engine import Conditioning, Levels
from clip_benchmark_diffusion.scoring.timesteps import dynamic_shift


class FluxFamily(Family):
    name = "flux"
    classic_attention = False
    pipeline = "FluxPipeline"
    denoiser = "transformer"
    time = "flow"
    cuda_dtype = "bfloat16"   # FLUX and T5 overflow in float16
    text = (TextSide("tokenizer", "text_encoder"), TextSide("tokenizer_2", "text_encoder_2"))
    required = ("transformer", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler", "vae")
    default_max_sequence_length = 512   # the pipeline's default; T5 runs unmasked, so the padding is attended
    sequence_encoders = ("text_encoder_2",)
    latent_packing = 2   # _pack_latents folds 2x2 latent pixels into one token (the transformer's patch is 1)
    description = ("FLUX.1: FluxTransformer2DModel on pooled CLIP-L + T5-XXL; packed 2x2 latents with RoPE ids; "
                   "rectified flow, timestep = sigma, resolution-dependent shift; distilled guidance (dev)")

    def native_resolution(self, pipe: Any) -> int:
        # The transformer has no sample_size (the pipeline hard-codes 128 latents); the VAE config of the
        # released weights records the same 1024 px, and a folder's own VAE says what it was built for.
        return int(pipe.vae.config.sample_size)

    def image_tokens(self, pipe: Any, resolution: int) -> int:
        """Packed sequence length at ``resolution``: (h/2) * (w/2) for an h x w latent."""
        side = resolution // self.vae_scale_factor(pipe) // 2
        return side * side

    def flow_shift(self, pipe: Any, resolution: int) -> float:
        """dev: e^mu, mu linear in the image sequence length (the scheduler's dynamic shifting); schnell: ``shift``."""
        cfg = pipe.scheduler.config
        if not cfg.get("use_dynamic_shifting", False):
            return float(cfg.get("shift", 1.0))
        k = dynamic_shift(self.image_tokens(pipe, resolution), cfg.get("base_image_seq_len", 256),
                          cfg.get("max_image_seq_len", 4096), cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))
        # FlowMatchEulerDiscreteScheduler: "exponential" shifts by e^mu, "linear" by mu itself.
        return math.log(k) if cfg.get("time_shift_type", "exponential") == "linear" else k

    def flow_time_scale(self, pipe: Any) -> float:
        return 1.0   # the transformer multiplies sigma by 1000 itself

    def encode_prompts(self, pipe: Any, texts: list[str], device: torch.device,
                       options: ScoringOptions) -> Conditioning:
        embeds, pooled, _ = pipe.encode_prompt(prompt=texts, prompt_2=None, device=device,
                                               max_sequence_length=self.max_sequence_length(options))
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}   # (P, L, D), (P, 768)

    def guidance(self, pipe: Any, n: int, options: ScoringOptions, device: torch.device) -> torch.Tensor | None:
        """The distilled guidance input (dev), one per row; None for models without a guidance embedding."""
        if not pipe.transformer.config.guidance_embeds:
            return None
        return torch.full((n,), float(options.guidance), device=device, dtype=torch.float32)

    def call_denoiser(self, pipe: Any, x_t: torch.Tensor, levels: Levels, cond: Conditioning,
                      options: ScoringOptions) -> torch.Tensor:
        n, c, h, w = x_t.shape
        packed = pack_latents(x_t)                                                   # (N, h/2*w/2, 4C)
        img_ids = latent_image_ids(h // 2, w // 2, x_t.device, x_t.dtype)            # (h/2*w/2, 3)
        text = cond["encoder_hidden_states"]
        txt_ids = torch.zeros(text.shape[1], 3, device=x_t.device, dtype=x_t.dtype)  # (L, 3)
        out = pipe.transformer(hidden_states=packed, timestep=levels.model_time.to(x_t.dtype),
                               guidance=self.guidance(pipe, n, options, x_t.device),
                               pooled_projections=cond["pooled_projections"], encoder_hidden_states=text,
                               txt_ids=txt_ids, img_ids=img_ids).sample             # (N, h/2*w/2, 4C)
        return unpack_latents(out, h, w)                                             # (N, C, h, w)

    def extra_metadata(self, pipe: Any, options: ScoringOptions) -> dict[str, Any]:
        out = super().extra_metadata(pipe, options)
        out["guidance"] = float(options.guidance) if pipe.transformer.config.guidance_embeds else None
        return out


# FluxPipeline's latent layout, written out here rather than called through its private static methods
# (_pack_latents, _prepare_latent_image_ids, _unpack_latents), which may change between diffusers
# releases; tests/test_pipeline_parity_transformers.py checks all three against a real pipeline call.

def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """(N, C, h, w) -> (N, h/2 * w/2, 4C): each 2x2 patch becomes one token, channels before the patch offsets."""
    n, c, h, w = x.shape
    return x.view(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(n, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of :func:`pack_latents` for an h x w latent (sizes in latent pixels)."""
    n, _, d = tokens.shape
    return tokens.view(n, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(n, d // 4, h, w)


def latent_image_ids(rows: int, cols: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """RoPE positions of the packed tokens, (rows * cols, 3) = (0, row, col) in row-major order."""
    r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    ids = torch.stack([torch.zeros_like(r), r, c], dim=-1).reshape(rows * cols, 3)
    return ids.to(device=device, dtype=dtype)
