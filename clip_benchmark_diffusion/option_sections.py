"""The sections of the scoring options: each owns its fields, their defaults and their checks, and
says whether it changes scores (and so enters the score store's key).

A section is a frozen dataclass with a one-line reason per field. ``affects_scores`` decides its
part of the store key (:meth:`Section.fingerprint`): a section that only reads stored scores
(``calibration``) or only decides how fast they are computed (``runtime``) adds nothing, so
changing it reuses stored scores. A field added after runs were stored declares its ``legacy``
value (the behaviour before it existed), at which it stays out of the key: those runs keep
their keys. Strategies' sections live in ``scoring/strategy_options.py``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

from clip_benchmark_diffusion.errors import UserError

LOSSES = ("l2", "l1", "huber")
WEIGHTINGS = ("uniform", "native", "elbo", "exp7")
ENSEMBLES = ("error_mean", "embedding_mean")
SAMPLE_NORMS = ("none", "mean")
DTYPES = ("auto", "float32", "float16", "bfloat16")
COMPILE_MODES = ("off", "on", "cuda_graphs")   # families/fast_path.py
CHANNELS_LAST = ("auto", "on", "off")
ATTENTIONS = ("sdpa", "classic")               # families/fast_path.py
# FLUX.1-dev is used at guidance 1 to 10; far above, its guidance embedding only drives activations
# towards overflow (guidance=inf gave NaN outputs), so a larger number is taken for a typo.
MAX_GUIDANCE = 100.0
CAPTION_NORMALISATIONS = ("difference", "ratio", "none")
PRIOR_CORRECTIONS = ("none", "class_mean")


def legacy(default: Any, value: Any) -> Any:
    """A field with ``default`` that stays out of the store key at ``value`` (its behaviour before it existed)."""
    return field(default=default, metadata={"legacy": value})


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UserError(f"scoring option {name}={value!r} is not one of {', '.join(choices)}")


_NO_LEGACY = object()


def keyed(fields: tuple[dataclasses.Field, ...], value_of: Callable[[str], Any]) -> dict[str, Any]:
    """The store-key entries of ``fields``: each field's plain value, unless it is the field's legacy value."""
    return {f.name: plain(value) for f in fields
            if (value := value_of(f.name)) != f.metadata.get("legacy", _NO_LEGACY)}


def plain(value: Any) -> Any:
    """JSON form of a field value: tuples become lists."""
    return list(value) if isinstance(value, tuple) else value


@dataclass(frozen=True)
class Section:
    """Base of the option sections: validation on construction, the store-key part, plain dicts."""

    # Whether the section's fields change the scores an image gets (and so the store key).
    affects_scores: ClassVar[bool] = True

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Refuse a wrong value with one line (``UserError``)."""

    def fingerprint(self) -> dict[str, Any]:
        """This section's part of the store key: nothing unless it affects scores; no field at its legacy value."""
        if not self.affects_scores:
            return {}
        return keyed(dataclasses.fields(self), lambda name: getattr(self, name))


@dataclass(frozen=True)
class ErrorOptions(Section):
    """What one (image, class, t, noise) sample's error is."""

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
    sample_norm: str = legacy("none", "none")
    # Seed of the (t, noise) pairs; each image's noise is derived from it and the image content.
    seed: int = 0
    # Denoiser dtype; "auto" is float16 on CUDA, float32 elsewhere. Errors are always float32.
    dtype: str = "auto"

    def validate(self) -> None:
        check_choice("loss", self.loss, LOSSES)
        check_choice("weighting", self.weighting, WEIGHTINGS)
        check_choice("sample_norm", self.sample_norm, SAMPLE_NORMS)
        check_choice("dtype", self.dtype, DTYPES)


