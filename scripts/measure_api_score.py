"""How comparable are ``scorer.score``'s pair scores within an image and across images?

On the first N shipped test images (class-interleaved) and the ten class captions, prints the share of
images whose best caption is their own class's (texts compared within one image), and the share of
captions whose best image is of their class (images compared for one text: what retrieval needs).

    python scripts/measure_api_score.py --images 10 --max-samples 20
"""
from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="diffusion_tiny")
    parser.add_argument("--images", type=int, default=10)
    parser.add_argument("--max-samples", type=int, default=20)
    args = parser.parse_args()

    import clip_benchmark_diffusion as cbd
    from clip_benchmark_diffusion_demo import shipped_images
    from clip_benchmark_diffusion_demo.captions import CLASSNAMES

    images, labels = shipped_images(args.images)
    target = torch.tensor([CLASSNAMES.index(name) for name in labels])
    with cbd.load(args.model, store="off", max_samples=args.max_samples) as scorer:
        start = time.perf_counter()
        scores = scorer.score(images, [f"a photo of a {c}." for c in CLASSNAMES])        # (N, 10)
        seconds = time.perf_counter() - start
    per_image = (scores.argmax(1) == target).float().mean().item()
    present = sorted(set(target.tolist()))
    per_caption = sum(int(target[scores[:, c].argmax()] == c) for c in present) / len(present)
    print(f"{args.model}, {args.images} images x 10 captions, {args.max_samples} shared samples, {seconds:.1f} s")
    print(f"each image's best caption is its class's: {per_image:.0%} ({args.images} images)")
    print(f"each caption's best image is of its class: {per_caption:.0%} ({len(present)} captions)")


if __name__ == "__main__":
    main()
