"""The loader clip_benchmark calls: ``f(model_name, pretrained, cache_dir, device)``.

It resolves the model, places this process (rank, device, process group), loads the weights and
builds the classifier's collaborators, which the classifier only registers (as a diffusers
pipeline registers the components it is handed).
"""
from __future__ import annotations

import os
from typing import Mapping

import torch

from clip_benchmark_diffusion import distributed
from clip_benchmark_diffusion.adapter.caption_selection import CaptionSelection
from clip_benchmark_diffusion.adapter.class_table import ClassTable
from clip_benchmark_diffusion.adapter.model import DiffusionClassifier
from clip_benchmark_diffusion.adapter.run_account import RunAccount
from clip_benchmark_diffusion.adapter.shortlist import TaskShortlist
from clip_benchmark_diffusion.errors import stderr_note
from clip_benchmark_diffusion.adapter.transform import image_transform
from clip_benchmark_diffusion.families.base import Family
from clip_benchmark_diffusion.families.fast_path import cpu_bf16_note
from clip_benchmark_diffusion.families.model import LoadedModel, load_model
from clip_benchmark_diffusion.registry import ModelSpec, ResolvedModel, resolve
from clip_benchmark_diffusion.results.fetch import RunResults


def load_diffusion_classifier(model_name: str, pretrained: str | None = None, cache_dir: str | None = None,
                              device: str | torch.device = "cuda", resolved: ResolvedModel | None = None):
    """Return ``(model, transform, tokenizer)`` as clip_benchmark's loaders do. ``resolved`` is the run's
    plan's resolution of the same model and weights, so they are not resolved a second time."""
    if resolved is None or not resolved.matches(model_name, pretrained):
        resolved = resolve(model_name, pretrained, cache_dir)
    spec, source = resolved.spec, resolved.source
    dtype = pick_dtype(spec.options.dtype, torch.device(device), spec.family.cuda_dtype)
    for note in (float16_note(spec.family, dtype), cpu_bf16_note(dtype, torch.device(device))):
        if note:
            stderr_note(note)
    loaded = load_model(spec.family, source, dtype, cache_dir=cache_dir, expected_prediction=spec.recipe.prediction_type)
    model = build_classifier(loaded, spec, source.location, device)
    transform = image_transform(loaded.resolution(spec.options), loaded.image_channels)
    return model, transform, model.tokenizer


def build_classifier(loaded: LoadedModel, spec: ModelSpec, weights: str, device: str | torch.device,
                     environ: Mapping[str, str] = os.environ) -> DiffusionClassifier:
    """The classifier of ``loaded`` under ``spec``'s options, placed on this rank's device, and its collaborators."""
    placement = distributed.join(device, environ)
    model = loaded.place(placement.device)
    classes = ClassTable(model, spec.options)
    account = RunAccount(spec, weights, model)
    return DiffusionClassifier(model, spec.options, device=placement.device, rank=placement.world.rank,
                               classes=classes, captions=CaptionSelection(model, classes, account, placement.device),
                               shortlist=TaskShortlist(placement.device), account=account,
                               results=RunResults(placement.world, placement.claimer))


def pick_dtype(name: str, device: torch.device, cuda_default: str = "float16") -> torch.dtype:
    """The denoiser dtype: ``auto`` is the family's CUDA dtype on a GPU and float32 elsewhere."""
    if name == "auto":
        return getattr(torch, cuda_default) if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def float16_note(family: Family, dtype: torch.dtype) -> str | None:
    """A warning for float16 on a family whose default is bfloat16 (T5, FLUX, Gemma overflow in float16).

    Not a refusal: many such checkpoints do run in float16, and one that overflows is stopped at its
    first denoiser batch anyway (non-finite outputs are refused); this says why beforehand."""
    if dtype != torch.float16 or family.cuda_dtype == "float16":
        return None
    return (f"dtype=float16 on a {family.name} model, whose text encoder or denoiser can overflow in float16 "
            f"(the family's default is {family.cuda_dtype}); if scoring stops on NaN or inf, use "
            f"dtype={family.cuda_dtype} or float32")