@dataclass(frozen=True)
class ConditioningOptions(Section):
    """What the denoiser is given besides the noised image: the class's prompts, their encoding, the image side."""

    # How several prompts of one class make one class score: mean of their errors on the same
    # (t, noise) pairs, or one conditioning from the mean of their text embeddings (1 prompt's cost).
    template_ensemble: str = "error_mean"
    # Image side to score at (0: the model's native resolution). Lower is cheaper (e.g. SDXL at 512).
    resolution: int = 0
    # Tokens read by T5/Gemma encoders (0: the pipeline's default: SD3 256, FLUX 512, PixArt 120/300).
    max_sequence_length: int = 0
    # FLUX.1-dev's distilled guidance input (models without a guidance embedding ignore it).
    guidance: float = 3.5

    def validate(self) -> None:
        check_choice("template_ensemble", self.template_ensemble, ENSEMBLES)
        if not 0 <= self.guidance <= MAX_GUIDANCE:  # also catches NaN; inf or 1e9 only make FLUX overflow
            raise UserError(f"scoring option guidance={self.guidance!r} must be a number from 0 to {MAX_GUIDANCE:g} "
                            "(FLUX.1-dev's distilled guidance; the default is 3.5)")
        if self.resolution < 0 or self.max_sequence_length < 0:
            raise UserError("resolution and max_sequence_length must be 0 (the model's default) or positive")


@dataclass(frozen=True)
class RuntimeOptions(Section):
    """How fast and in what shape scores are computed; never what they are."""

    affects_scores: ClassVar[bool] = False

    # Denoiser batch size: (image, prompt, timestep) triples packed per forward. 0 ("auto"): on CUDA the
    # largest batch that fits, probed once per model (scoring/batching.py); elsewhere 64.
    batch_size: int = 0
    # Samples of look-ahead used to fill a round's last, partial denoiser batch (0: none). Helps
    # when small batches cost as much as full ones; wastes work on candidates dropped later.
    lookahead: int = 0
    # Width of the embedding returned to clip_benchmark: the most classes one run can hold.
    max_classes: int = 1000
    # On a CPU, each denoiser batch runs as this many row slices at once, one thread each with an equal
    # share of torch's threads (scoring/batching.py: CpuWorkers); small denoisers' kernels use several
    # threads poorly. 1: one call on all threads. Ignored off the CPU.
    cpu_workers: int = 1

    def validate(self) -> None:
        if self.batch_size < 0 or self.max_classes <= 0:
            raise UserError("batch_size must be 0 (auto) or positive, and max_classes positive")
        if self.cpu_workers < 1:
            raise UserError(f"scoring option cpu_workers={self.cpu_workers} must be 1 (one call on all CPU "
                            "threads) or more")
        if self.lookahead < 0:
            raise UserError(f"scoring option lookahead={self.lookahead} must be 0 or more")


@dataclass(frozen=True)
class FastPathOptions(Section):
    """How the denoiser is run (families/fast_path.py, measured in scripts/benchmark_throughput.py and
    docs/throughput.md). Compiled kernels round floats differently, so a setting other than the one
    before these options existed enters the store key; every setting is recorded in the result."""

    # torch.compile the denoiser: "on" (inductor, static shapes: partial batches are padded to a few
    # sizes, each compiled once; the warm-ups are reported in the result), "cuda_graphs" (also replays
    # CUDA graphs; CUDA only).
    compile: str = legacy("off", "off")
    # Channels-last memory for UNet denoisers; "auto": on CUDA only (measured no faster on CPU).
    channels_last: str = legacy("auto", "auto")
    # Attention kernels: "sdpa" (PyTorch's scaled_dot_product_attention, diffusers' default) or
    # "classic" (diffusers' AttnProcessor: baddbmm, softmax, bmm), faster on CPUs for small heads and
    # under compile=on there (docs/throughput.md). Refused for families whose attention diffusers writes
    # only as SDPA (SD3, FLUX, Sana); in a model with both kinds, the processors with no classic form stay.
    attention: str = legacy("sdpa", "sdpa")

    def validate(self) -> None:
        check_choice("compile", self.compile, COMPILE_MODES)
        check_choice("channels_last", self.channels_last, CHANNELS_LAST)
        check_choice("attention", self.attention, ATTENTIONS)

    def check_device(self, device_type: str) -> None:
        """CUDA graphs off CUDA: one line (the plan calls this with ``--device`` before any weights load)."""
        if self.compile == "cuda_graphs" and device_type != "cuda":
            raise UserError(f"compile=cuda_graphs needs a CUDA device, not {device_type}; use compile=on")

    def check_family(self, family: str, classic_attention: bool) -> None:
        """``attention=classic`` for a family whose attention has no classic form: one line before any
        weights load (the loaded denoiser's processors are checked again when it is applied)."""
        if self.attention == "classic" and not classic_attention:
            raise UserError(f"attention=classic: the {family} family's attention has no classic form in diffusers "
                            "(only SDPA processors); use attention=sdpa")


