"""Per-image predictions beside a clip_benchmark result, and paired comparisons read from them.

``clip_benchmark eval`` with ``CLIP_BENCHMARK_DIFFUSION_DUMP_PREDICTIONS=1`` writes, for any model
(diffusion or CLIP), ``<result stem>.predictions.jsonl`` beside the result JSON: one line per image
with the label, the top-5 classes, the top-1 class's probability (``confidence``: CLIP's softmax at
its own logit scale; for diffusion models the posterior probability that the top-1 class has the
lowest expected error, ``scoring.sequential.best_probability``) and (diffusion models) the
denoiser calls spent on it. For image-caption selection (SugarCrepe, Winoground) a line is one
instance: ``target`` 0 (the true caption comes first), ``top5`` the captions ranked for the
instance's first image, and ``correct``, clip_benchmark's own per-instance verdict (each image picks
its caption and each caption its image), which is what its ``acc`` averages; for a diffusion model
also ``pair_errors`` (per image, its error under each caption, unnormalised) and, with several
images per instance, ``unconditional_errors`` (per image, the empty prompt's): every caption
normalisation can be recomputed from one run.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from clip_benchmark_diffusion.errors import UserError
from clip_benchmark_diffusion.partial_files import partial_path, remove_stale_partials

if TYPE_CHECKING:  # scipy is imported only when a comparison is made, not on every evaluation
    from clip_benchmark_diffusion.calibration import Reliability
    from clip_benchmark_diffusion.compare import Accuracy, PairedComparison

PREDICTIONS_ENV = "CLIP_BENCHMARK_DIFFUSION_DUMP_PREDICTIONS"
# The result JSON's field that ties it to its predictions file: the sha256 of that file's bytes, or
# null when the run wrote none. A result rewritten without predictions would otherwise sit beside
# the previous run's file, and ``compare`` would report the old model's accuracy under the new name.
DIGEST_FIELD = "predictions_sha256"


@dataclass(frozen=True)
class Run:
    """One result JSON with its per-image predictions."""

    path: Path
    result: dict
    target: list[int]
    top5: list[list[int]]
    denoiser_calls: list[int | None]
    confidence: list[float | None]   # None in files written before confidences existed
    verdicts: list[bool] | None = None  # caption selection: clip_benchmark's per-instance verdict


    @property
    def model(self) -> str:
        return self.result["model"]

    @property
    def correct(self) -> list[bool]:
        if self.verdicts is not None:
            return list(self.verdicts)
        return [row[0] == t for row, t in zip(self.top5, self.target)]


def predictions_path(result: Path) -> Path:
    return result.with_suffix(".predictions.jsonl")  # not *.json: clip_benchmark build reads those


def file_digest(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def write_predictions(result: Path, target: list[int], top5: list[list[int]],
                      denoiser_calls: list[int | None], confidence: list[float | None] | None = None,
                      correct: list[bool] | None = None, extra: list[dict] | None = None) -> Path:
    """Write the predictions file of ``result`` atomically (a reader never sees half of it); the
    result written after it records its digest (``DIGEST_FIELD``)."""
    path = predictions_path(result)
    remove_stale_partials(path)
    tmp = partial_path(path)
    confidence = confidence if confidence is not None else [None] * len(target)
    rows = [{"target": t, "top5": p, "confidence": q, "denoiser_calls": c}
            for t, p, q, c in zip(target, top5, confidence, denoiser_calls)]
    if correct is not None:
        for row, ok in zip(rows, correct, strict=True):
            row["correct"] = bool(ok)
    if extra is not None:   # per-item fields of one model kind (e.g. a diffusion model's raw pair errors)
        for row, more in zip(rows, extra, strict=True):
            row.update(more)
    tmp.write_text("".join(json.dumps(row) + "\n" for row in rows))
    os.replace(tmp, path)
    return path


def read_run(result: Path) -> Run:
    result = Path(result)
    if not result.is_file():
        raise UserError(f"no result file {result}; pass the JSON written by clip_benchmark eval --output")
    preds = predictions_path(result)
    if not preds.is_file():
        raise UserError(f"no per-image predictions {preds.name} beside {result}; rerun that evaluation with "
                        f"{PREDICTIONS_ENV}=1 (the score store makes a diffusion rerun free)")
    result_data = json.loads(result.read_text())
    _check_tied(result, result_data, preds)
    rows = [json.loads(line) for line in preds.read_text().splitlines() if line.strip()]
    verdicts = [r["correct"] for r in rows] if rows and "correct" in rows[0] else None
    return Run(result, result_data, [r["target"] for r in rows], [r["top5"] for r in rows],
               [r.get("denoiser_calls") for r in rows], [r.get("confidence") for r in rows], verdicts)


def _check_tied(result: Path, data: dict, preds: Path) -> None:
    """The predictions file is the one the result's run wrote (results from before the field: trusted)."""
    if DIGEST_FIELD not in data:
        return
    expected = data[DIGEST_FIELD]
    if expected is None or expected != file_digest(preds):
        why = "was written without predictions" if expected is None else "was rewritten by another run"
        raise UserError(f"{preds.name} beside {result} is left from an earlier run: the result {why}; rerun that "
                        f"evaluation with {PREDICTIONS_ENV}=1 (the score store makes a diffusion rerun free)")


