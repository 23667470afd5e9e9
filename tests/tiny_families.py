"""A tiny, seeded, random instance of every model family, built from configs (diffusers-test style)
and saved with ``save_pretrained``, so it loads through exactly the code real checkpoints use.

``TINY_FAMILIES`` maps a name to ``(recipe, builder)``; ``save_tiny(name, folder)`` writes the folder.
CLIP tokenizers are the package's offline BPE tokenizer (the real vocabulary, 16 tokens); T5 and
Gemma stand-ins are word-level fast tokenizers over the test prompts' words, with encoders whose
vocabulary matches, since no sentencepiece model can be downloaded here.
"""
from __future__ import annotations

import json
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


def flux_pipeline(guidance_embeds: bool):
    """dev (guidance embedding, dynamic shift) or schnell (neither); packed 2x2 latents: 16 px -> 8x8 -> 16 tokens."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    # Real: in 64 = 16 latent channels x 2x2, head dim 128 = sum(axes_dims_rope) (16, 56, 56); tiny: 16 = 4+6+6.
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=16, guidance_embeds=guidance_embeds,
                                         axes_dims_rope=(4, 6, 6))
    # The released scheduler configs: dev shifts by e^mu(sequence length), schnell has shift 1 and no dynamics.
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0 if guidance_embeds else 1.0,
                                            use_dynamic_shifting=guidance_embeds, base_shift=0.5, max_shift=1.15,
                                            base_image_seq_len=256, max_image_seq_len=4096)
    return FluxPipeline(scheduler=sched, vae=vae(16, 0.3611, 0.1159), text_encoder=clip_text(16),
                        tokenizer=clip_tokenizer(), text_encoder_2=t5(32), tokenizer_2=word_tokenizer(),
                        transformer=transformer)


def pixart_pipeline(kind: str = "alpha"):
    """alpha (512-style, no micro-conditions), alpha_ms (1024-MS: resolution/aspect ratio) or sigma."""
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtSigmaPipeline, \
        PixArtTransformer2DModel

    # inner_dim 3 x 8 = 24: size micro-conditions embed into inner_dim // 3 each, so it must divide by 3.
    transformer = PixArtTransformer2DModel(num_attention_heads=3, attention_head_dim=8, in_channels=4, out_channels=8,
                                           num_layers=1, sample_size=8, patch_size=2, caption_channels=32,
                                           cross_attention_dim=24, norm_num_groups=4,
                                           use_additional_conditions=True if kind == "alpha_ms" else None)
    sched = DPMSolverMultistepScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                                        prediction_type="epsilon", num_train_timesteps=1000)
    cls = PixArtSigmaPipeline if kind == "sigma" else PixArtAlphaPipeline
    return cls(tokenizer=word_tokenizer(), text_encoder=t5(32), vae=vae(4, 0.13025 if kind == "sigma" else 0.18215),
               transformer=transformer, scheduler=sched)


def sana_pipeline():
    from diffusers import AutoencoderDC, DPMSolverMultistepScheduler, SanaPipeline, SanaTransformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    text_encoder = Gemma2Model(Gemma2Config(vocab_size=len(WORDS) + 4, hidden_size=32, intermediate_size=64,
                                            num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                            head_dim=16, pad_token_id=0, eos_token_id=1, bos_token_id=3))
    transformer = SanaTransformer2DModel(in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=8,
                                         num_layers=1, num_cross_attention_heads=2, cross_attention_head_dim=8,
                                         cross_attention_dim=16, caption_channels=32, sample_size=8, patch_size=1)
    # A 2-level DC-AE (16 px -> 8x8x8); real f32c32: 6 levels, 32 channels, scaling factor 0.41407.
    dc_ae = AutoencoderDC(in_channels=3, latent_channels=8, attention_head_dim=2,
                          encoder_block_types=("ResBlock", "EfficientViTBlock"),
                          decoder_block_types=("ResBlock", "EfficientViTBlock"),
                          encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
                          encoder_qkv_multiscales=((), (5,)), decoder_qkv_multiscales=((), (5,)),
                          encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1),
                          downsample_block_type="conv", upsample_block_type="interpolate",
                          decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=0.41407)
    sched = DPMSolverMultistepScheduler(flow_shift=3.0, use_flow_sigmas=True, prediction_type="flow_prediction")
    return SanaPipeline(tokenizer=word_tokenizer(bos="<bos>"), text_encoder=text_encoder, vae=dc_ae,
                        transformer=transformer, scheduler=sched)


def if_pipeline():
    """IF stage I at 16 px: the converter's UNet pattern (SimpleCrossAttn blocks, text addition embedding)."""
    from diffusers import DDPMScheduler, IFPipeline, UNet2DConditionModel

    # cross_attention_norm="group_norm" normalises the projected text with 32 groups: cross_attention_dim 32.
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=3, out_channels=6, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn", cross_attention_dim=32, encoder_hid_dim=32,
        attention_head_dim=8, addition_embed_type="text", addition_embed_type_num_heads=2,
        cross_attention_norm="group_norm", resnet_time_scale_shift="scale_shift", act_fn="gelu", norm_num_groups=4)
    sched = DDPMScheduler(variance_type="learned_range", beta_schedule="squaredcos_cap_v2", prediction_type="epsilon",
                          thresholding=True, dynamic_thresholding_ratio=0.95, sample_max_value=1.5)
    return IFPipeline(tokenizer=word_tokenizer(), text_encoder=t5(32), unet=unet, scheduler=sched,
                      safety_checker=None, feature_extractor=None, watermarker=None, requires_safety_checker=False)


