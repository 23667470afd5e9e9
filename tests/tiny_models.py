"""Tiny, seeded, randomly initialised components built from configs (diffusers-test style).

``save_tiny_sd`` writes a real Stable-Diffusion-format folder (model_index.json, unet, vae,
text_encoder, tokenizer, scheduler; safetensors) that loads through the same code path as
``stabilityai/stable-diffusion-2-base``.
"""
from __future__ import annotations

from pathlib import Path

import torch


def tiny_components(prediction_type: str = "epsilon", seed: int = 0, context_length: int = 16) -> dict:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from clip_benchmark_diffusion.tokenizers import clip_bpe_tokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(4, 8), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=8, norm_num_groups=2, attention_head_dim=2,
    )
    vae = AutoencoderKL(
        block_out_channels=(4, 8), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=2,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), sample_size=16,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        hidden_size=8, intermediate_size=16, num_attention_heads=2, num_hidden_layers=2,
        vocab_size=49408, max_position_embeddings=context_length, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    ))
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              num_train_timesteps=1000, prediction_type=prediction_type,
                              steps_offset=1, clip_sample=False)
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=clip_bpe_tokenizer(context_length),
                scheduler=scheduler)


def save_tiny_sd(folder: Path, prediction_type: str = "epsilon", seed: int = 0, context_length: int = 16) -> Path:
    """Save a tiny SD pipeline with ``save_pretrained``; returns the folder."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(**tiny_components(prediction_type, seed, context_length), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return Path(folder)


def load_tiny_classifier(folder: Path, options: Path, device: str = "cpu"):
    """``(model, transform, tokenizer)`` through clip_benchmark's own ``load_clip``, as the CLI loads it."""
    from clip_benchmark_diffusion.integration.clip_benchmark import ensure_installed

    ensure_installed()
    from clip_benchmark.models import load_clip

    return load_clip("open_clip", f"diffusion_sd2@{options}", str(folder), None, device)
