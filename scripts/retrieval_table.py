"""Print docs/retrieval.md's table from clip_benchmark retrieval result files: image and text retrieval
recall@1/5/10 with 95% Wilson intervals (scipy.stats), the hybrid's k, its denoiser calls per query
and its wall time.

Usage:
    python scripts/retrieval_table.py runs/table/clip_alone.json runs/table/rerank_k5.json runs/table/rerank_k10.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from scipy.stats import binomtest


def wilson(rate: float, n: int) -> str:
    """``rate`` of ``n`` queries as a percentage with its 95% Wilson interval."""
    hits = round(rate * n)
    ci = binomtest(hits, n).proportion_ci(confidence_level=0.95, method="wilson")
    return f"{100 * hits / n:.1f} [{100 * ci.low:.1f}, {100 * ci.high:.1f}]"


def row(path: Path, images: int, texts: int) -> str:
    result = json.loads(path.read_text())
    m, meta = result["metrics"], result.get("diffusion_classifier", {}).get("retrieval")
    name = "CLIP alone" if meta is None else f"CLIP + diffusion rerank, k = {meta['k']}"
    cells = [wilson(m[f"image_retrieval_recall@{k}"], texts) for k in (1, 5, 10)]
    cells += [wilson(m[f"text_retrieval_recall@{k}"], images) for k in (1, 5, 10)]
    calls = "0 (one image and one text forward each)" if meta is None else f"{m['denoiser_calls_per_query']:.1f}"
    return f"| {name} | " + " | ".join(cells) + f" | {calls} |"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, nargs="+")
    parser.add_argument("--images", type=int, default=100, help="images (text retrieval's queries)")
    parser.add_argument("--texts", type=int, default=500, help="captions (image retrieval's queries)")
    args = parser.parse_args(argv)
    print("| run | image R@1 | image R@5 | image R@10 | text R@1 | text R@5 | text R@10 | denoiser calls per query |")
    print("|---|---|---|---|---|---|---|---|")
    for path in args.results:
        print(row(path, args.images, args.texts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
