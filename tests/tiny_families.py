"""A tiny, seeded, random instance of every model family, built from configs (diffusers-test style)
and saved with ``save_pretrained``, so it loads through exactly the code real checkpoints use.

``TINY_FAMILIES`` maps a name to ``(recipe, builder)``; ``save_tiny(name, folder)`` writes the folder.
CLIP tokenizers are the package's offline BPE tokenizer (the real vocabulary, 16 tokens); T5 and
Gemma stand-ins are word-level fast tokenizers over the test prompts' words, with encoders whose
vocabulary matches, since no sentencepiece model can be downloaded here.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from wds_data import DIGIT_NAMES, DIGIT_TEMPLATES

WORDS = sorted({w for t in DIGIT_TEMPLATES for w in t.replace("{c}", "").replace(".", " .").split()} | set(DIGIT_NAMES))


def clip_tokenizer():
    from clip_benchmark_diffusion.tokenizers import clip_bpe_tokenizer

    return clip_bpe_tokenizer(16)


def clip_text(hidden: int = 16, projection: int | None = None):
    """A 2-layer CLIP text encoder over the real 49,408-token vocabulary (with a projection head if given)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=16, projection_dim=projection or hidden,
                         bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg)


def word_tokenizer(max_len: int = 32, bos: str | None = None):
    """A T5/Gemma stand-in: word level over ``WORDS``, eos appended (or bos prepended), pad and unk."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "</s>", "<unk>"] + ([bos] if bos else [])
    vocab = {w: i for i, w in enumerate(specials + WORDS)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    single = f"{bos} $A" if bos else "$A </s>"
    special = [(bos, vocab[bos])] if bos else [("</s>", vocab["</s>"])]
    tk.post_processor = processors.TemplateProcessing(single=single, special_tokens=special)
    kw = dict(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=max_len)
    if bos:
        kw["bos_token"] = bos
    return PreTrainedTokenizerFast(**kw)


def t5(d_model: int = 16):
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(vocab_size=len(WORDS) + 3, d_model=d_model, d_kv=4, d_ff=32, num_layers=2, num_heads=4,
                   feed_forward_proj="gated-gelu", is_encoder_decoder=False, pad_token_id=0, eos_token_id=1)
    return T5EncoderModel(cfg)


def vae(latent_channels: int = 4, scaling_factor: float = 0.18215, shift_factor: float | None = None):
    """A 2-level AutoencoderKL: 16 px images -> 8x8 latents."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(4, 8), layers_per_block=1,
                         latent_channels=latent_channels, norm_num_groups=2, sample_size=16,
                         scaling_factor=scaling_factor, shift_factor=shift_factor)


def sd_pipeline():
    from tiny_models import tiny_components
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(**tiny_components("epsilon"), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def sdxl_pipeline():
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    # Real SDXL: cross_attention_dim 2048 (768 + 1280), add-embedding input 6 * 256 + 1280; tiny: 16 + 16, 6 * 8 + 16.
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, cross_attention_dim=32,
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=64,
        norm_num_groups=4)
    sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                   num_train_timesteps=1000, prediction_type="epsilon", steps_offset=1)
    return StableDiffusionXLPipeline(vae=vae(4, 0.13025), text_encoder=clip_text(16), tokenizer=clip_tokenizer(),
                                     text_encoder_2=clip_text(16, projection=16), tokenizer_2=clip_tokenizer(),
                                     unet=unet, scheduler=sched)


def sd3_pipeline(variant: str = "sd3"):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    extra = {"sd35_medium": dict(dual_attention_layers=(0,), qk_norm="rms_norm"),
             "sd35_large": dict(qk_norm="rms_norm")}.get(variant, {})
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                        caption_projection_dim=16, pooled_projection_dim=32, pos_embed_max_size=16,
                                        **extra)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=vae(16, 1.5305, 0.0609), text_encoder=clip_text(16, projection=16), tokenizer=clip_tokenizer(),
        text_encoder_2=clip_text(16, projection=16), tokenizer_2=clip_tokenizer(), text_encoder_3=t5(32),
        tokenizer_3=word_tokenizer())


def sd3_pixel_pipeline():
    """The format of the shipped diffusion_tiny_flow: SD3 without a VAE (1-channel pixels) and without T5."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    transformer = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=1, out_channels=1, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                        caption_projection_dim=16, pooled_projection_dim=32, pos_embed_max_size=16)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0),
        vae=None, text_encoder=clip_text(16, projection=16), tokenizer=clip_tokenizer(),
        text_encoder_2=clip_text(16, projection=16), tokenizer_2=clip_tokenizer(), text_encoder_3=None,
        tokenizer_3=None)


# name -> (recipe, pipeline builder); the helpers that add families add one line each.
TINY_FAMILIES: dict[str, tuple[str, Callable[[], object]]] = {
    "stable_diffusion": ("diffusion_sd2", sd_pipeline),
    "sdxl": ("diffusion_sdxl", sdxl_pipeline),
    "sd3": ("diffusion_sd3", sd3_pipeline),
    "sd35_medium": ("diffusion_sd35_medium", lambda: sd3_pipeline("sd35_medium")),
    "sd3_pixels": ("diffusion_sd3", sd3_pixel_pipeline),
}


def save_tiny(name: str, folder: Path, seed: int = 0) -> Path:
    """Build family ``name``'s tiny pipeline (seeded) and ``save_pretrained`` it as safetensors."""
    torch.manual_seed(seed)
    pipe = TINY_FAMILIES[name][1]()
    pipe.save_pretrained(folder, safe_serialization=True)
    return Path(folder)
