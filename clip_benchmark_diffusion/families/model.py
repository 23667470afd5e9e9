"""A family bound to one loaded pipeline: the family-agnostic model the scorer talks to.

Loading goes through the family's own diffusers pipeline class (``from_pretrained`` with
safetensors only, no remote code, accelerate's low-memory loading), so every component is read
the way diffusers reads it; scoring then calls that pipeline's own ``encode_prompt``. On CUDA the
text encoders live on the CPU and visit the GPU only to encode prompts (T5-XXL and Gemma are
large and run once per prompt).
"""
from __future__ import annotations

import inspect
import warnings
from typing import Any

import torch

from clip_benchmark_diffusion.errors import UserError
from clip_benchmark_diffusion.families.base import Family
from clip_benchmark_diffusion.families.fast_path import (AppliedFastPath, FastPath, apply_fast_path, prepare_input,
                                                         timed_first_call)
from clip_benchmark_diffusion.options import ScoringOptions
from clip_benchmark_diffusion.scoring import math as smath
from clip_benchmark_diffusion.scoring.engine import Conditioning, Levels
from clip_benchmark_diffusion.scoring.timesteps import NoiseGrid
from clip_benchmark_diffusion.weights import WeightsSource

# A tokenizer saved without model_max_length reports this sentinel (~1e30) from transformers.
_UNSET_LENGTH = 10**6


class LoadedModel:
    """One family's pipeline on one device, with the operations scoring needs."""

    def __init__(self, family: Family, pipe: Any, location: str, dtype: torch.dtype) -> None:
        self.family, self.pipe, self.location, self.dtype = family, pipe, location, dtype
        self.objective = family.objective(pipe)
        self.denoiser = family.denoiser_module(pipe).eval()
        self.vae = getattr(pipe, "vae", None)
        self.text_encoders = [getattr(pipe, s.encoder).eval() for s in family.text_sides(pipe)]
        self.device = torch.device("cpu")
        self.offload_text = False
        self.fast: AppliedFastPath | None = None
        if self.vae is not None:
            self.vae.eval()

    def place(self, device: torch.device | str) -> "LoadedModel":
        """Move the denoiser and VAE to ``device``; on a GPU the text encoders stay on the CPU and
        visit it only to encode prompts (offloading pays there; elsewhere they move too)."""
        self.device = torch.device(device)
        self.denoiser.to(self.device)
        if self.vae is not None:
            self.vae.to(self.device)
        self.offload_text = self.device.type == "cuda"
        for enc in self.text_encoders:
            enc.to("cpu" if self.offload_text else self.device)
        return self

    def use_fast_path(self, options: ScoringOptions) -> AppliedFastPath:
        """Run the denoiser with ``options``' fast path (families/fast_path.py) from now on."""
        options.fast_path.check_family(self.family.name, self.family.classic_attention)
        path = FastPath.resolve(options, self.device, self.family.denoiser)
        if self.fast is None or self.fast.path != path:
            self.fast = apply_fast_path(self.denoiser, path)
        return self.fast

    # -- facts -------------------------------------------------------------------------------
    def resolution(self, options: ScoringOptions) -> int | tuple[int, int]:
        return options.resolution or self.family.native_resolution(self.pipe)

    @property
    def image_channels(self) -> int:
        return self.family.image_channels(self.pipe)

    def grid(self, n: int, options: ScoringOptions) -> NoiseGrid:
        return self.family.noise_grid(self.pipe, n, options.weighting, self.resolution(options))

    def token_limits(self, options: ScoringOptions) -> list[tuple[str, Any, int]]:
        return self.family.token_limits(self.pipe, options)

    def fingerprint_modules(self) -> dict[str, torch.nn.Module]:
        """The modules whose weights decide scores, text encoders included."""
        modules = {self.family.denoiser: self.denoiser}
        if self.vae is not None:
            modules["vae"] = self.vae
        modules.update((s.encoder, getattr(self.pipe, s.encoder)) for s in self.family.text_sides(self.pipe))
        return modules

    def conditioning_fingerprint(self, texts: list[str], options: ScoringOptions) -> str:
        """A digest of what every tokenizer makes of ``texts`` at the length the model reads: a changed
        tokenizer file, vocabulary or max length changes it (the encoders are in the weights)."""
        from clip_benchmark_diffusion.results.keys import tokenizer_fingerprint

        encodings = []
        for name, tok, limit in self.token_limits(options):
            enc = tok(texts, padding="max_length", max_length=limit, truncation=True, return_tensors="pt")
            encodings.append((name, limit, enc.input_ids, enc.attention_mask))
        return tokenizer_fingerprint(encodings)

    def metadata(self, options: ScoringOptions) -> dict[str, Any]:
        return {"family": self.family.name, "objective": self.objective,
                "resolution": self.resolution(options), **self.family.extra_metadata(self.pipe, options),
                "fast_path": self.use_fast_path(options).metadata()}

    # -- the operations ----------------------------------------------------------------------
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) in [-1, 1] -> x0 (B, C', h, w) float32 on the device."""
        return self.family.encode_images(self.pipe, images.to(self.device))

    @torch.no_grad()
    def encode_prompts(self, texts: list[str], options: ScoringOptions) -> Conditioning:
        """One conditioning row per prompt, on the device; the text encoders go back to the CPU after."""
        if self.offload_text:
            for enc in self.text_encoders:
                enc.to(self.device)
        try:
            cond = self.family.encode_prompts(self.pipe, texts, self.device, options)
        finally:
            if self.offload_text:
                for enc in self.text_encoders:
                    enc.to("cpu")
                torch.cuda.empty_cache()
        return {k: (v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device))
                for k, v in cond.items()}

    def encode_classes(self, classnames: list[str]) -> Conditioning:
        return {k: v.to(self.device) for k, v in self.family.encode_classes(self.pipe, classnames).items()}

    def denoise(self, x_t: torch.Tensor, levels: Levels, cond: Conditioning, options: ScoringOptions) -> torch.Tensor:
        """eps_hat (N, C, H, W) float32 for x_t (N, C, H, W) float32."""
        fast = self.use_fast_path(options)
        x = prepare_input(x_t.to(self.dtype), fast.path)
        out = timed_first_call(fast, tuple(x.shape),
                               lambda: self.family.call_denoiser(self.pipe, x, levels, cond, options))
        out = out[:, : x_t.shape[1]]               # learned-variance channels (PixArt, IF, DiT) dropped
        return smath.predicted_eps(out, x_t, levels.a, levels.b, self.objective)


