"""Benchmark: full vs staged (Li et al.) vs t-test (Clark & Jaini) vs anytime-valid elimination.

Runs clip_benchmark's own zero-shot code (classifier, logits, metrics) in-process on a local
webdataset, once per strategy, with the same model, images and (t, noise) pairs, and prints one
table: top-1, denoiser calls per image, seconds per image, the share of wall time spent outside
denoiser forwards, and the mean denoiser batch. Also writes the table as JSON (with each image's
label, top-1, calls and confidence, for scripts/benchmark_elimination.py) and a plot.

    python scripts/benchmark_strategies.py                      # the embedded demo model and data
    python scripts/benchmark_strategies.py --model diffusion_sd2 --pretrained stabilityai/stable-diffusion-2-base \
        --dataset wds/cifar10 --dataset-root /data/cifar10_wds --images 500 --device cuda
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from clip_benchmark_diffusion_demo import DATASET_DIR
from clip_benchmark_diffusion.options import OPTIONS_ENV, ScoringOptions, env_overrides

def strategies(m: int) -> dict[str, dict]:
    """The compared strategies, all with the same budget of at most ``m`` samples per candidate."""
    return {
        "full": dict(strategy="full", n_samples=[m]),
        "staged": dict(strategy="staged", n_samples=[m // 5, m], to_keep=[3, 1]),
        "ttest": dict(strategy="ttest", min_samples=20, max_samples=m, p_value=2e-3),
        "ttest_min10": dict(strategy="ttest", min_samples=10, max_samples=m, p_value=2e-3),
        "ttest_min5": dict(strategy="ttest", min_samples=5, max_samples=m, p_value=2e-3),
        "anytime": dict(strategy="anytime", min_samples=4, max_samples=m, alpha=0.05, survivors=1),
        "anytime_s5": dict(strategy="anytime", min_samples=4, max_samples=m, alpha=0.05, survivors=5),
        # ANCHORS C1: the boundary grows like sqrt(log(K / alpha)); alpha 0.5 is the cheap end.
        "anytime_a50": dict(strategy="anytime", min_samples=4, max_samples=m, alpha=0.5, survivors=1),
    }


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="diffusion_tiny", help="recipe name (options after @ are overridden)")
    p.add_argument("--pretrained", default="default")
    p.add_argument("--dataset", default="wds/fashion_mnist")
    p.add_argument("--dataset-root", default=str(DATASET_DIR))
    p.add_argument("--split", default="test")
    p.add_argument("--images", type=int, default=200, help="first N images of the split")
    p.add_argument("--strategies", default="full,staged,ttest,ttest_min10,anytime,anytime_s5", help=f"comma list of {', '.join(strategies(50))}")
    p.add_argument("--max-samples", type=int, default=50, help="sample budget per candidate for every strategy")
    p.add_argument("--set", default="", help="extra option overrides for every strategy, e.g. 'loss=l1,batch_size=256'")
    p.add_argument("--batch-size", type=int, default=64, help="images per dataloader batch")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="runs/benchmark", help="folder for benchmark.json and benchmark.png")
    return p.parse_args()


def load_images(dataset: str, root: str, split: str, transform, n: int, batch: int):
    from clip_benchmark.datasets.builder import build_dataset

    ds = build_dataset(dataset_name=dataset, root=root, transform=transform, split=split, download=False)
    xs, ys = [], []
    for x, y in ds:
        xs.append(x)
        ys.append(int(y))
        if len(xs) == n:
            break
    x, y = torch.stack(xs), torch.tensor(ys)
    batches = list(zip(x.split(batch), y.split(batch)))
    return batches, ds.classes, ds.templates


def run_strategy(model, tokenizer, options: ScoringOptions, batches, classes, templates, device: str) -> dict:
    from clip_benchmark.metrics import zeroshot_classification as zc

    model.set_options(options)
    model.begin_task("zeroshot_classification", expected_images=sum(len(y) for _, y in batches))
    start = time.perf_counter()
    clf = zc.zero_shot_classifier(model, tokenizer, classes, templates, device)
    logits, target = zc.run_classification(model, clf, batches, device)
    wall = time.perf_counter() - start
    acc1, = zc.accuracy(logits, target, topk=(1,))
    stats = model.engine.stats.as_dict()
    calls = model.image_calls()
    outcomes = [r.outcome for r in model.account.record.results]
    return {
        "per_image": {"target": target.tolist(), "top1": logits.argmax(1).tolist(), "calls": calls,
                      "confidence": [o.confidence for o in outcomes],
                      "target_rank": [int(o.rank[t]) for o, t in zip(outcomes, target.tolist())]},
        "top1": acc1,
        "calls_per_image": sum(calls) / len(calls),
        "calls_per_image_max": max(calls),
        "seconds_per_image": wall / len(calls),
        "share_outside_denoiser": 1 - model.engine.stats.denoiser_seconds / wall,
        "mean_denoiser_batch": stats["mean_denoiser_batch"],
        "batch_size": options.batch_size,
        "options": options.to_dict(),
    }


def plot(rows: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, r in rows.items():
        ax.scatter(r["calls_per_image"], 100 * r["top1"], s=40)
        ax.annotate(name, (r["calls_per_image"], 100 * r["top1"]), textcoords="offset points", xytext=(5, 4))
    ax.set_xscale("log")
    ax.set_xlabel("denoiser calls per image")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    args = parse_args()
    from clip_benchmark_diffusion.adapter.loader import load_diffusion_classifier
    from clip_benchmark_diffusion.integration.clip_benchmark import ensure_installed

    ensure_installed()
    model, transform, tokenizer = load_diffusion_classifier(args.model, args.pretrained, device=args.device)
    model.eval()
    base = env_overrides(model.options, {OPTIONS_ENV: args.set})  # --set reads like the environment variable
    batches, classes, templates = load_images(args.dataset, args.dataset_root, args.split, transform,
                                              args.images, args.batch_size)
    rows = {}
    n = sum(len(y) for _, y in batches)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in args.strategies.split(","):
        options = env_overrides(base.replace(**strategies(args.max_samples)[name]))
        rows[name] = run_strategy(model, tokenizer, options, batches, classes, templates, args.device)
        # After every strategy, so that a long CPU run keeps what it finished.
        (out / "benchmark.json").write_text(json.dumps({"args": vars(args), "images": n, "rows": rows}, indent=2))
    print(f"\n{args.model} ({args.pretrained}) on {n} images of {args.dataset}, device {args.device}, "
          f"denoiser batch {base.batch_size}, {base.template_ensemble}, {len(templates)} templates")
    print(f"{'strategy':<12} {'top-1':>6} {'calls/img':>10} {'max':>6} {'s/img':>7} {'outside':>8} {'mean batch':>11}")
    for name, r in rows.items():
        print(f"{name:<12} {100 * r['top1']:>6.1f} {r['calls_per_image']:>10.0f} {r['calls_per_image_max']:>6d} "
              f"{r['seconds_per_image']:>7.3f} {100 * r['share_outside_denoiser']:>7.1f}% {r['mean_denoiser_batch']:>11.1f}")
    plot(rows, out / "benchmark.png")
    print(f"wrote {out / 'benchmark.json'} and {out / 'benchmark.png'}")


if __name__ == "__main__":
    main()
