"""Scoring options: one frozen dataclass, written into every result.

The stock ``clip_benchmark`` command accepts no new flags, so options reach the scorer through
the model name: ``--model diffusion_sd2`` uses the recipe's defaults, ``--model
diffusion_sd2@fast`` a named preset, and ``--model diffusion_sd2@path/to/options.json`` a JSON
file of any fields below. The environment variable ``CLIP_BENCHMARK_DIFFUSION_OPTIONS``
(``key=value,key=value``) overrides fields last, for hardware knobs such as ``batch_size``.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from clip_benchmark_diffusion.errors import UserError

OPTIONS_ENV = "CLIP_BENCHMARK_DIFFUSION_OPTIONS"

STRATEGIES = ("full", "staged", "ttest", "anytime")
LOSSES = ("l2", "l1", "huber")
WEIGHTINGS = ("uniform", "native", "elbo", "exp7")
ENSEMBLES = ("error_mean", "embedding_mean")
SAMPLE_NORMS = ("none", "mean")
GUARANTEES = ("expected", "full")
DTYPES = ("auto", "float32", "float16", "bfloat16")
COMPILE_MODES = ("off", "on", "cuda_graphs")   # families/fast_path.py
CHANNELS_LAST = ("auto", "on", "off")
# FLUX.1-dev is used at guidance 1 to 10; far above, its guidance embedding only drives activations
# towards overflow (guidance=inf gave NaN outputs), so a larger number is taken for a typo.
MAX_GUIDANCE = 100.0
CAPTION_NORMALISATIONS = ("difference", "ratio", "none")
PRIOR_CORRECTIONS = ("none", "class_mean")


@dataclass(frozen=True)
class ScoringOptions:
    """How an image is scored against the candidate prompts."""

    # Which evaluation: every candidate on every sample ("full", the reference), Li et al.'s
    # staged pruning ("staged"), Clark & Jaini's paired t-test elimination ("ttest"), or
    # successive elimination with a time-uniform error guarantee ("anytime", the default: in every
    # world of docs/elimination_benchmark.md it kept full evaluation's top-1, with a guarantee the
    # t-test lacks, at 0.86x to 1.2x the t-test's calls; 0.77x on the embedded model).
    strategy: str = "anytime"
    # full: (n,) samples per candidate; staged: samples per stage, nested on one uniform grid.
    n_samples: tuple[int, ...] = (50,)
    # staged only: how many candidates survive each stage (last entry is normally 1).
    to_keep: tuple[int, ...] = ()
    # ttest/anytime: samples every candidate gets before the first test (Clark & Jaini use 20;
    # anytime needs no floor, only enough samples for a pooled variance: 4). Switching strategy
    # resets it to the new strategy's default unless it is given too (``STRATEGY_DEFAULTS``).
    min_samples: int = 4
    # ttest/anytime: stop after this many samples even if several candidates survive.
    max_samples: int = 100
    # ttest: drop a candidate when the one-sided paired t-test against the best has p below this.
    p_value: float = 2e-3
    # anytime: probability of ever dropping the best class (split over the K - 1 pairs with it);
    # the boundary grows only like sqrt(log(K / alpha)), so 0.05 costs little over 0.5.
    alpha: float = 0.05
    # anytime: stop eliminating at this many candidates and score them all on max_samples, so
    # that top-m (clip_benchmark's acc5: 5) ranks the m best on equal evidence; 1 = plain elimination.
    survivors: int = 1
    # anytime: what the guarantee is about. "expected": the class with the lowest expected error
    # survives with probability >= 1 - alpha (Howard et al.'s sequence on i.i.d. samples). "full": the
    # class that full evaluation on the same max_samples samples ranks first survives (Waudby-Smith &
    # Ramdas' sequence for sampling without replacement), so late looks can drop more: the unseen
    # remainder shrinks. Exact for random sample order; the grid's stratified order is measured in
    # docs/elimination_benchmark.md. "full" is the default: it is what a benchmark compares with, and
    # it costs about a fifth fewer calls.
    guarantee: str = "full"
    # anytime: the sample count near which the confidence sequence is tightest (it tunes the normal
    # mixture; every value keeps the guarantee). 12, chosen on both embedded models' validation
    # images (docs/elimination_benchmark.md, session 10): 4-5% fewer calls there than the mixture used before,
    # which was tightest near the 50-sample horizon at ten classes and later still at more.
    tightest_at: float = 12.0
    # Per-sample error between target and prediction; Li et al.: l1 on small datasets, l2 on ImageNet.
    loss: str = "l2"
    # Noise-level weighting, defined on log-SNR so it means the same in every family: uniform (Li:
    # the epsilon error on the model's own time grid), native (the family's training loss), elbo
    # (uniform in log-SNR: the variational bound), exp7 (Clark & Jaini: exp(-7 t) on the x0 error).
    weighting: str = "uniform"
    # Per-sample normalisation: "mean" divides each (t, noise) sample's errors by their mean over the
    # candidates scored on it before any decision, a data-driven weighting that removes the
    # several-fold spread of class gaps over t from the paired differences: sequential strategies
    # stop 3-4x sooner in the synthetic worlds, but diffusion_tiny's full evaluation loses 6.75
    # points under it (docs/elimination_benchmark.md). "none": the weighting alone (Li et al.).
    sample_norm: str = "none"
    # How several prompts of one class make one class score: mean of their errors on the same
    # (t, noise) pairs, or one conditioning from the mean of their text embeddings (1 prompt's cost).
    template_ensemble: str = "error_mean"
    # Seed of the (t, noise) pairs; each image's noise is derived from it and the image content.
    seed: int = 0
    # Denoiser batch size: (image, prompt, timestep) triples packed per forward. 0 ("auto"): on CUDA the
    # largest batch that fits, probed once per model (scoring/batching.py); elsewhere 64.
    batch_size: int = 0
    # Samples of look-ahead used to fill a round's last, partial denoiser batch (0: none). Helps
    # when small batches cost as much as full ones; wastes work on candidates dropped later.
    lookahead: int = 0
    # Denoiser dtype; "auto" is float16 on CUDA, float32 elsewhere. Errors are always float32.
    dtype: str = "auto"
    # -- throughput (issue 27; families/fast_path.py, measured in scripts/benchmark_throughput.py) --
    # torch.compile the denoiser: "on" (inductor, dynamic shapes: one warm-up, reported in the result),
    # "cuda_graphs" (also replays CUDA graphs; CUDA only). Changes float rounding, so it enters the store key.
    compile: str = "off"
    # Channels-last memory for UNet denoisers; "auto": on CUDA only (measured no faster on CPU).
    channels_last: str = "auto"
    # Width of the embedding returned to clip_benchmark: the most classes one run can hold.
    max_classes: int = 1000
    # Image side to score at (0: the model's native resolution). Lower is cheaper (e.g. SDXL at 512).
    resolution: int = 0
    # Tokens read by T5/Gemma encoders (0: the pipeline's default: SD3 256, FLUX 512, PixArt 120/300).
    max_sequence_length: int = 0
    # FLUX.1-dev's distilled guidance input (models without a guidance embedding ignore it).
    guidance: float = 3.5
    # Hybrid: an open_clip architecture that ranks all classes first, so the
    # diffusion model only scores its top shortlist_k ("" = pure diffusion, the leaderboard mode).
    shortlist_model: str = ""
    # hybrid: the shortlister's open_clip weights (a tag such as laion2b_s34b_b79k, or a file).
    shortlist_pretrained: str = ""
    # hybrid: classes passed on per image; top-1 can be right only if the true class is among them.
    shortlist_k: int = 10
    # Per-image class probabilities in the predictions file. 0: the sampling posterior P(best),
    # which needs no data but measures only Monte-Carlo uncertainty. > 0: softmax(-mean error /
    # temperature), CLIP's form with the temperature fitted on held-out validation images, never
    # test labels (scripts/fit_temperature.py), as CLIP's logit scale is learned. Scores do not
    # depend on it, so stored scores stay valid when it changes.
    temperature: float = 0.0
    # With temperature > 0: softmax(-(gap / temperature) ** temperature_power), the power fitted with
    # the temperature on the same validation images (1: plain temperature scaling). Scores do not depend on it.
    temperature_power: float = 1.0
    # Image-caption selection with several images per instance (Winoground): each (image, caption)
    # error made comparable across the instance's images. "difference": minus the image's own
    # unconditional (empty-prompt) error on the same (t, noise) samples, as Diffusion-ITM (Krojer et
    # al. 2023) does, so an image that is simply easy to denoise no longer wins every caption; "ratio":
    # divided by it; "none": raw errors (near-random image scores). A per-image constant cannot reorder
    # one image's captions, so text scores and one-image tasks (SugarCrepe) are the same under all three.
    caption_normalisation: str = "difference"
    # Zero-shot classification, opt-in: "class_mean" subtracts from each class's error its mean over the
    # evaluated images before ranking (label-free; removes a class's constant advantage, the prior
    # bias that sends most predictions to one class). Needs every class scored on the same samples of
    # every image (strategy "full", no shortlist). Applied after scoring: stored scores stay valid.
    # "none" (the default; validation images did not support a change): each image on its own.
    prior_correction: str = "none"

    def __post_init__(self) -> None:
        _check_choice("strategy", self.strategy, STRATEGIES)
        _check_choice("loss", self.loss, LOSSES)
        _check_choice("weighting", self.weighting, WEIGHTINGS)
        _check_choice("template_ensemble", self.template_ensemble, ENSEMBLES)
        _check_choice("sample_norm", self.sample_norm, SAMPLE_NORMS)
        _check_choice("guarantee", self.guarantee, GUARANTEES)
        _check_choice("dtype", self.dtype, DTYPES)
        _check_choice("compile", self.compile, COMPILE_MODES)
        _check_choice("channels_last", self.channels_last, CHANNELS_LAST)
        _check_choice("caption_normalisation", self.caption_normalisation, CAPTION_NORMALISATIONS)
        _check_choice("prior_correction", self.prior_correction, PRIOR_CORRECTIONS)
        if self.prior_correction != "none" and self.strategy != "full":
            # Measured (docs/compositional.md, session 15): under anytime elimination a dropped class's mean
            # error covers its first few (t, noise) samples only, its class mean mixes such means with full
            # ones, and the correction cost diffusion_tiny 28.5 points on validation images.
            raise UserError("prior_correction needs every class scored on the same samples of every image: add "
                            "strategy=full (CLIP_BENCHMARK_DIFFUSION_OPTIONS=strategy=full,prior_correction=class_mean)")
        if self.prior_correction != "none" and self.shortlist_model:
            raise UserError("prior_correction needs every class scored on every image; a shortlist scores only "
                            "shortlist_k of them: drop one of the two options")
        if not self.n_samples or any(n <= 0 for n in self.n_samples):
            raise UserError(f"n_samples must be positive integers, got {list(self.n_samples)}")
        if self.strategy == "staged":
            if len(self.to_keep) != len(self.n_samples):
                raise UserError("staged strategy needs as many to_keep entries as n_samples entries")
            if list(self.n_samples) != sorted(self.n_samples):
                raise UserError(f"staged n_samples must increase, got {list(self.n_samples)}")
        if self.strategy in ("ttest", "anytime") and not 1 < self.min_samples <= self.max_samples:
            raise UserError(f"{self.strategy} needs 1 < min_samples <= max_samples, got min_samples="
                            f"{self.min_samples}, max_samples={self.max_samples}")
        if self.strategy == "staged":
            if any(k <= 0 for k in self.to_keep) or list(self.to_keep) != sorted(self.to_keep, reverse=True):
                raise UserError(f"staged to_keep must be positive and not increase, got {list(self.to_keep)}")
        if not 0 < self.p_value < 1:  # also false for NaN
            raise UserError(f"scoring option p_value={self.p_value!r} must lie strictly between 0 and 1 (e.g. 0.002)")
        if self.strategy == "anytime":
            if not 0 < self.alpha < 1:  # also false for NaN
                raise UserError(f"anytime needs 0 < alpha < 1 (the error level), got alpha={self.alpha}")
            if self.survivors < 1:
                raise UserError(f"anytime needs survivors >= 1, got survivors={self.survivors}")
            if not self.tightest_at > 0:  # also false for NaN
                raise UserError(f"anytime needs tightest_at > 0 (a sample count, e.g. 12), got {self.tightest_at}")
        if self.shortlist_model and (not self.shortlist_pretrained or self.shortlist_k < 1):
            raise UserError("a shortlist needs shortlist_pretrained (the open_clip weights) and shortlist_k >= 1, "
                            f"got shortlist_pretrained={self.shortlist_pretrained!r}, shortlist_k={self.shortlist_k}")
        if self.batch_size < 0 or self.max_classes <= 0:
            raise UserError("batch_size must be 0 (auto) or positive, and max_classes positive")
        if self.lookahead < 0:
            raise UserError(f"scoring option lookahead={self.lookahead} must be 0 or more")
        if not self.temperature >= 0 or self.temperature == float("inf"):  # also catches NaN
            raise UserError(f"scoring option temperature={self.temperature!r} must be 0 (the sampling posterior) "
                            "or a positive number fitted by scripts/fit_temperature.py")
        if not 0 < self.temperature_power < float("inf"):  # also catches NaN
            raise UserError(f"scoring option temperature_power={self.temperature_power!r} must be a positive number "
                            "(1: plain temperature scaling), fitted by scripts/fit_temperature.py")
        if not 0 <= self.guidance <= MAX_GUIDANCE:  # also catches NaN; inf or 1e9 only make FLUX overflow
            raise UserError(f"scoring option guidance={self.guidance!r} must be a number from 0 to {MAX_GUIDANCE:g} "
                            "(FLUX.1-dev's distilled guidance; the default is 3.5)")
        if self.resolution < 0 or self.max_sequence_length < 0:
            raise UserError("resolution and max_sequence_length must be 0 (the model's default) or positive")

    @property
    def max_sample_count(self) -> int:
        """The most (t, noise) samples any candidate can see."""
        return self.max_samples if self.strategy in ("ttest", "anytime") else max(self.n_samples)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
                for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ScoringOptions":
        return cls().replace(**data)

    def replace(self, **changes: Any) -> "ScoringOptions":
        """A copy with ``changes`` applied; unknown names and wrong types are user errors.

        A change of strategy also applies that strategy's ``STRATEGY_DEFAULTS`` for the fields
        ``changes`` does not give: ``strategy=anytime`` alone starts testing at 4 samples, not 20.
        """
        names = {f.name: f for f in dataclasses.fields(self)}
        strategy = changes.get("strategy", self.strategy)
        if strategy != self.strategy:
            changes = {**STRATEGY_DEFAULTS.get(strategy, {}), **changes}
        clean: dict[str, Any] = {}
        for key, value in changes.items():
            if key not in names:
                raise UserError(f"unknown scoring option {key!r}; valid: {', '.join(names)}")
            clean[key] = _coerce(key, value, getattr(self, key))
        return dataclasses.replace(self, **clean)

    def fingerprint_dict(self) -> dict[str, Any]:
        """The fields that change scores (batch size, look-ahead and class capacity do not)."""
        data = self.to_dict()
        data.pop("batch_size")
        data.pop("max_classes")
        data.pop("lookahead")
        for name, off in (("compile", "off"), ("channels_last", "auto")):   # off: keys as before they existed
            if data[name] == off:
                data.pop(name)
        data.pop("temperature")  # only turns stored mean errors into probabilities
        data.pop("temperature_power")
        data.pop("caption_normalisation")  # caption selection is never stored
        data.pop("prior_correction")  # applied to stored mean errors after scoring
        if self.sample_norm == "none":  # keys as before the option existed
            data.pop("sample_norm")
        if self.strategy != "anytime":  # anytime-only fields: older runs' store keys stay valid
            data.pop("alpha")
            data.pop("survivors")
            data.pop("tightest_at")
        if self.strategy != "anytime" or self.guarantee == "expected":  # keys as before the option existed
            data.pop("guarantee")
        if not self.shortlist_model:  # pure diffusion: keys as before shortlists existed
            for name in ("shortlist_model", "shortlist_pretrained", "shortlist_k"):
                data.pop(name)
        return data

    @property
    def shortlist_label(self) -> str | None:
        """How a hybrid names itself in results (None for pure diffusion)."""
        if not self.shortlist_model:
            return None
        return f"hybrid:{self.shortlist_model}/{self.shortlist_pretrained}@top{self.shortlist_k}"


# Per-strategy defaults of shared fields, applied when ``replace`` switches to the strategy.
STRATEGY_DEFAULTS: dict[str, dict[str, Any]] = {
    "ttest": {"min_samples": 20},
    "anytime": {"min_samples": 4},
}


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


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UserError(f"scoring option {name}={value!r} is not one of {', '.join(choices)}")


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
        raise UserError(f"scoring option {key}={value!r} should be like {current!r}") from None


def _integer(value: Any) -> int:
    """An int from an int, integral float or digits; ``true`` and ``3.5`` are mistakes, not 1 and 3."""
    if isinstance(value, bool):
        raise TypeError
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError
        return int(value)
    return int(value)
