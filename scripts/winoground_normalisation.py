"""Winoground text, image and group scores of a diffusion model under each caption normalisation,
from ONE scoring pass (issue 24): for choosing ``caption_normalisation`` on validation instances.

Scores every instance of a Winoground-layout folder once (the instance's images on shared (t, noise)
samples, with the empty prompt too), through clip_benchmark's own image-caption selection code
in-process, then recomputes the three scores from the kept pair errors with no normalisation, the
difference and the ratio, each with a 95% Wilson interval. Report test figures from the stock
command; this script is for validation instances (``build_fashion_pairs.py --validation-winoground``).

    python scripts/build_fashion_pairs.py --validation-winoground --out runs/winoground_validation --winoground 100
    python scripts/winoground_normalisation.py --root runs/winoground_validation/fashion_winoground
"""
from __future__ import annotations

import argparse
import json
import time

import torch


def scores(errors: torch.Tensor) -> dict[str, list[bool]]:
    """(N, 2, 2) errors (image, caption; lower = better match) -> per-instance Winoground verdicts."""
    text = (errors[:, 0, 0] < errors[:, 0, 1]) & (errors[:, 1, 1] < errors[:, 1, 0])    # each image picks its caption
    image = (errors[:, 0, 0] < errors[:, 1, 0]) & (errors[:, 1, 1] < errors[:, 0, 1])   # each caption picks its image
    return {"text": text.tolist(), "image": image.tolist(), "group": (text & image).tolist()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True, help="a Winoground-layout folder (examples.jsonl, images/)")
    parser.add_argument("--model", default="diffusion_pairs")
    parser.add_argument("--pretrained", default="default")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="", help="write the figures as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from clip_benchmark_diffusion.integration.clip_benchmark import ensure_installed

    ensure_installed()
    from clip_benchmark.datasets.builder import build_dataset, image_captions_collate_fn
    from clip_benchmark.metrics import image_caption_selection as ics
    from clip_benchmark.models import load_clip

    from clip_benchmark_diffusion.adapter.caption_selection import normalise_pair_errors
    from clip_benchmark_diffusion.compare import accuracy_interval

    model, transform, tokenizer = load_clip("open_clip", args.model, args.pretrained, None, "cpu")
    model.set_options(model.options.replace(caption_normalisation="difference"))  # scores the empty prompt too
    ds = build_dataset("winoground", root=args.root, transform=transform, task="image_caption_selection")
    loader = torch.utils.data.DataLoader(ds, batch_size=args.batch_size, collate_fn=image_captions_collate_fn)
    start = time.perf_counter()
    metrics = ics.evaluate(model, loader, tokenizer, "cpu", amp=True)
    wall = time.perf_counter() - start
    pair, uncond = torch.cat(model.pair_errors), torch.cat(model.unconditional_errors)
    out = {"root": args.root, "instances": len(pair), "wall_s": wall, "stock_metrics_difference": metrics}
    for how in ("none", "difference", "ratio"):
        verdicts = scores(normalise_pair_errors(pair, uncond, how))
        out[how] = {}
        for name, ok in verdicts.items():
            acc = accuracy_interval(ok)
            out[how][name] = {"value": acc.value, "low": acc.low, "high": acc.high, "correct": acc.correct}
        print(f"{how:10s} " + "  ".join(f"{name} {100 * v['value']:5.1f} [{100 * v['low']:4.1f}, {100 * v['high']:4.1f}]"
                                        for name, v in out[how].items()))
    # the in-process clip_benchmark figures under "difference" must be the recomputed ones
    assert abs(metrics["acc"] - out["difference"]["group"]["value"]) < 1e-6, metrics
    print(f"{len(pair)} instances, {wall:.0f} s of scoring")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
