"""The built-in families: a plugin like any other (``register_families``)."""
from __future__ import annotations

from typing import Callable

from clip_benchmark_diffusion.hookspecs import hookimpl


@hookimpl
def register_families(register: Callable[..., None]) -> None:
    from clip_benchmark_diffusion.families.sd3 import SD3Family
    from clip_benchmark_diffusion.families.sdxl import SDXLFamily
    from clip_benchmark_diffusion.families.stable_diffusion import StableDiffusionFamily

    for family in (StableDiffusionFamily(), SDXLFamily(), SD3Family()):
        register(family)
