"""Reliability diagrams (matplotlib): accuracy against confidence per bin, for one or more runs."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from clip_benchmark_diffusion.predictions import Run, calibration


def reliability_panel(ax: Any, runs: dict[str, Run]) -> None:
    """Draw each labelled run's per-bin accuracy against its mean confidence, with its ECE."""
    ax.plot([0, 1], [0, 1], color="0.6", ls="--", lw=1, label="perfect calibration")
    for label, run in runs.items():
        rel = calibration(run)
        if rel is None:
            continue
        used = rel.count > 0
        ax.plot(rel.confidence[used], rel.accuracy[used], "o-", ms=4,
                label=f"{label} (ECE {100 * rel.ece:.1f} pts)")
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("top-1 confidence (bin mean)")
    ax.set_ylabel("top-1 accuracy in bin")
    ax.set_title("reliability (15 equal-width bins)")
    ax.legend(fontsize=8, loc="upper left")


def draw_reliability(runs: dict[str, Run], path: Path) -> Path:
    """Write a reliability diagram with a histogram of confidences below it to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, hist) = plt.subplots(2, 1, figsize=(5, 6), gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    reliability_panel(top, runs)
    top.set_xlabel("")
    for label, run in runs.items():
        if calibration(run) is not None:
            hist.hist(np.asarray(run.confidence, dtype=float), bins=np.linspace(0, 1, 16), alpha=0.5, label=label)
    hist.set_xlabel("top-1 confidence")
    hist.set_ylabel("images")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
