"""The run account: what one evaluation scored, what it cost, its progress and its result metadata.

The classifier adds each batch's results here; the lifecycle reads the cost, the per-image
records (predictions, confidences), the closing line and the identity of the run for the result JSON.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from clip_benchmark_diffusion.errors import UserError
from clip_benchmark_diffusion.families.model import LoadedModel
from clip_benchmark_diffusion.options import ScoringOptions
from clip_benchmark_diffusion.progress import Progress, progress_bar
from clip_benchmark_diffusion.registry import ModelSpec
from clip_benchmark_diffusion.results.keys import weights_fingerprint
from clip_benchmark_diffusion.scoring.engine import EngineStats
from clip_benchmark_diffusion.scoring.outcome import ImageResult
from clip_benchmark_diffusion.scoring.timesteps import NoiseGrid


@dataclass
class RunRecord:
    """What one evaluation cost, for the result JSON."""

    calls: list[int] = field(default_factory=list)
    results: list[ImageResult] = field(default_factory=list)
    reused: int = 0          # images whose result came from the score store
    scored_images: int = 0   # images this process scored itself
    scored_calls: int = 0    # denoiser calls this process actually ran

    def add(self, results: list[ImageResult]) -> None:
        self.results.extend(results)
        self.calls.extend(r.denoiser_calls for r in results)

    def confidences(self, temperature: float, power: float = 1.0) -> list[float | None]:
        """Per image, the probability of its top-1 class (``Outcome.top1_probability``)."""
        return [r.outcome.top1_probability(temperature, power) for r in self.results]


class RunAccount:
    """The records of the current task, its progress bar, and the run's identity (spec, weights, model)."""

    def __init__(self, spec: ModelSpec, weights: str, model: LoadedModel) -> None:
        self.spec, self.weights, self.model = spec, weights, model
        self.record = RunRecord()
        self.bar: Progress | None = None
        self.corrected_changes = 0

    def begin(self, expected_images: int | None, progress: bool = True) -> None:
        """A new task: fresh records, and (``progress``) a progress bar over its images."""
        self.record = RunRecord()
        self.corrected_changes = 0
        self.bar = progress_bar(expected_images, "diffusion scoring") if progress else None

    def add(self, results: list[ImageResult], reused: int = 0, scored: int = 0, calls: int = 0) -> None:
        """One batch's results, ``reused`` of them from the store, ``scored`` here at ``calls`` denoiser calls."""
        self.record.add(results)
        self.record.reused += reused
        self.record.scored_images += scored
        self.record.scored_calls += calls

    def advance(self, images: int) -> None:
        """The progress bar counts ``images`` more (classification: the images of each returned batch)."""
        if self.bar is not None:
            self.bar.update(images)

    def heartbeat(self, stats: EngineStats, candidates_left: float) -> None:
        """After each round of the engine. The bar counts images when their batch returns; at many
        classes one batch can run for half an hour before its first image is decided (100 classes x
        64 images on a CPU), so each round also gives the bar a chance to say it is alive
        (``update(0)``: a log line every ``LOG_EVERY_SECONDS``, a tqdm redraw) with the calls so far."""
        if self.bar is not None:
            self.bar.set_postfix(**heartbeat_postfix(stats), cands_left=f"{candidates_left:.1f}", refresh=False)
            self.bar.update(0)

    def cost_summary(self) -> dict[str, float]:
        """Denoiser calls per image (mean, max) and seconds per image, as recorded when each was scored.

        Taken from the per-image records (stored ones included), so a re-run of a finished
        evaluation writes the same numbers; engine efficiency lives in ``engine.stats``.
        """
        calls = self.record.calls or [0]
        seconds = [r.seconds for r in self.record.results] or [0.0]
        return {
            "denoiser_calls_per_image": sum(calls) / len(calls),
            "denoiser_calls_per_image_max": max(calls),
            "seconds_per_image": sum(seconds) / len(seconds),
        }

    def store_line(self, store_path: Any, rank: int) -> str:
        """One line on what the score store saved in this process."""
        where = f" ({store_path})" if store_path is not None else " (store off)"
        return (f"clip_benchmark_diffusion: {self.record.reused} of {len(self.record.results)} images from the score "
                f"store{where}; {self.record.scored_calls} denoiser calls run on rank {rank}")

    def classification_logits(self, logits: torch.Tensor, options: ScoringOptions) -> torch.Tensor:
        """clip_benchmark's (N, G) logits, or with ``prior_correction=class_mean`` the negated errors
        minus each class's mean over this task's images (``prior_bias.class_mean_correction``)."""
        if options.prior_correction == "none":
            return logits
        from clip_benchmark_diffusion.prior_bias import class_mean_correction

        errors = torch.stack([r.outcome.mean_error for r in self.record.results]).double()   # (N, G)
        if errors.shape != logits.shape:
            raise RuntimeError(f"prior correction: {tuple(errors.shape)} errors for {tuple(logits.shape)} logits")
        corrected = -class_mean_correction(errors)
        self.corrected_changes = int((corrected.argmax(1) != logits.argmax(1).to(corrected.device)).sum())
        return corrected.float().to(logits.device)

    def prediction_histogram(self, logits: torch.Tensor, target: torch.Tensor, classnames: list[str] | None,
                             options: ScoringOptions) -> dict:
        from clip_benchmark_diffusion.prior_bias import prediction_histogram

        hist = prediction_histogram(logits.argmax(1), target, classnames, logits.shape[1])
        if options.prior_correction != "none":
            hist["prior_correction"] = {"method": options.prior_correction,
                                        "predictions_changed": self.corrected_changes}
        return hist

    def nonfinite_error(self, what: str, options: ScoringOptions) -> UserError:
        """One line for a denoiser batch with NaN or inf in it, naming what the user can change."""
        dtype = self.model.dtype
        guidance = self.model.metadata(options).get("guidance")
        used = f" at guidance={guidance:g}" if guidance is not None else ""
        fix = ("float16 overflows easily (T5, FLUX, large activations): score with dtype=float32 or bfloat16 "
               "(CLIP_BENCHMARK_DIFFUSION_OPTIONS=dtype=float32)" if dtype == torch.float16 else
               "the checkpoint is diverged or damaged: check the weights"
               + (", or score at a smaller guidance" if guidance is not None else ""))
        return UserError(f"the denoiser of {self.spec.recipe.name} ({self.weights}) returned {what} in "
                         f"{str(dtype).replace('torch.', '')}{used}, so no class can be scored; {fix}")

    def weights_digest(self) -> str:
        """A short content fingerprint of the loaded weights (names a weights folder in results)."""
        return weights_fingerprint(self.model.fingerprint_modules())[:16]

    def metadata(self, options: ScoringOptions, grid: NoiseGrid, model_type: str) -> dict:
        """The identity of this evaluation for the result JSON and leaderboards."""
        from clip_benchmark_diffusion import __version__

        return {
            "recipe": self.spec.recipe.name,
            "option_source": self.spec.option_source,
            "weights": self.weights,
            "model_type": model_type,
            **self.model.metadata(options),
            "prediction_type": self.model.objective,
            "dtype": str(self.model.dtype).replace("torch.", ""),
            "noise_levels": {"weighting": options.weighting, **grid.describe()},
            "scoring": options.to_dict(),
            "hybrid": options.shortlist_label,   # None: pure diffusion
            "package_version": __version__,
        }


def heartbeat_postfix(stats: EngineStats) -> dict[str, str | int]:
    """The cost shown beside the progress: the calls run so far, and calls per image only once images
    are decided (their own calls: the calls of images still in flight are no per-image figure)."""
    cost: dict[str, str | int] = {"calls": stats.denoiser_calls}
    if stats.images:
        cost["calls_per_img"] = f"{stats.decided_calls / stats.images:.0f}"
    return cost
