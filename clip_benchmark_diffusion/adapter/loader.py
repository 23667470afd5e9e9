"""The loader clip_benchmark calls: ``f(model_name, pretrained, cache_dir, device)``."""
from __future__ import annotations

import torch

from clip_benchmark_diffusion.adapter.model import DiffusionClassifier, _pick_dtype
from clip_benchmark_diffusion.adapter.transform import image_transform
from clip_benchmark_diffusion.pipeline import load_components
from clip_benchmark_diffusion.registry import parse_model_spec
from clip_benchmark_diffusion.weights import resolve_weights


def load_diffusion_classifier(model_name: str, pretrained: str | None = None, cache_dir: str | None = None,
                              device: str | torch.device = "cuda"):
    """Return ``(model, transform, tokenizer)`` as clip_benchmark's loaders do."""
    spec = parse_model_spec(model_name)
    source = resolve_weights(spec.recipe.resolve_weights(pretrained))
    dtype = _pick_dtype(spec.options.dtype, torch.device(device))
    components = load_components(source, dtype, cache_dir=cache_dir,
                                 expected_prediction=spec.recipe.prediction_type)
    model = DiffusionClassifier(components, spec, weights=source.location, device=device)
    transform = image_transform(components.resolution, components.image_channels)
    return model, transform, model.tokenizer