def load_model(family: Family, source: WeightsSource, dtype: torch.dtype, cache_dir: str | None = None,
               expected_prediction: str | None = None) -> LoadedModel:
    """Load ``source`` on the CPU with the family's pipeline class (then :meth:`LoadedModel.place`);
    every failure a user can cause is one line."""
    import diffusers
    import transformers

    # Loading bars for a handful of local components are noise nobody can act on.
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    cls = getattr(diffusers, family.pipeline)
    expected, optional = pipeline_signature_keys(cls)
    kwargs: dict[str, Any] = {name: None for name in family.skip if name in expected}
    if "requires_safety_checker" in optional:
        kwargs["requires_safety_checker"] = False
    try:
        index = cls.load_config(source.location, cache_dir=cache_dir)
        # Components saved as null (no VAE: pixel space; no T5) are passed as None, as diffusers expects.
        kwargs.update({name: None for name in expected if name not in kwargs
                       and not (isinstance(index.get(name), list) and index[name] and index[name][0])})
        with warnings.catch_warnings():
            # Pipelines warn about scheduler settings that matter for sampling only (steps_offset,
            # clip_sample); scoring reads the noise schedule alone, so the notice is not actionable.
            warnings.filterwarnings("ignore", message=r"The configuration file of this scheduler", category=FutureWarning)
            pipe = cls.from_pretrained(source.location, dtype={"default": dtype, "vae": torch.float32},
                                       use_safetensors=True, cache_dir=cache_dir, **kwargs)
    except Exception as exc:  # noqa: BLE001 - any failure to read a user's folder is reported in one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"could not load the weights from {source.location!r}: {type(exc).__name__}: {first} "
                        "(corrupted, incomplete, non-safetensors, or not downloadable offline)") from None
    _check_text_side(family, pipe, source.location)
    objective = family.objective(pipe)
    if objective not in smath.OBJECTIVES:
        raise UserError(f"{source.location!r} predicts {objective!r} (scheduler prediction_type); "
                        f"only {', '.join(smath.OBJECTIVES[:2])} models can be scored in the {family.name} family")
    if expected_prediction and objective != expected_prediction:
        raise UserError(f"{source.location!r} is a {objective} model but the recipe expects "
                        f"{expected_prediction}; pick the matching recipe (see list-models)")
    family.check(pipe, source.location)
    if family.image_channels(pipe) not in (1, 3):
        raise UserError(f"{source.location!r} takes {family.image_channels(pipe)}-channel images; only 1-channel "
                        "(grayscale) or 3-channel (RGB) models can score dataset images")
    return LoadedModel(family, pipe, source.location, dtype)