# Real ImageNet ids and synonyms (the first ten of DiT-XL-2-256's id2label); datasets named with them.
IMAGENET_FIRST10 = {
    "0": "tench, Tinca tinca", "1": "goldfish, Carassius auratus",
    "2": "great white shark, white shark, man-eater, man-eating shark, Carcharodon carcharias",
    "3": "tiger shark, Galeocerdo cuvieri", "4": "hammerhead, hammerhead shark",
    "5": "electric ray, crampfish, numbfish, torpedo", "6": "stingray", "7": "cock", "8": "hen",
    "9": "ostrich, Struthio camelus"}


def dit_pipeline():
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    transformer = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                        num_layers=1, sample_size=8, patch_size=2, num_embeds_ada_norm=1000,
                                        norm_num_groups=4)
    sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type="epsilon")
    return DiTPipeline(transformer=transformer, vae=vae(4), scheduler=sched, id2label=IMAGENET_FIRST10)


# name -> (recipe, pipeline builder); the helpers that add families add one line each.
TINY_FAMILIES: dict[str, tuple[str, Callable[[], object]]] = {
    "stable_diffusion": ("diffusion_sd2", sd_pipeline),
    "sdxl": ("diffusion_sdxl", sdxl_pipeline),
    "sd3": ("diffusion_sd3", sd3_pipeline),
    "sd35_medium": ("diffusion_sd35_medium", lambda: sd3_pipeline("sd35_medium")),
    "sd3_pixels": ("diffusion_sd3", sd3_pixel_pipeline),
    "flux_dev": ("diffusion_flux_dev", lambda: flux_pipeline(guidance_embeds=True)),
    "flux_schnell": ("diffusion_flux_schnell", lambda: flux_pipeline(guidance_embeds=False)),
    "pixart_alpha": ("diffusion_pixart_alpha", pixart_pipeline),
    "pixart_alpha_ms": ("diffusion_pixart_alpha", lambda: pixart_pipeline("alpha_ms")),
    "pixart_sigma": ("diffusion_pixart_sigma", lambda: pixart_pipeline("sigma")),
    "sana": ("diffusion_sana", sana_pipeline),
    "if": ("diffusion_if", if_pipeline),
    "dit": ("diffusion_dit", dit_pipeline),
}

# model_index.json entries save_pretrained does not write: DiT's id2label lives only there on the Hub.
INDEX_EXTRAS: dict[str, dict] = {"dit": {"id2label": IMAGENET_FIRST10}}


def save_tiny(name: str, folder: Path, seed: int = 0) -> Path:
    """Build family ``name``'s tiny pipeline (seeded) and ``save_pretrained`` it as safetensors."""
    torch.manual_seed(seed)
    pipe = TINY_FAMILIES[name][1]()
    pipe.save_pretrained(folder, safe_serialization=True)
    if name in INDEX_EXTRAS:
        index_file = Path(folder) / "model_index.json"
        index_file.write_text(json.dumps({**json.loads(index_file.read_text()), **INDEX_EXTRAS[name]}, indent=2))
    return Path(folder)
