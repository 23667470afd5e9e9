"""What a model family is: how to encode prompts and images, which noise levels, how to call the denoiser.

A :class:`Family` is declarative data (its diffusers pipeline class, the denoiser component, its
text encoders, its time parametrisation) plus a few small hooks that differ between families.
It never holds weights: :class:`~clip_benchmark_diffusion.families.model.LoadedModel`
binds a family to one loaded pipeline. The scoring engine, strategies, store and adapter only
see the family-agnostic interface (a :class:`~clip_benchmark_diffusion.scoring.timesteps.NoiseGrid`,
conditioning dicts, epsilon estimates).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from clip_benchmark_diffusion.errors import UserError
from clip_benchmark_diffusion.options import ScoringOptions
from clip_benchmark_diffusion.scoring.engine import Conditioning, Levels
from clip_benchmark_diffusion.scoring.timesteps import NoiseGrid, flow_grid, vp_grid


# UNet up blocks that upsample to the skip connection's own size (diffusers forwards it), so any latent
# side works; the others (ResnetUpsampleBlock2D, SimpleCrossAttnUpBlock2D, K*) need multiples of the depth.
_SIZE_FORWARDING_UP_BLOCKS = {"UpBlock2D", "CrossAttnUpBlock2D", "AttnUpBlock2D"}


@dataclass(frozen=True)
class SizeRule:
    """The image sides a model can score: multiples of ``multiple`` px, at least ``minimum`` px."""

    multiple: int   # VAE downsampling x the denoiser's patch (and packing): one whole token per step
    minimum: int    # the smallest side that still leaves the denoiser one patch after its own downsampling
    why: str        # where ``multiple`` comes from, for the message

    def check(self, resolution: int) -> None:
        """Refuse a side the denoiser cannot take (a traceback after loading) or would score on a
        silently cropped or degenerate image; name the nearest sides it can take."""
        if resolution % self.multiple == 0 and resolution >= self.minimum:
            return
        below = resolution // self.multiple * self.multiple
        near = [s for s in (below, below + self.multiple) if s >= self.minimum] or [self.minimum]
        if resolution < self.minimum:
            near = [self.minimum]
        sizes = " or ".join(str(s) for s in dict.fromkeys(near))
        raise UserError(f"scoring option resolution={resolution} cannot be scored by this model: sides must be "
                        f"multiples of {self.multiple} px ({self.why}) and at least {self.minimum} px; "
                        f"use {sizes} (or 0 for the model's own)")


@dataclass(frozen=True)
class TextSide:
    """One tokenizer and the text encoder it feeds (component names in model_index.json)."""

    tokenizer: str
    encoder: str


class Family:
    """How to score one kind of diffusers text-to-image pipeline; subclasses set the class attributes."""

    # Registered name, the `family` of a Recipe.
    name: ClassVar[str]
    # The diffusers pipeline class that loads the folder and owns `encode_prompt`.
    pipeline: ClassVar[str]
    # Component holding the denoiser ("unet" or "transformer").
    denoiser: ClassVar[str] = "unet"
    # Tokenizer/encoder pairs the conditioning comes from; optional ones may be absent (null).
    text: ClassVar[tuple[TextSide, ...]] = (TextSide("tokenizer", "text_encoder"),)
    optional_text: ClassVar[tuple[str, ...]] = ()
    # Components of model_index.json a folder of this family must have.
    required: ClassVar[tuple[str, ...]] = ("unet", "text_encoder", "tokenizer", "scheduler")
    # Latent pixels packed into one token on top of the denoiser's patch_size (FLUX packs 2x2).
    latent_packing: ClassVar[int] = 1
    # "vp" (alpha_bar schedule, discrete t) or "flow" (rectified flow, sigma in (0, 1)).
    time: ClassVar[str] = "vp"
    # Default CUDA dtype of the denoiser and text encoders: T5 and FLUX overflow in float16.
    cuda_dtype: ClassVar[str] = "float16"
    # The pipeline's own default max_sequence_length for T5/Gemma encoders (0: CLIP only).
    default_max_sequence_length: ClassVar[int] = 0
    # Encoders that read max_sequence_length tokens (T5, Gemma), not their tokenizer's model_max_length.
    sequence_encoders: ClassVar[tuple[str, ...]] = ()
    # Optional pipeline components never needed for scoring (not loaded).
    skip: ClassVar[tuple[str, ...]] = ("safety_checker", "feature_extractor", "image_encoder", "watermarker")
    description: ClassVar[str] = ""
    # Whether diffusers writes this family's attention in the classic form too (``attention=classic``:
    # AttnProcessor for AttnProcessor2_0); SD3's joint, FLUX's and Sana's attention exist only as SDPA.
    classic_attention: ClassVar[bool] = True

    # -- images ------------------------------------------------------------------------------
    def size_rule(self, index: dict, vae: dict | None, denoiser: dict | None) -> SizeRule | None:
        """The sides this model can score, from its configs (``model_index.json``, ``vae/config.json``
        and the denoiser's ``config.json``), before any weight loads; None when they cannot be read."""
        has_vae = isinstance(index.get("vae"), list) and bool(index["vae"]) and bool(index["vae"][0])
        if (has_vae and vae is None) or denoiser is None:
            return None
        blocks = (vae or {}).get("block_out_channels") or (vae or {}).get("encoder_block_out_channels")
        if has_vae and not blocks:
            return None
        vae_factor = 2 ** (len(blocks) - 1) if has_vae else 1
        patch = int(denoiser.get("patch_size") or 1) * self.latent_packing
        # a UNet halves its input once per level after the first: fewer latent pixels than that collapse
        down = 2 ** (len(denoiser.get("block_out_channels") or [0]) - 1) if self.denoiser == "unet" else 1
        parts = [f"the VAE's {vae_factor}x downsampling"] if has_vae else []
        if patch > 1:
            parts.append(f"{patch}x{patch} latent patches" if self.latent_packing == 1
                         else f"{patch}x{patch} packed latents")
        up_blocks = set(denoiser.get("up_block_types") or ())
        if self.denoiser == "unet" and down > 1 and not up_blocks <= _SIZE_FORWARDING_UP_BLOCKS:
            # resnet upsamplers (IF's blocks) double the size blindly: skip connections then mismatch
            patch = down
            parts.append(f"the UNet's {down}x downsampling")
        return SizeRule(multiple=vae_factor * patch, minimum=vae_factor * max(patch, down),
                        why=" times ".join(parts) or "pixels")

    def vae_scale_factor(self, pipe: Any) -> int:
        vae = getattr(pipe, "vae", None)
        if vae is None:
            return 1
        blocks = getattr(vae.config, "block_out_channels", None) or vae.config.encoder_block_out_channels
        return 2 ** (len(blocks) - 1)

    def native_resolution(self, pipe: Any) -> int | tuple[int, int]:
        """The image size the model was trained at, as its pipeline computes the default size: one side,
        or (height, width) for a model with a non-square ``sample_size`` (the two-garment scenes)."""
        size, factor = self.denoiser_module(pipe).config.sample_size, self.vae_scale_factor(pipe)
        if isinstance(size, (list, tuple)):
            return int(size[0]) * factor, int(size[1]) * factor
        return int(size) * factor

    def image_channels(self, pipe: Any) -> int:
        vae = getattr(pipe, "vae", None)
        return int(vae.config.in_channels) if vae is not None else int(self.denoiser_module(pipe).config.in_channels)

    def encode_images(self, pipe: Any, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] (B, C, H, W) -> the denoiser's clean input x0, float32.

        The VAE posterior mean, minus ``shift_factor`` (SD3, FLUX), times ``scaling_factor``; pixels
        for VAE-free models.
        """
        vae = getattr(pipe, "vae", None)
        if vae is None:
            return images
        dist = vae.encode(images.to(vae.dtype)).latent_dist
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return ((dist.mean.float() - shift) * float(vae.config.scaling_factor))

    # -- noise levels ------------------------------------------------------------------------
    def objective(self, pipe: Any) -> str:
        """epsilon / v_prediction (read from the scheduler config) or flow."""
        if self.time == "flow":
            return "flow"
        return pipe.scheduler.config.prediction_type

    def flow_shift(self, pipe: Any, resolution: int) -> float:
        """The model's own time shift (SD3: scheduler ``shift``)."""
        return float(getattr(pipe.scheduler.config, "shift", 1.0))

    def flow_time_scale(self, pipe: Any) -> float:
        """sigma -> the denoiser's ``timestep`` argument (SD3, Sana: x1000; FLUX: x1, it scales inside)."""
        return 1000.0

    def noise_grid(self, pipe: Any, n: int, weighting: str, resolution: int) -> NoiseGrid:
        if self.time == "flow":
            return flow_grid(n, self.flow_shift(pipe, resolution), weighting, self.flow_time_scale(pipe))
        return vp_grid(pipe.scheduler.alphas_cumprod, n, weighting)

    # -- text --------------------------------------------------------------------------------
    def text_sides(self, pipe: Any) -> list[TextSide]:
        """The tokenizer/encoder pairs present in this pipeline."""
        return [s for s in self.text if getattr(pipe, s.encoder, None) is not None
                and getattr(pipe, s.tokenizer, None) is not None]

    def max_sequence_length(self, options: ScoringOptions) -> int:
        return options.max_sequence_length or self.default_max_sequence_length

    def token_limits(self, pipe: Any, options: ScoringOptions) -> list[tuple[str, Any, int]]:
        """``(tokenizer name, tokenizer, tokens the model reads)`` for each tokenizer in use."""
        return [(s.tokenizer, getattr(pipe, s.tokenizer),
                 int(self.max_sequence_length(options) if s.encoder in self.sequence_encoders
                     else getattr(pipe, s.tokenizer).model_max_length))
                for s in self.text_sides(pipe)]

    def encode_prompts(self, pipe: Any, texts: list[str], device: torch.device,
                       options: ScoringOptions) -> Conditioning:
        """Prompts -> the denoiser's conditioning, one row per prompt, through ``pipe.encode_prompt``."""
        raise NotImplementedError

    def encode_classes(self, pipe: Any, classnames: list[str]) -> Conditioning:
        """Class-conditional families: class names -> conditioning, one row per class."""
        raise UserError(f"the {self.name} family is conditioned on text, not on class ids")

    @property
    def text_conditioned(self) -> bool:
        return bool(self.text)

    # -- the denoiser ------------------------------------------------------------------------
    def denoiser_module(self, pipe: Any) -> torch.nn.Module:
        return getattr(pipe, self.denoiser)

    def call_denoiser(self, pipe: Any, x_t: torch.Tensor, levels: Levels, cond: Conditioning,
                      options: ScoringOptions) -> torch.Tensor:
        """The raw model output (N, C', H, W) for noised inputs ``x_t`` (already in the model's dtype)."""
        raise NotImplementedError

    def check(self, pipe: Any, location: str) -> None:
        """Refuse, with one line, a loaded pipeline this family cannot score (after loading)."""

    def extra_metadata(self, pipe: Any, options: ScoringOptions) -> dict[str, Any]:
        """Family-specific facts for the result file (token limits, guidance, shift, ...)."""
        out: dict[str, Any] = {"token_limits": {name: limit for name, _, limit in self.token_limits(pipe, options)}}
        if self.time == "flow":
            out["flow_shift"] = self.flow_shift(pipe, options.resolution or self.native_resolution(pipe))
        return out

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "pipeline": self.pipeline, "denoiser": self.denoiser, "time": self.time,
                "text_encoders": [s.encoder for s in self.text], "cuda_dtype": self.cuda_dtype,
                "description": self.description}
