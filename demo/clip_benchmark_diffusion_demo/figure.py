"""The demo figure: per-class accuracy of every model, each diffusion model's accuracy against its
cost, and every model's reliability diagram."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from clip_benchmark_diffusion_demo.captions import CLASSNAMES
from clip_benchmark_diffusion.predictions import Run
from clip_benchmark_diffusion.reliability_plot import reliability_panel

COLORS = {"diffusion": "tab:blue", "flow": "tab:green", "clip": "tab:orange"}


def per_class_accuracy(run: Run) -> np.ndarray:
    target, correct = np.array(run.target), np.array(run.correct)
    return np.array([correct[target == c].mean() if (target == c).any() else np.nan
                     for c in range(len(CLASSNAMES))])


def accuracy_by_cost(run: Run, bins: int = 4) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Images grouped into cost quantiles: (mean calls, accuracy, images) per group."""
    calls = np.array(run.denoiser_calls, dtype=float)
    correct = np.array(run.correct)
    edges = np.unique(np.quantile(calls, np.linspace(0, 1, bins + 1)))
    group = np.clip(np.searchsorted(edges, calls, side="right") - 1, 0, len(edges) - 2)
    xs, ys, ns = [], [], []
    for g in range(len(edges) - 1):
        sel = group == g
        if sel.any():
            xs.append(calls[sel].mean()), ys.append(correct[sel].mean()), ns.append(sel.sum())
    return np.array(xs), np.array(ys), np.array(ns)


def draw(res: dict[str, Run], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right, calib) = plt.subplots(1, 3, figsize=(16, 4.2), gridspec_kw={"width_ratios": [1.6, 1, 1]})
    x = np.arange(len(CLASSNAMES))
    kinds = [k for k in ("diffusion", "flow", "clip") if k in res]
    width = 0.8 / len(kinds)
    for i, kind in enumerate(kinds):
        acc = per_class_accuracy(res[kind])
        left.bar(x + (i - (len(kinds) - 1) / 2) * width, 100 * acc, width=width, color=COLORS[kind],
                 label=f"{res[kind].model} ({100 * res[kind].result['metrics']['acc1']:.1f}%)")
    left.set_xticks(x, CLASSNAMES, rotation=30, ha="right")
    left.set_ylabel("top-1 accuracy (%)")
    left.set_ylim(0, 105)
    left.set_title("per-class accuracy, held-out prompts")
    left.legend(loc="upper center", bbox_to_anchor=(0.5, -0.28), ncol=len(kinds), fontsize=8)

    for kind in (k for k in kinds if k != "clip"):
        xs, ys, ns = accuracy_by_cost(res[kind])
        right.plot(xs, 100 * ys, "o-", color=COLORS[kind], label=f"{res[kind].model}, images grouped by cost")
        for xi, yi, ni in zip(xs, ys, ns):
            right.annotate(f"{ni} img", (xi, 100 * yi), textcoords="offset points", xytext=(4, -12), fontsize=7)
        right.axvline(res[kind].result["metrics"]["denoiser_calls_per_image"], color=COLORS[kind], ls=":",
                      label="its mean calls per image")
    right.axhline(100 * res["clip"].result["metrics"]["acc1"], color="tab:orange", ls="--", label="CLIP top-1 (1 forward)")
    right.set_xlabel("denoiser calls per image (quartiles of images by cost)")
    right.set_ylabel("top-1 accuracy (%)")
    right.set_title("diffusion accuracy vs denoiser calls")
    right.legend(fontsize=8)
    reliability_panel(calib, {res[kind].model: res[kind] for kind in kinds})
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
