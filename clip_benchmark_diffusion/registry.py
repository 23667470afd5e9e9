"""Model recipes: a name resolving to declarative data, registered through plugins.

Architecture and weights are two axes, as in open_clip: ``--model`` names a recipe (what kind of
model and how to score with it), ``--pretrained`` names the weights (a Hub id, a local diffusers
folder, or a short tag the recipe knows).
"""
from __future__ import annotations

import difflib
import fnmatch
from dataclasses import dataclass, field
from typing import Any, Mapping

from clip_benchmark_diffusion.errors import UserError
from clip_benchmark_diffusion.options import ScoringOptions, env_overrides, parse_option_source

# Model names with this prefix belong to us even when unknown, so a typo gets our suggestions
# instead of an open_clip "model not found" after the dataset is built.
RESERVED_PREFIX = "diffusion_"
# clip_benchmark's default --pretrained; it means "the recipe's default weights" for our models.
CLIP_BENCHMARK_DEFAULT_PRETRAINED = "laion400m_e32"
OPTION_SEPARATOR = "@"


@dataclass(frozen=True)
class Recipe:
    """A registered diffusion classifier: what to load and how to score with it."""

    # The --model name.
    name: str
    # Which loader family understands the weights ("stable_diffusion": UNet2DCondition + VAE + CLIP text).
    family: str
    # Weights used when --pretrained is clip_benchmark's default or "default": Hub id or folder.
    default_weights: str
    # One line for `clip_benchmark_diffusion list-models`.
    description: str = ""
    # Short --pretrained tags (no "/") mapping to Hub ids or folders.
    weights_tags: Mapping[str, str] = field(default_factory=dict)
    # Overrides of the ScoringOptions defaults for this recipe.
    scoring: Mapping[str, Any] = field(default_factory=dict)
    # Expected prediction type, checked against the scheduler config (None: trust the config).
    prediction_type: str | None = None

    def default_options(self) -> ScoringOptions:
        return ScoringOptions().replace(**dict(self.scoring))

    def resolve_weights(self, pretrained: str | None) -> str:
        """Map --pretrained to a Hub id or folder (tags and clip_benchmark's default handled)."""
        if pretrained in (None, "", "default", CLIP_BENCHMARK_DEFAULT_PRETRAINED):
            return self.default_weights
        return self.weights_tags.get(pretrained, pretrained)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "family": self.family,
            "default_weights": self.default_weights,
            "weights_tags": dict(self.weights_tags),
            "prediction_type": self.prediction_type,
            "description": self.description,
            "scoring": self.default_options().to_dict(),
        }


@dataclass(frozen=True)
class ModelSpec:
    """A parsed ``--model`` value: the recipe and the scoring options it selects."""

    recipe: Recipe
    options: ScoringOptions
    # The text after "@" (preset or options file), or None.
    option_source: str | None


class _Registry:
    def __init__(self) -> None:
        self._recipes: dict[str, Recipe] | None = None

    def _load(self) -> dict[str, Recipe]:
        if self._recipes is None:
            from clip_benchmark_diffusion.plugins import plugin_manager

            recipes: dict[str, Recipe] = {}

            def register(recipe: Recipe) -> None:
                if recipe.name in recipes:
                    raise ValueError(f"model recipe {recipe.name!r} is registered twice")
                recipes[recipe.name] = recipe

            plugin_manager().hook.register_models(register=register)
            self._recipes = recipes
        return self._recipes

    def names(self) -> list[str]:
        return sorted(self._load())

    def get(self, name: str) -> Recipe:
        recipes = self._load()
        if name not in recipes:
            close = difflib.get_close_matches(name, recipes, n=3, cutoff=0.5)
            hint = f"did you mean {', '.join(close)}? " if close else ""
            raise UserError(f"unknown diffusion model {name!r}; {hint}"
                            f"run `clip_benchmark_diffusion list-models` (known: {', '.join(sorted(recipes))})")
        return recipes[name]

    def reset(self) -> None:
        """Forget loaded recipes (tests that add plugins)."""
        self._recipes = None


REGISTRY = _Registry()


def list_models(pattern: str = "*") -> list[str]:
    """Registered recipe names matching a shell-style wildcard, like timm's ``list_models``."""
    return [n for n in REGISTRY.names() if fnmatch.fnmatch(n, pattern)]


def get_recipe(name: str) -> Recipe:
    return REGISTRY.get(name)


def is_diffusion_model(model: str) -> bool:
    """True when ``--model`` names one of ours (known, or with our reserved prefix)."""
    base = model.split(OPTION_SEPARATOR, 1)[0]
    return base.startswith(RESERVED_PREFIX) or base in REGISTRY.names()


def parse_model_spec(model: str) -> ModelSpec:
    """Parse ``RECIPE[@PRESET_OR_JSON_FILE]`` into a recipe and its scoring options."""
    base, sep, source = model.partition(OPTION_SEPARATOR)
    recipe = get_recipe(base)
    options = recipe.default_options()
    if sep:
        options = parse_option_source(source, options)
    return ModelSpec(recipe=recipe, options=env_overrides(options), option_source=source or None)