@dataclass(frozen=True)
class ShortlistOptions(Section):
    """Hybrid scoring: a CLIP model passes each image's likeliest classes on to the diffusion model."""

    # An open_clip architecture that ranks all classes first, so the diffusion model only scores
    # its top shortlist_k ("" = pure diffusion, the leaderboard mode).
    shortlist_model: str = ""
    # The shortlister's open_clip weights (a tag such as laion2b_s34b_b79k, or a file).
    shortlist_pretrained: str = ""
    # Classes passed on per image; top-1 can be right only if the true class is among them.
    shortlist_k: int = 10

    @property
    def enabled(self) -> bool:
        return bool(self.shortlist_model)

    @property
    def label(self) -> str | None:
        """How a hybrid names itself in results (None for pure diffusion)."""
        if not self.enabled:
            return None
        return f"hybrid:{self.shortlist_model}/{self.shortlist_pretrained}@top{self.shortlist_k}"

    def validate(self) -> None:
        if self.enabled and (not self.shortlist_pretrained or self.shortlist_k < 1):
            raise UserError("a shortlist needs shortlist_pretrained (the open_clip weights) and shortlist_k >= 1, "
                            f"got shortlist_pretrained={self.shortlist_pretrained!r}, shortlist_k={self.shortlist_k}")

    def fingerprint(self) -> dict[str, Any]:
        """Pure diffusion scores every class: its keys are those of the runs before shortlists existed."""
        return super().fingerprint() if self.enabled else {}


@dataclass(frozen=True)
class CalibrationOptions(Section):
    """What is made of stored mean errors after scoring: probabilities, caption scores, prior correction."""

    affects_scores: ClassVar[bool] = False

    # Per-image class probabilities in the predictions file. 0: the sampling posterior P(best),
    # which needs no data but measures only Monte-Carlo uncertainty. > 0: softmax(-mean error /
    # temperature), CLIP's form with the temperature fitted on held-out validation images, never
    # test labels (scripts/fit_temperature.py), as CLIP's logit scale is learned.
    temperature: float = 0.0
    # With temperature > 0: softmax(-(gap / temperature) ** temperature_power), the power fitted with
    # the temperature on the same validation images (1: plain temperature scaling).
    temperature_power: float = 1.0
    # Image-caption selection with several images per instance (Winoground): each (image, caption)
    # error made comparable across the instance's images. "difference": minus the image's own
    # unconditional (empty-prompt) error on the same (t, noise) samples, as Diffusion-ITM (Krojer et
    # al. 2023) does, so an image that is simply easy to denoise no longer wins every caption; "ratio":
    # divided by it; "none": raw errors (near-random image scores). A per-image constant cannot reorder
    # one image's captions, so text scores and one-image tasks (SugarCrepe) are the same under all three.
    # Caption selection is never stored.
    caption_normalisation: str = "difference"
    # Zero-shot classification, opt-in: "class_mean" subtracts from each class's error its mean over the
    # evaluated images before ranking (label-free; removes a class's constant advantage, the prior
    # bias that sends most predictions to one class). Needs every class scored on the same samples of
    # every image (strategy "full", no shortlist). "none" (the default; validation images did not
    # support a change): each image on its own.
    prior_correction: str = "none"

    def validate(self) -> None:
        check_choice("caption_normalisation", self.caption_normalisation, CAPTION_NORMALISATIONS)
        check_choice("prior_correction", self.prior_correction, PRIOR_CORRECTIONS)
        if not self.temperature >= 0 or self.temperature == float("inf"):  # also catches NaN
            raise UserError(f"scoring option temperature={self.temperature!r} must be 0 (the sampling posterior) "
                            "or a positive number fitted by scripts/fit_temperature.py")
        if not 0 < self.temperature_power < float("inf"):  # also catches NaN
            raise UserError(f"scoring option temperature_power={self.temperature_power!r} must be a positive number "
                            "(1: plain temperature scaling), fitted by scripts/fit_temperature.py")