def pipeline_signature_keys(cls: type) -> tuple[list[str], list[str]]:
    """``(components, optional arguments)`` of a pipeline class's ``__init__``, as diffusers'
    ``from_pretrained`` sorts them (its private ``_get_signature_keys``): the components are the
    arguments without a default plus those the class lists in ``_optional_components``; the rest
    (``requires_safety_checker``, ...) are optional. Checked against diffusers in the parity tests."""
    params = inspect.signature(cls.__init__).parameters
    listed = set(getattr(cls, "_optional_components", ()) or ())
    expected = {k for k, v in params.items() if k != "self" and (v.default is inspect.Parameter.empty or k in listed)}
    optional = {k for k, v in params.items() if v.default is not inspect.Parameter.empty and k not in listed}
    return sorted(expected), sorted(optional)


def _check_text_side(family: Family, pipe: Any, location: str) -> None:
    """Tokenizers that cannot be what the text encoder was trained with are refused; an unset
    ``model_max_length`` is taken from the encoder's position embeddings (an odd but valid folder)."""
    for side in family.text_sides(pipe):
        tok, enc = getattr(pipe, side.tokenizer), getattr(pipe, side.encoder)
        problem = _tokenizer_problem(tok, getattr(enc.config, "vocab_size", None))
        if problem:
            raise UserError(f"{location}/{side.tokenizer} does not fit {side.encoder}: it {problem}; the tokenizer "
                            "files are missing or do not belong to this model (re-save it with "
                            "tokenizer.save_pretrained)")
        if tok.model_max_length >= _UNSET_LENGTH:
            positions = getattr(enc.config, "max_position_embeddings", None)
            if positions is None:
                raise UserError(f"{location}/{side.tokenizer} has no model_max_length and {side.encoder} does not "
                                "say how many tokens it reads; set model_max_length in tokenizer_config.json")
            tok.model_max_length = int(positions)
            if hasattr(pipe, "tokenizer_max_length") and side.tokenizer == "tokenizer":
                pipe.tokenizer_max_length = int(positions)   # FLUX/SD3 read it once, at construction


# Ordinary words every vocabulary of a text-to-image model holds (word-, subword- or byte-level).
_PROBE = "a photo of a dog."


def _tokenizer_problem(tok: Any, vocab: int | None) -> str | None:
    """Why ``tok`` cannot feed an encoder of ``vocab`` embeddings, or None.

    Checked directly, not by comparing sizes: an embedding table may have padding rows beyond the
    tokenizer (T5's 32128 rows for 32100 tokens; fine-tunes pad to multiples of 64 or more), while
    transformers loads a tokenizer whose vocabulary files are missing as an empty one that maps
    every word to its unknown token, and a tokenizer of another model yields ids past the table.
    """
    ids = [int(i) for i in tok(_PROBE).input_ids]
    if vocab and max(ids, default=0) >= vocab:
        return f"gives token id {max(ids)} to {_PROBE!r}, beyond the {vocab} embeddings"
    specials = set(tok.all_special_ids)
    if not [i for i in ids if i not in specials]:
        return f"knows no word of {_PROBE!r} (every token is a special one: no vocabulary was loaded)"
    return None
