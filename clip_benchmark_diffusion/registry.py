"""Model recipes: a name resolving to declarative data, registered through plugins.

Architecture and weights are two axes, as in open_clip: ``--model`` names a recipe (what kind of
model and how to score with it), ``--pretrained`` names the weights (a Hub id, a local diffusers
folder, or a short tag the recipe knows).
"""
from __future__ import annotations

import difflib
import fnmatch
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping

from clip_benchmark_diffusion.errors import UserError
from clip_benchmark_diffusion.options import ScoringOptions, env_overrides, parse_option_source

# Model names with this prefix belong to us even when unknown, so a typo gets our suggestions
# instead of an open_clip "model not found" after the dataset is built.
RESERVED_PREFIX = "diffusion_"
# clip_benchmark's default --pretrained; it means "the recipe's default weights" for our models.
CLIP_BENCHMARK_DEFAULT_PRETRAINED = "laion400m_e32"
OPTION_SEPARATOR = "@"

if TYPE_CHECKING:
    from clip_benchmark_diffusion.families.base import Family
    from clip_benchmark_diffusion.weights import WeightsSource


@dataclass(frozen=True)
class Recipe:
    """A registered diffusion classifier: what to load and how to score with it."""

    # The --model name.
    name: str
    # The registered model family that loads and scores the weights (clip_benchmark_diffusion.families).
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
    # Image side of the default weights in pixels, for list-models (the loaded config decides).
    resolution: int | None = None

    def default_options(self) -> ScoringOptions:
        return ScoringOptions().replace(**dict(self.scoring))

    def resolve_weights(self, pretrained: str | None) -> str:
        """Map --pretrained to a Hub id or folder (tags and clip_benchmark's default handled)."""
        if pretrained in (None, "", "default", CLIP_BENCHMARK_DEFAULT_PRETRAINED):
            return self.default_weights
        return self.weights_tags.get(pretrained, pretrained)

    def objective(self) -> str:
        """What the denoiser predicts: flow families always velocity, VP ones per the recipe (or config)."""
        if get_family(self.family).time == "flow":
            return "flow"
        return self.prediction_type or "from the scheduler config"

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "family": self.family,
            "objective": self.objective(),
            "resolution": self.resolution,
            "default_weights": self.default_weights,
            "weights_tags": dict(self.weights_tags),
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
    # The whole --model value as given (recipe and option source).
    model: str
    # The options --model alone selects (recipe defaults and option source), before the environment's.
    model_options: ScoringOptions

    @property
    def family(self) -> "Family":
        return get_family(self.recipe.family)


@dataclass(frozen=True)
class ResolvedModel:
    """A run's model, resolved once: the parsed ``--model`` and the checked ``--pretrained`` weights.

    The plan of a run carries it to the loader, so the model spec is parsed and the weights
    located (with their Hub reads) once per run.
    """

    spec: ModelSpec
    # --pretrained as given (clip_benchmark's default, a tag, a Hub id or a folder).
    pretrained: str | None
    source: "WeightsSource"

    @property
    def family(self) -> "Family":
        return self.spec.family

    def matches(self, model: str, pretrained: str | None) -> bool:
        """True when this resolution answers ``--model model --pretrained pretrained``."""
        return (model, pretrained) == (self.spec.model, self.pretrained)


def resolve(model: str, pretrained: str | None, cache_dir: str | None = None,
            options: Mapping[str, Any] | None = None) -> ResolvedModel:
    """Parse ``--model``, locate ``--pretrained`` and check that the weights fit the recipe; UserError
    before any weight is read. ``options``: scoring options given in Python (``api.load``'s keywords),
    applied last and checked with the rest."""
    from clip_benchmark_diffusion.weights import locate_weights, training_timesteps

    spec = parse_model_spec(model, options)
    family = spec.family
    source = locate_weights(spec.recipe.resolve_weights(pretrained), cache_dir)
    _check_family(source, family)
    if spec.options.resolution:
        _check_resolution(source, family, spec.options.resolution, cache_dir)
    if family.time == "vp":
        steps = training_timesteps(source, cache_dir)
        if steps is not None and spec.options.max_sample_count > steps:
            raise UserError(f"the scoring options ask for {spec.options.max_sample_count} samples per class, but "
                            f"the model has only {steps} training timesteps; lower n_samples / max_samples "
                            f"to at most {steps}")
    return ResolvedModel(spec=spec, pretrained=pretrained, source=source)


