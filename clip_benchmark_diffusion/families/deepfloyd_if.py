"""DeepFloyd IF stage I: a pixel-space UNet2DConditionModel on T5 (77 tokens), cosine VP schedule."""
from __future__ import annotations

from typing import Any

import torch

from clip_benchmark_diffusion.families.base import Family
from clip_benchmark_diffusion.options import ScoringOptions
from clip_benchmark_diffusion.scoring.engine import Conditioning, Levels

# IFPipeline.encode_prompt hard-codes this: "the text encoder was trained with a max length of 77 for IF".
IF_TOKENS = 77


class IFFamily(Family):
    name = "if"
    pipeline = "IFPipeline"
    cuda_dtype = "bfloat16"   # T5-XXL overflows in float16
    required = ("unet", "text_encoder", "tokenizer", "scheduler")
    sequence_encoders = ("text_encoder",)
    description = ("DeepFloyd IF stage I: pixel-space UNet2DConditionModel (64 px) on T5-XXL (77 tokens); "
                   "cosine schedule; epsilon + learned-range variance")

    def max_sequence_length(self, options: ScoringOptions) -> int:
        return IF_TOKENS   # the pipeline ignores any other value

    def encode_prompts(self, pipe: Any, texts: list[str], device: torch.device,
                       options: ScoringOptions) -> Conditioning:
        # The T5 mask stays on the text side: IF's UNet attends every position, as in the pipeline.
        embeds, _ = pipe.encode_prompt(texts, do_classifier_free_guidance=False, device=device,
                                       clean_caption=False)                     # (P, 77, D)
        return {"encoder_hidden_states": embeds}

    def call_denoiser(self, pipe: Any, x_t: torch.Tensor, levels: Levels, cond: Conditioning,
                      options: ScoringOptions) -> torch.Tensor:
        return pipe.unet(x_t, levels.model_time, encoder_hidden_states=cond["encoder_hidden_states"]).sample
