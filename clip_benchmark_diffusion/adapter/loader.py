"""The loader clip_benchmark calls: ``f(model_name, pretrained, cache_dir, device)``."""
from __future__ import annotations

import torch

from clip_benchmark_diffusion.adapter.model import DiffusionClassifier, pick_dtype
from clip_benchmark_diffusion.adapter.transform import image_transform
from clip_benchmark_diffusion.families.model import load_model
from clip_benchmark_diffusion.registry import parse_model_spec


def load_diffusion_classifier(model_name: str, pretrained: str | None = None, cache_dir: str | None = None,
                              device: str | torch.device = "cuda"):
    """Return ``(model, transform, tokenizer)`` as clip_benchmark's loaders do."""
    spec = parse_model_spec(model_name)
    source = spec.resolve_source(pretrained, cache_dir)
    dtype = pick_dtype(spec.options.dtype, torch.device(device), spec.family.cuda_dtype)
    loaded = load_model(spec.family, source, dtype, cache_dir=cache_dir, expected_prediction=spec.recipe.prediction_type)
    model = DiffusionClassifier(loaded, spec, weights=source.location, device=device)
    transform = image_transform(loaded.resolution(spec.options), loaded.image_channels)
    return model, transform, model.tokenizer