def _check_resolution(source: "WeightsSource", family: "Family", resolution: Any, cache_dir: str | None) -> None:
    """A ``resolution`` the model cannot take is one line before loading, read from its configs."""
    from clip_benchmark_diffusion.weights import read_config

    rule = family.size_rule(source.index, read_config(source, "vae/config.json", cache_dir),
                            read_config(source, f"{family.denoiser}/config.json", cache_dir))
    if rule is not None:
        rule.check(resolution)


def _check_family(source: "WeightsSource", family: "Family") -> None:
    """Refuse a model index that lacks the family's components or belongs to another family."""
    index = source.index
    kind = index.get("_class_name", "this pipeline")
    owner = family_of_pipeline(kind) if isinstance(kind, str) else None
    if owner is not None and owner.name != family.name:
        recipes = [r for r in REGISTRY.names() if REGISTRY.get(r).family == owner.name]
        raise UserError(f"--pretrained {source.location!r} is a {kind} ({owner.name} family), but the recipe is of "
                        f"the {family.name} family; use {' or '.join(recipes[:3]) or 'a recipe of that family'}")
    missing = [c for c in family.required if not (isinstance(index.get(c), list) and index[c] and index[c][0])]
    if missing:
        raise UserError(f"--pretrained {source.location!r} is not a text-to-image diffusion model of the "
                        f"{family.name} family: {kind} has no "
                        f"{', '.join(missing)}; use a pipeline of that family ({family.pipeline})")


class _Registry:
    def __init__(self) -> None:
        self._recipes: dict[str, Recipe] | None = None
        self._families: dict[str, "Family"] | None = None

    def _load(self) -> dict[str, Recipe]:
        if self._recipes is None:
            from clip_benchmark_diffusion.plugins import plugin_manager

            families = _collect(plugin_manager().hook.register_families, "model family")
            recipes = _collect(plugin_manager().hook.register_models, "model recipe")
            for recipe in recipes.values():
                if recipe.family not in families:
                    raise ValueError(f"recipe {recipe.name!r} names the unregistered family {recipe.family!r} "
                                     f"(registered: {', '.join(sorted(families))})")
            self._families, self._recipes = families, recipes
        return self._recipes

    def families(self) -> dict[str, "Family"]:
        self._load()
        assert self._families is not None
        return self._families

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
        """Forget loaded recipes and families (tests that add plugins)."""
        self._recipes = self._families = None


def _collect(hook: Any, kind: str) -> dict[str, Any]:
    """Call a ``register_*`` hook and return ``{item.name: item}``; a name registered twice is a bug."""
    items: dict[str, Any] = {}

    def register(item: Any) -> None:
        if item.name in items:
            raise ValueError(f"{kind} {item.name!r} is registered twice")
        items[item.name] = item

    hook(register=register)
    return items


REGISTRY = _Registry()


def list_models(pattern: str = "*") -> list[str]:
    """Registered recipe names matching a shell-style wildcard, like timm's ``list_models``."""
    return [n for n in REGISTRY.names() if fnmatch.fnmatch(n, pattern)]


def get_recipe(name: str) -> Recipe:
    return REGISTRY.get(name)


def get_family(name: str) -> "Family":
    """The registered family called ``name``."""
    families = REGISTRY.families()
    if name not in families:
        raise UserError(f"unknown model family {name!r}; registered: {', '.join(sorted(families))}")
    return families[name]


def family_of_pipeline(class_name: str) -> "Family | None":
    """The registered family whose diffusers pipeline class is ``class_name``, if any."""
    return next((f for f in REGISTRY.families().values() if f.pipeline == class_name), None)


def is_diffusion_model(model: str) -> bool:
    """True when ``--model`` names one of ours (known, or with our reserved prefix)."""
    base = model.split(OPTION_SEPARATOR, 1)[0]
    return base.startswith(RESERVED_PREFIX) or base in REGISTRY.names()


def parse_model_spec(model: str, overrides: Mapping[str, Any] | None = None) -> ModelSpec:
    """Parse ``RECIPE[@PRESET_OR_JSON_FILE]`` into a recipe and its scoring options (the options
    environment variable applied next, then ``overrides``: options given in Python, which name the model
    as much as ``@source`` does)."""
    base, sep, source = model.partition(OPTION_SEPARATOR)
    recipe = get_recipe(base)
    options = recipe.default_options()
    if sep:
        options = parse_option_source(source, options)
    overrides = dict(overrides or {})
    return ModelSpec(recipe=recipe, options=env_overrides(options).replace(**overrides),
                     option_source=source or None, model=model, model_options=options.replace(**overrides))
