"""The plugin hooks a package implements to add model recipes, families, weights and commands.

A third-party package adds recipes (and model families) with one entry point in the group
``clip_benchmark_diffusion`` that points at a module (or object) defining::

    from clip_benchmark_diffusion import hookimpl, Recipe

    @hookimpl
    def register_models(register):
        register(Recipe(name="diffusion_mymodel", family="stable_diffusion",
                        default_weights="me/my-diffusion-model"))
"""
from __future__ import annotations

from typing import Any, Callable

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


@hookspec(firstresult=True)
def locate_weights(value: str) -> str | None:
    """Return a local model folder for a ``--pretrained`` value this plugin owns (e.g. ``demo:name``), else None.

    The first plugin that answers decides; values no plugin claims are Hub ids, folders or tags.
    """


@hookspec
def register_open_clip_configs(register: Callable[..., None]) -> None:
    """Call ``register(path)`` for each open_clip model config JSON this plugin ships, so the
    architecture is known to open_clip by name (a CLIP to compare with, or a shortlister)."""


@hookspec
def register_commands(subparsers: Any) -> None:
    """Add subcommands to ``clip_benchmark_diffusion`` (``subparsers.add_parser(...)``); each parser
    sets ``func`` (called with the parsed arguments, returning an exit code) with ``set_defaults``."""
