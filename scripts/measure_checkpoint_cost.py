"""What the engine's checkpoints cost at ImageNet scale: seconds of saving per 5 s of compute.

A dataloader batch of ``--images`` images is scored against ``--classes`` classes x ``--templates``
prompts (``template_ensemble=error_mean``: one error per prompt) on up to ``--samples`` noise
levels, so each image's error tensor is (classes, templates, samples). The denoiser is simulated:
every checkpoint interval (5 s) it computes ``--calls-per-s`` x 5 new errors, spread over the
images, in sample order. Each interval the checkpoints are saved into a real score store through
the engine's own save path (``ScoringEngine._save`` and ``StoreCheckpoints``), and timed:

    python scripts/measure_checkpoint_cost.py                   # 64 images, 1,000 x 80, 100 samples
    python scripts/measure_checkpoint_cost.py --whole-tensor    # the format before: every save rewrote
                                                                # each image's whole tensor

Prints the seconds per save of the batch and their share of the 5 s of compute it follows (the
engine stretches the interval when that share passes 5%, so this is the cost before that bound).
One error tensor is shared by all images (the cost of a save does not depend on which values it
holds, and 64 tensors of 32 MB would not fit a small machine).
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from clip_benchmark_diffusion.results.checkpoints import StoreCheckpoints, encode
from clip_benchmark_diffusion.scoring.engine import CHECKPOINT_S, ScoringEngine
from clip_benchmark_diffusion.results.store import ScoreStore


def whole_tensor_save(store: ScoreStore, keys: list[str], cerr: torch.Tensor, calls: int) -> None:
    """The checkpoint save before it became incremental: every active image's whole tensor, each time."""
    for key in keys:
        store.put_partial(key, encode(cerr, calls))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=64, help="images in flight (one dataloader batch)")
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--templates", type=int, default=80)
    p.add_argument("--samples", type=int, default=100, help="noise levels per prompt (the anytime default's max)")
    p.add_argument("--calls-per-s", type=float, default=2000.0,
                   help="simulated denoiser throughput (a fast GPU; more calls means more to save)")
    p.add_argument("--saves", type=int, default=6, help="checkpoint intervals to simulate")
    p.add_argument("--whole-tensor", action="store_true", help="time the format before (whole tensors)")
    args = p.parse_args()

    G, M, N, B = args.classes, args.templates, args.samples, args.images
    cerr = torch.full((G, M, N), float("nan"))
    # every (class, template, sample) in sample order: how the strategies ask for them
    order = torch.stack(torch.meshgrid(torch.arange(G), torch.arange(M), torch.arange(N), indexing="ij"), -1)
    order = order.permute(2, 0, 1, 3).reshape(-1, 3)
    per_image = int(args.calls_per_s * CHECKPOINT_S / B)
    keys = [f"image{i}" for i in range(B)]
    states = [SimpleNamespace(cerr=cerr, calls=0, unsaved=[]) for _ in range(B)]
    engine = ScoringEngine.__new__(ScoringEngine)   # only its save path: no denoiser, no grid
    engine._unsettled, engine.checkpoint_seconds = None, 0.0

    with tempfile.TemporaryDirectory() as tmp, ScoreStore(Path(tmp) / "s.sqlite") as store:
        saver = StoreCheckpoints(store, keys)
        spent: list[float] = []
        done = 0
        for _ in range(args.saves):
            new = order[done : done + per_image]                 # this interval's errors, per image
            cerr[new[:, 0], new[:, 1], new[:, 2]] = torch.rand(len(new))
            done += per_image
            for st in states:
                st.calls, st.unsaved = done, [new]
            t0 = time.perf_counter()
            if args.whole_tensor:
                whole_tensor_save(store, keys, cerr, done)
            else:
                engine._save(states, saver, results={})
            spent.append(time.perf_counter() - t0)
        size = (Path(tmp) / "s.sqlite").stat().st_size + sum(f.stat().st_size for f in Path(tmp).glob("*-wal"))
    mean = sum(spent) / len(spent)
    what = "whole tensors" if args.whole_tensor else "appended rows"
    print(f"{B} images x ({G} classes x {M} templates x {N} samples), {args.calls_per_s:.0f} calls/s, {what}: "
          f"{mean:.3f} s per save of the batch (max {max(spent):.3f} s) = {100 * mean / CHECKPOINT_S:.1f}% of the "
          f"{CHECKPOINT_S:.0f} s of compute it follows; store {size / 1e6:.1f} MB after {args.saves} saves")


if __name__ == "__main__":
    main()
