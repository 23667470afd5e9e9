"""The before/after Winoground table from ONE stock run's files (issue 24).

Reads the result JSONs and predictions files that ``clip_benchmark eval --dataset winoground`` wrote
with ``CLIP_BENCHMARK_DIFFUSION_DUMP_PREDICTIONS=1``: a diffusion model's predictions keep each
instance's raw pair errors and empty-prompt errors, so its text, image and group scores are
recomputed under every ``caption_normalisation`` (the run's own, clip_benchmark's figures, must be
reproduced exactly: checked); a CLIP run gives its own three figures. 95% Wilson intervals; with
``--examples`` also the group score per instance tag (position swap, colour swap).

    python scripts/winoground_table.py runs/wino100/results --examples runs/wino100/data/fashion_winoground
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from clip_benchmark_diffusion.adapter.caption_selection import normalise_pair_errors
from clip_benchmark_diffusion.compare import accuracy_interval

NAMES = (("text", "text_acc"), ("image", "image_acc"), ("group", "acc"))


def verdicts(errors: torch.Tensor) -> dict[str, list[bool]]:
    """(N, 2, 2) errors, lower = better -> per-instance Winoground verdicts (clip_benchmark's rule)."""
    text = (errors[:, 0, 0] < errors[:, 0, 1]) & (errors[:, 1, 1] < errors[:, 1, 0])
    image = (errors[:, 0, 0] < errors[:, 1, 0]) & (errors[:, 1, 1] < errors[:, 0, 1])
    return {"text": text.tolist(), "image": image.tolist(), "group": (text & image).tolist()}


def cell(ok: list[bool]) -> str:
    a = accuracy_interval(ok)
    return f"{100 * a.value:.1f}% ({100 * a.low:.1f}-{100 * a.high:.1f}) {a.correct}/{a.total}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path)
    parser.add_argument("--examples", type=Path, help="the Winoground folder, for per-tag group scores")
    args = parser.parse_args()
    tags = None
    if args.examples:
        from clip_benchmark_diffusion.integration.winoground_local import read_examples

        tags = [ex.get("tag", "") for ex in read_examples(args.examples)]
    print("| model | scores | text | image | group |\n|---|---|---|---|---|")
    per_tag = []
    for path in sorted(args.results.glob("*.json")):
        result = json.loads(path.read_text())
        rows = [json.loads(x) for x in path.with_suffix(".predictions.jsonl").read_text().splitlines()]
        n = len(rows)
        if "diffusion_classifier" in result:
            pair = torch.tensor([r["pair_errors"] for r in rows])
            uncond = torch.tensor([r["unconditional_errors"] for r in rows])
            own = result["diffusion_classifier"]["caption_selection"]["normalisation"]
            for how in ("none", "difference", "ratio"):
                v = verdicts(normalise_pair_errors(pair, uncond, how))
                if how == own:   # the stock run's own figures, recomputed exactly
                    for name, key in NAMES:
                        assert abs(sum(v[name]) / n - result["metrics"][key]) < 1e-6, (how, name)
                    assert v["group"] == [r["correct"] for r in rows]
                label = {"none": "raw errors (before)", "difference": "minus empty-prompt error (after, default)",
                         "ratio": "over empty-prompt error"}[how]
                print(f"| {result['model']} | {label} | " + " | ".join(cell(v[k]) for k, _ in NAMES) + " |")
                per_tag.append((f"{result['model']} {how}", v["group"]))
            # What the normalisation has to beat: how far apart an instance's two images are under one
            # caption (raw, then normalised) against how far apart one image's two captions are.
            normed = normalise_pair_errors(pair, uncond, "difference")
            gaps = {"images, raw": (pair[:, 0] - pair[:, 1]).abs(), "images, normalised": (normed[:, 0] - normed[:, 1]).abs(),
                    "captions": (pair[:, :, 0] - pair[:, :, 1]).abs()}
            print("|  | median gap (x1e-4): " + ", ".join(f"{k} {1e4 * v.median():.2f}" for k, v in gaps.items()) + " | | | |")
        else:
            cells = []
            for _, key in NAMES:
                k = round(result["metrics"][key] * n)
                cells.append(cell([True] * k + [False] * (n - k)))
            print(f"| {result['model']} | its own | " + " | ".join(cells) + " |")
            per_tag.append((result["model"], [r["correct"] for r in rows]))
    if tags is not None:
        print("\ngroup score per tag:")
        for label, group in per_tag:
            parts = [f"{t}: {cell([g for g, tt in zip(group, tags) if tt == t])}" for t in sorted(set(tags[:len(group)]))]
            print(f"  {label}: " + "; ".join(parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
