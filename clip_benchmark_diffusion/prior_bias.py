"""When one class takes the predictions: the predicted-class histogram, one warning line, and the
opt-in label-free correction (``prior_correction=class_mean``).

A port that gets a convention slightly wrong (timestep scale, shift, guidance) rarely fails loudly:
its errors acquire a class-dependent offset and most images go to one class (a public flow-model
report sent 71% of its predictions to one class). The histogram goes into every diffusion result,
and a warning names the class when its share of predictions is far above its share of the images.
"""
from __future__ import annotations

import math

import torch

# Warn when a class takes more than this many times its expected share of predictions ...
OVERSHARE = 3.0
# ... on at least this many images (fewer cannot tell bias from chance).
MIN_IMAGES = 50
FIX_HINT = ("check the recipe's conventions against diffusers' pipeline (prediction type, timestep scale, shift), "
            "or try the label-free correction CLIP_BENCHMARK_DIFFUSION_OPTIONS=strategy=full,prior_correction=class_mean")


def prediction_histogram(pred: torch.Tensor, target: torch.Tensor | None, classnames: list[str] | None,
                         n_classes: int) -> dict:
    """Counts of predicted classes, the most predicted class and its share, and the entropy.

    ``expected_share`` of the top class is its share of the labels, at least 1/G: a class the
    labels make common is no sign of bias, and a label-free 1/G floor keeps rare classes honest.
    """
    n = len(pred)
    counts = torch.bincount(pred.long().cpu(), minlength=n_classes)[:n_classes]
    top = int(counts.argmax()) if n else 0
    share = float(counts[top]) / n if n else 0.0
    p = counts.double() / max(n, 1)
    entropy = float(-(p[p > 0] * p[p > 0].log2()).sum())
    label_share = float((target.cpu() == top).double().mean()) if target is not None and target.dim() == 1 and n else 0.0
    expected = max(label_share, 1.0 / n_classes)
    return {
        "images": n,
        "counts": counts.tolist(),
        "top_class": top,
        "top_class_name": classnames[top] if classnames is not None and top < len(classnames) else None,
        "top_share": share,
        "expected_share": expected,
        "entropy_bits": entropy,
        "max_entropy_bits": math.log2(n_classes) if n_classes > 1 else 0.0,
    }


def bias_warning(hist: dict) -> str | None:
    """One line when the top class takes over ``OVERSHARE`` x its expected share on >= ``MIN_IMAGES`` images."""
    if hist["images"] < MIN_IMAGES or hist["top_share"] <= OVERSHARE * hist["expected_share"]:
        return None
    name = hist["top_class_name"] if hist["top_class_name"] is not None else f"#{hist['top_class']}"
    return (f"clip_benchmark_diffusion: warning: class {name!r} takes {100 * hist['top_share']:.0f}% of the "
            f"{hist['images']} predictions, {hist['top_share'] / hist['expected_share']:.1f}x its expected "
            f"{100 * hist['expected_share']:.0f}%: the model prefers it whatever the image; {FIX_HINT}")


def class_mean_correction(mean_errors: torch.Tensor) -> torch.Tensor:
    """(N, G) per-image class errors -> each minus its class's mean over the N images (lower is better).

    A class whose prompt is easy to denoise with on any image (a constant offset in its errors) wins
    images it should not; subtracting its mean over the evaluated images removes the offset without
    labels. It is transductive: an image's call depends on the other images evaluated with it.
    """
    if torch.isnan(mean_errors).any():
        raise ValueError("prior correction needs every class's error on every image")
    return mean_errors - mean_errors.mean(0, keepdim=True)
