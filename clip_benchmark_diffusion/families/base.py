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

    # -- images ------------------------------------------------------------------------------
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