def compare_runs(a: Run, b: Run) -> tuple[Accuracy, Accuracy, PairedComparison]:
    """Intervals of both and the paired test; the two runs must have scored the same images in order."""
    from clip_benchmark_diffusion.compare import accuracy_interval, paired_comparison

    if a.result.get("dataset") != b.result.get("dataset") or a.target != b.target:
        raise UserError(f"{a.path.name} and {b.path.name} did not evaluate the same images in the same order; "
                        "compare runs of one dataset, split and image count")
    return accuracy_interval(a.correct), accuracy_interval(b.correct), paired_comparison(a.correct, b.correct)


def comparison_lines(a: Run, b: Run) -> list[str]:
    """Human-readable summary: each model's top-1 with its 95% interval, then the paired test, then
    calibration (:func:`calibration_lines`)."""
    acc_a, acc_b, paired = compare_runs(a, b)
    label_a, label_b = _labels(a, b)
    lines = [f"{label}: top-1 {100 * acc.value:.2f}% (95% CI {100 * acc.low:.1f}-{100 * acc.high:.1f}, "
             f"{acc.correct}/{acc.total})" for label, acc in ((label_a, acc_a), (label_b, acc_b))]
    lines.append(f"{label_a} - {label_b}: {100 * paired.difference:+.2f} points on the same {paired.total} images; "
                 f"{paired.a_only} right only by the first, {paired.b_only} only by the second; "
                 f"exact McNemar p = {paired.p_value:.3g}")
    return lines + calibration_lines(a, b)


def calibration_lines(a: Run, b: Run) -> list[str]:
    """Each model's expected calibration error and, when both have confidences, their difference
    with a paired bootstrap interval (the runs must hold the same images in the same order)."""
    label_a, label_b = _labels(a, b)
    lines = [f"{label}: expected calibration error {100 * rel.ece:.2f} points (mean top-1 confidence "
             f"{100 * sum(run.confidence) / len(run.confidence):.2f}%, {len(rel.count)} equal-width bins)"
             for label, run in ((label_a, a), (label_b, b)) if (rel := calibration(run)) is not None]
    if calibration(a) is not None and calibration(b) is not None:
        from clip_benchmark_diffusion.calibration import ece_difference

        d = ece_difference(a.confidence, a.correct, b.confidence, b.correct)
        lines.append(f"{label_a} - {label_b}: ECE {100 * d.difference:+.2f} points "
                     f"({100 * d.level:.0f}% paired bootstrap CI {100 * d.low:+.2f} to {100 * d.high:+.2f})")
    return lines


def _labels(a: Run, b: Run) -> tuple[str, str]:
    if a.model == b.model:  # two checkpoints of one recipe: name them by their weights too
        return tuple(f"{run.model} ({run.result.get('pretrained', run.path.stem)})" for run in (a, b))
    return a.model, b.model


def calibration(run: Run) -> Reliability | None:
    """The run's reliability bins, or None when its predictions carry no confidences."""
    from clip_benchmark_diffusion.calibration import reliability

    if not run.confidence or any(c is None for c in run.confidence):
        return None
    return reliability(run.confidence, run.correct)
