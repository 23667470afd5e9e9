"""The plugin hook a package implements to add model recipes.

A third-party package adds recipes (and model families) with one entry point in the group
``clip_benchmark_diffusion`` that points at a module (or object) defining::

    from clip_benchmark_diffusion import hookimpl, Recipe

    @hookimpl
    def register_models(register):
        register(Recipe(name="diffusion_mymodel", family="stable_diffusion",
                        default_weights="me/my-diffusion-model"))
"""
from __future__ import annotations

from typing import Callable

import pluggy

PROJECT = "clip_benchmark_diffusion"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_models(register: Callable[..., None]) -> None:
    """Call ``register(recipe)`` once per :class:`~clip_benchmark_diffusion.registry.Recipe`."""


@hookspec
def register_families(register: Callable[..., None]) -> None:
    """Call ``register(family)`` once per :class:`~clip_benchmark_diffusion.families.base.Family` instance."""
