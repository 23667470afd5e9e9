"""Diffusion models as zero-shot classifiers inside LAION's clip_benchmark.

Importing this package is cheap (it runs at interpreter start through the ``.pth`` hook): the
public names below load on first use, and nothing here imports ``typing`` or third-party code.
"""
__version__ = "0.1.0"

_LAZY = {
    "hookimpl": "clip_benchmark_diffusion.hookspecs",
    "Recipe": "clip_benchmark_diffusion.registry",
    "list_models": "clip_benchmark_diffusion.registry",
    "get_recipe": "clip_benchmark_diffusion.registry",
    "ScoringOptions": "clip_benchmark_diffusion.options",
    "UserError": "clip_benchmark_diffusion.errors",
    "load_diffusion_classifier": "clip_benchmark_diffusion.adapter.loader",
    "load": "clip_benchmark_diffusion.api",
    "DiffusionScorer": "clip_benchmark_diffusion.api",
    "Classification": "clip_benchmark_diffusion.api",
}
__all__ = ["__version__", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'clip_benchmark_diffusion' has no attribute {name!r}")
