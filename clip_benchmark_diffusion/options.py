"""Scoring options: sections that own their fields, read and written by flat names, recorded in every result.

The stock ``clip_benchmark`` command accepts no new flags, so options reach the scorer through
the model name: ``--model diffusion_sd2`` uses the recipe's defaults, ``--model
diffusion_sd2@fast`` a named preset, and ``--model diffusion_sd2@path/to/options.json`` a JSON
file of any options. The environment variable ``CLIP_BENCHMARK_DIFFUSION_OPTIONS``
(``key=value,key=value``) overrides options last, for hardware knobs such as ``batch_size``.

Every option is a field of one section, by the same flat name in all of these: a strategy's own
config (``scoring/strategy_options.py``) or one of ``option_sections.py``'s. A section says
whether it changes scores; the score store's key is the fingerprint of those that do.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

from clip_benchmark_diffusion.errors import UserError
from clip_benchmark_diffusion.option_sections import (
    CalibrationOptions,
    ConditioningOptions,
    ErrorOptions,
    FastPathOptions,
    RuntimeOptions,
    Section,
    ShortlistOptions,
    plain,
)
from clip_benchmark_diffusion.scoring.strategy_options import (
    DEFAULT_STRATEGY,
    StrategyConfig,
    StrategySection,
    pool_defaults,
    strategy_fields,
    switch_defaults,
)

OPTIONS_ENV = "CLIP_BENCHMARK_DIFFUSION_OPTIONS"

# The sections besides the strategy's, by attribute name; each owns its fields (option_sections.py).
SECTIONS: dict[str, type[Section]] = {
    "error": ErrorOptions,
    "conditioning": ConditioningOptions,
    "runtime": RuntimeOptions,
    "fast_path": FastPathOptions,
    "shortlist": ShortlistOptions,
    "calibration": CalibrationOptions,
}
STRATEGY_SECTION = "strategy_section"


def option_owners() -> Mapping[str, str]:
    """Every option name (the flat ``key=value`` names) -> the attribute of the section that owns it."""
    return _owners(tuple(strategy_fields()))


@lru_cache(maxsize=16)
def _owners(strategy_names: tuple[str, ...]) -> Mapping[str, str]:
    owners = {"strategy": STRATEGY_SECTION, **{name: STRATEGY_SECTION for name in strategy_names}}
    for attr, cls in SECTIONS.items():
        owners.update({f.name: attr for f in dataclasses.fields(cls)})
    return MappingProxyType(owners)


@dataclass(frozen=True, init=False)
class ScoringOptions:
    """How an image is scored against the candidate prompts: one section per concern.

    Built from the flat option names (``ScoringOptions(strategy="full", n_samples=(50,))``), which
    also read through (``options.n_samples``): the syntax users write and results record.
    """

    # Which strategy runs, and every strategy's settings (scoring/strategy_options.py).
    strategy_section: StrategySection
    error: ErrorOptions
    conditioning: ConditioningOptions
    runtime: RuntimeOptions
    fast_path: FastPathOptions
    shortlist: ShortlistOptions
    calibration: CalibrationOptions

    def __init__(self, **values: Any) -> None:
        owners = option_owners()
        unknown = sorted(set(values) - set(owners))
        if unknown:
            raise TypeError(f"ScoringOptions got unknown options {unknown}")
        pool = pool_defaults()
        parts: dict[str, dict[str, Any]] = {attr: {} for attr in SECTIONS}
        for key, value in values.items():
            if key == "strategy":
                continue
            (pool if owners[key] == STRATEGY_SECTION else parts[owners[key]])[key] = value
        object.__setattr__(self, STRATEGY_SECTION,
                           StrategySection(values.get("strategy", DEFAULT_STRATEGY), tuple(pool.items())))
        for attr, cls in SECTIONS.items():
            object.__setattr__(self, attr, cls(**parts[attr]))
        self._check_across_sections()

    def _check_across_sections(self) -> None:
        if self.calibration.prior_correction != "none" and self.strategy_section.name != "full":
            # Measured (docs/compositional.md, session 15): under anytime elimination a dropped class's mean
            # error covers its first few (t, noise) samples only, its class mean mixes such means with full
            # ones, and the correction cost diffusion_tiny 28.5 points on validation images.
            raise UserError("prior_correction needs every class scored on the same samples of every image: add "
                            "strategy=full (CLIP_BENCHMARK_DIFFUSION_OPTIONS=strategy=full,prior_correction=class_mean)")
        if self.runtime.cpu_workers > 1 and self.fast_path.compile != "off":
            # a compiled module is not called from several threads at once (dynamo's guards and caches)
            raise UserError(f"cpu_workers={self.runtime.cpu_workers} runs the denoiser from several threads, which a "
                            f"compiled denoiser does not support: drop compile={self.fast_path.compile} or set cpu_workers=1")
        if self.calibration.prior_correction != "none" and self.shortlist.enabled:
            raise UserError("prior_correction needs every class scored on every image; a shortlist scores only "
                            "shortlist_k of them: drop one of the two options")

    def __getattr__(self, name: str) -> Any:
        """Flat read access (``options.n_samples``), delegated to the section that owns the name."""
        owner = option_owners().get(name)
        if owner is None:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        section = object.__getattribute__(self, owner)
        if owner != STRATEGY_SECTION:
            return getattr(section, name)
        return section.name if name == "strategy" else section.value(name)

    @property
    def strategy_config(self) -> StrategyConfig:
        """The selected strategy's own options."""
        return self.strategy_section.config

    @property
    def max_sample_count(self) -> int:
        """The most (t, noise) samples any candidate can see."""
        return self.strategy_config.max_sample_count

    @property
    def shortlist_label(self) -> str | None:
        """How a hybrid names itself in results (None for pure diffusion)."""
        return self.shortlist.label

    def _values(self) -> dict[str, Any]:
        """Every option by its flat name, as held (tuples stay tuples)."""
        out = {"strategy": self.strategy_section.name, **dict(self.strategy_section.values)}
        for attr in SECTIONS:
            section = getattr(self, attr)
            out.update({f.name: getattr(section, f.name) for f in dataclasses.fields(section)})
        return out

    def to_dict(self) -> dict[str, Any]:
        """Every option by its flat name, JSON-ready (what results record)."""
        return {name: plain(value) for name, value in self._values().items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ScoringOptions":
        return cls().replace(**data)

    def replace(self, **changes: Any) -> "ScoringOptions":
        """A copy with ``changes`` applied; unknown names and wrong types are user errors.

        A change of strategy also resets the fields whose default is that strategy's own
        (``strategy_options.switch_defaults``) unless ``changes`` gives them:
        ``strategy=anytime`` alone starts testing at 4 samples, not 20.
        """
        names = option_owners()
        current = self._values()
        strategy = changes.get("strategy", self.strategy_section.name)
        if strategy != self.strategy_section.name:
            changes = {**switch_defaults(strategy), **changes}
        clean: dict[str, Any] = {}
        for key, value in changes.items():
            if key not in names:
                raise UserError(f"unknown scoring option {key!r}; valid: {', '.join(names)}")
            clean[key] = _coerce(key, value, current[key])
        return ScoringOptions(**{**current, **clean})

    def fingerprint_dict(self) -> dict[str, Any]:
        """What changes scores, so keys the score store: the strategy's part and every section
        that affects scores (batch size, look-ahead, class capacity and calibration do not)."""
        out = self.strategy_section.fingerprint()
        for attr in SECTIONS:
            out.update(getattr(self, attr).fingerprint())
        return out


PRESETS: dict[str, dict[str, Any]] = {
    # Clark & Jaini's paired t-test elimination (the default before anytime replaced it).
    "fast": {"strategy": "ttest", "min_samples": 20, "max_samples": 100, "p_value": 2e-3},
    # Anytime-valid successive elimination from 4 samples: the class with the lowest expected error
    # survives with probability >= 95% at any stopping time (the default's guarantee is "full").
    "anytime": {"strategy": "anytime", "min_samples": 4, "max_samples": 100, "alpha": 0.05, "survivors": 1,
                "guarantee": "expected"},
    # Every candidate on every one of 50 samples: the reference the fast strategies are measured against.
    "full": {"strategy": "full", "n_samples": [50]},
    # Li et al.'s small-dataset schedule (CIFAR-10 / STL-10 / Pets): 50 then 500 samples.
    "li2023": {"strategy": "staged", "n_samples": [50, 500], "to_keep": [5, 1], "loss": "l1"},
}


def parse_option_source(source: str, base: ScoringOptions) -> ScoringOptions:
    """Apply ``source`` (a preset name or a JSON file path) on top of ``base``."""
    if source in PRESETS:
        return base.replace(**PRESETS[source])
    path = Path(source)
    if path.suffix == ".json" or path.exists():
        if not path.is_file():
            raise UserError(f"scoring options file {source!r} does not exist; "
                            f"give a JSON file or a preset ({', '.join(PRESETS)})")
        try:
            data = json.loads(path.read_text(encoding="utf-8-sig"))  # a BOM (Notepad's) is no JSON error
        except UnicodeDecodeError:
            raise UserError(f"scoring options file {source!r} is not UTF-8 text; save it as UTF-8 JSON") from None
        except (OSError, json.JSONDecodeError) as exc:
            raise UserError(f"scoring options file {source!r} is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise UserError(f"scoring options file {source!r} must hold a JSON object")
        data = data.get("scoring", data)
        if not isinstance(data, dict):
            raise UserError(f"the 'scoring' entry of {source!r} must be a JSON object of options, "
                            f"not {type(data).__name__}")
        return base.replace(**{k: v for k, v in data.items() if not k.startswith("_")})
    raise UserError(f"unknown scoring preset {source!r}; presets: {', '.join(PRESETS)} "
                    "(or give a path to a JSON options file)")


def env_overrides(base: ScoringOptions, environ: Mapping[str, str] = os.environ) -> ScoringOptions:
    """Apply ``CLIP_BENCHMARK_DIFFUSION_OPTIONS=key=value,...`` on top of ``base``."""
    raw = environ.get(OPTIONS_ENV, "").strip()
    if not raw:
        return base
    changes: dict[str, Any] = {}
    for item in raw.split(","):
        if not item.strip():
            continue  # a trailing or doubled comma
        key, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"{OPTIONS_ENV} must look like 'batch_size=32,dtype=float16', got {item!r}")
        changes[key.strip()] = value.strip()
    return base.replace(**changes)


def _coerce(key: str, value: Any, current: Any) -> Any:
    """Turn JSON or ``key=value`` text into the field's type; refuse what would change meaning."""
    try:
        if isinstance(current, tuple):
            items = value.replace("+", " ").split() if isinstance(value, str) else list(value)
            return tuple(_integer(v) for v in items)
        if isinstance(current, bool):
            return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")
        if isinstance(current, int):
            return 0 if key == "batch_size" and value == "auto" else _integer(value)
        if isinstance(current, float):
            if isinstance(value, bool):  # JSON true is not 1.0
                raise TypeError
            return float(value)
        if not isinstance(value, str):  # str(5) would be a valid-looking choice name
            raise TypeError
        return value
    except (TypeError, ValueError):
        example = "64 or auto" if key == "batch_size" else repr(current)   # 0 is how auto is stored
        raise UserError(f"scoring option {key}={value!r} should be like {example}") from None


def _integer(value: Any) -> int:
    """An int from an int, integral float or digits; ``true`` and ``3.5`` are mistakes, not 1 and 3."""
    if isinstance(value, bool):
        raise TypeError
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError
        return int(value)
    return int(value)
