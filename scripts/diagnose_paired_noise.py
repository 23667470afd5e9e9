"""Why one model needs more samples than another to drop a class: the noise in its paired differences.

Reads captures of ``scripts/replay_strategies.py capture`` (each image's classes x samples errors, samples
in the engine's van der Corput order over a sorted grid of noise levels) and prints, per capture:

- the paired differences' spread between noise levels against their spread within one level: the
  variance of d = (challenger - full evaluation's top-1) over all samples (what the anytime rule's pooled
  variance estimates) and half the mean squared difference of neighbouring levels (the successive-difference
  estimator of systematic sampling, which leaves out a smooth trend over t);
- the share of that variance each noise-level band holds, and the gap-to-noise ratio of the hardest pair;
- calls per image of the default rule, split by how hard the image is.

    python scripts/diagnose_paired_noise.py runs/errors_val200.pt runs/flow_errors_val200.pt
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

from clip_benchmark_diffusion.scoring.timesteps import prefix_order


def paired(err: torch.Tensor) -> torch.Tensor:
    """(B, G - 1, N) float64 differences of every other class to full evaluation's top-1, per image."""
    e = err.double()
    top = e.mean(2).argmin(1)                                                        # (B,)
    d = e - e[torch.arange(len(e)), top][:, None, :]                                 # (B, G, N)
    keep = torch.ones(e.shape[:2], dtype=torch.bool)
    keep[torch.arange(len(e)), top] = False
    return d[keep].reshape(len(e), e.shape[1] - 1, e.shape[2])


def level_sorted(d: torch.Tensor) -> torch.Tensor:
    """The same differences with samples sorted by noise level (the grid is ``prefix_order`` of a sorted one)."""
    order = prefix_order(d.shape[-1])                        # sample k sits at sorted position order[k]
    return d[..., torch.argsort(order)]


def report(path: str, replay_calls: np.ndarray | None) -> None:
    data = torch.load(path)
    d = paired(data["err"])                                                          # (B, P, N)
    B, P, N = d.shape
    total = d.var(-1, unbiased=True)                                                 # (B, P)
    ds = level_sorted(d)
    local = ds.diff(dim=-1).pow(2).mean(-1) / 2                                      # (B, P)
    gap = d.mean(-1)                                                                 # (B, P) > 0
    hardest = (gap / total.sqrt()).min(1).values                                     # (B,) smallest z per sample
    print(f"{path}: {B} images, {P + 1} classes, {N} samples; model {data.get('model')}")
    ratio = (total / local).flatten()
    print(f"  variance of paired differences over samples / successive-difference (within-level) variance: "
          f"median {ratio.median():.2f}, quartiles {ratio.quantile(0.25):.2f} to {ratio.quantile(0.75):.2f}")
    print(f"  hardest pair's gap / sd per sample: median {hardest.median():.3f}; "
          f"samples for |S_n| to clear 3 sd: median {float((9 / hardest.clamp(min=1e-9) ** 2).median()):.0f}")
    # Which noise levels carry the variance: five bands of the sorted grid (low to high noise).
    centred = ds - ds.mean(-1, keepdim=True)
    share = centred.pow(2).sum((0, 1))                                                # (N,)
    bands = share.reshape(5, N // 5).sum(1) / share.sum()
    signal = ds.mean((0, 1)).reshape(5, N // 5).mean(1)
    print("  share of the paired-difference variance by noise band (lowest noise first): "
          + ", ".join(f"{100 * b:.0f}%" for b in bands.tolist()))
    print("  mean paired difference by band (x1e3): " + ", ".join(f"{1e3 * s:.2f}" for s in signal.tolist()))
    # Lag-one correlation in the engine's sample order (does the order itself make neighbours alike?).
    x = d - d.mean(-1, keepdim=True)
    lag = (x[..., 1:] * x[..., :-1]).sum(-1) / x.pow(2).sum(-1).clamp(min=1e-30)
    print(f"  lag-one autocorrelation in sample order: median {lag.median():.3f}")
    if replay_calls is not None:
        q = np.quantile(hardest.numpy(), [0.25, 0.5, 0.75])
        groups = np.digitize(hardest.numpy(), q)
        print("  default calls/img by hardest-pair z quartile (hardest first): "
              + ", ".join(f"{replay_calls[groups == i].mean():.0f}" for i in range(4)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("captures", nargs="+")
    p.add_argument("--calls", nargs="*", default=[], help="replay_strategies.py --out JSONs (same order) for calls per image")
    args = p.parse_args()
    import json

    for i, path in enumerate(args.captures):
        calls = None
        if i < len(args.calls):
            rows = json.loads(open(args.calls[i]).read())["rows"]
            calls = np.array(next(iter(rows.values()))["per_image"]["calls"])
        report(path, calls)


if __name__ == "__main__":
    main()
