"""Benchmark the elimination strategies against the Bayes limit, and on the shipped 10-class model.

Synthetic world (exact): class g is x0 ~ N(mu_g, I) in D >= K dimensions with equidistant
orthogonal means mu_g = delta e_g. The Bayes-optimal denoiser for class g is exact,
eps_hat = b (x_t - a mu_g) with x_t = a x0 + b eps (tests/analytic_denoiser.py's "gaussian" oracle),
and its expected error at every t is a^4 D + a^2 b^2 |x0 - mu_g|^2, so the diffusion classifier with
infinitely many samples *is* the Bayes classifier (nearest mean). Its accuracy is known in closed
form, P(correct) = int phi(z) Phi(z + delta)^(K - 1) dz, and delta is solved for a chosen Bayes
accuracy. Every strategy runs through the real scoring engine on the same images and the same
(t, noise) pairs; calls are the engine's count.

Shipped model: reads the JSON of scripts/benchmark_strategies.py (clip_benchmark's own zero-shot
code on the shipped Fashion-MNIST images with held-out templates), which holds each image's result.

    python scripts/benchmark_strategies.py --images 500 --out runs/bench_real     # shipped model
    python scripts/benchmark_elimination.py --real runs/bench_real/benchmark.json --out docs
"""
from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import integrate, optimize, stats

from clip_benchmark_diffusion.calibration import reliability
from clip_benchmark_diffusion.options import ScoringOptions
from clip_benchmark_diffusion.predictions import read_run
from clip_benchmark_diffusion.scoring.engine import Candidates, ScoringEngine
from clip_benchmark_diffusion.scoring.outcome import ImageResult
from clip_benchmark_diffusion.scoring.timesteps import vp_grid


def bayes_accuracy(num_classes: int, delta: float) -> float:
    """P(correct) of the Bayes classifier for K unit-variance Gaussians with means delta e_g."""
    f = lambda z: stats.norm.pdf(z) * stats.norm.cdf(z + delta) ** (num_classes - 1)  # noqa: E731
    return integrate.quad(f, -np.inf, np.inf, epsabs=1e-12)[0]


def separation_for(num_classes: int, accuracy: float) -> float:
    """The delta at which the Bayes accuracy with ``num_classes`` classes is ``accuracy``."""
    return optimize.brentq(lambda d: bayes_accuracy(num_classes, d) - accuracy, 0.0, 20.0, xtol=1e-10)


@dataclass(frozen=True)
class World:
    num_classes: int
    dims: int
    delta: float

    @property
    def means(self) -> torch.Tensor:
        mu = torch.zeros(self.num_classes, 1, 1, self.dims)                 # (K, C, H, W) with C = H = 1
        mu[torch.arange(self.num_classes), 0, 0, torch.arange(self.num_classes)] = self.delta
        return mu

    def images(self, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(n, 1, 1, D) clean images and their (n,) labels, balanced over classes."""
        g = torch.Generator().manual_seed(seed)
        labels = torch.arange(n) % self.num_classes
        return self.means[labels] + torch.randn(n, 1, 1, self.dims, generator=g), labels


def alphas_cumprod() -> torch.Tensor:
    """DDPM's linear betas (1e-4 to 0.02 over 1,000 steps), as in tests/analytic_denoiser.py."""
    return torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)


def score(world: World, options: ScoringOptions, x0: torch.Tensor, seeds: list[int],
          allowed: torch.Tensor | None = None) -> list[ImageResult]:
    """Run the scoring engine with the Bayes-optimal denoiser: the only code that calls it."""
    def denoise(x_t: torch.Tensor, levels, cond: dict) -> torch.Tensor:
        # x_t = a x0 + b eps with a^2 + b^2 = 1; for x0 ~ N(mu, I), E[eps | x_t] = b (x_t - a mu).
        a, b = levels.a[:, None, None, None], levels.b[:, None, None, None]
        return b * (x_t - a * cond["mean"].reshape(x_t.shape))

    grid = vp_grid(alphas_cumprod(), options.max_sample_count, options.weighting)
    engine = ScoringEngine(denoise, grid, "epsilon", options, "cpu")
    cands = Candidates(cond={"mean": world.means.reshape(world.num_classes, -1)},
                       members=torch.arange(world.num_classes)[:, None])
    return engine.score(x0, seeds, cands, allowed=allowed)


def shortlister_noise(num_classes: int, delta: float, accuracy: float) -> float:
    """sigma of a weaker classifier that scores class g by x0_g + sigma * xi (xi ~ N(0, I)): the
    nearest-mean rule at separation delta / sqrt(1 + sigma^2), solved for top-1 ``accuracy``."""
    return float(optimize.brentq(lambda s: bayes_accuracy(num_classes, delta / math.sqrt(1 + s * s)) - accuracy,
                                 0.0, 50.0))


def run_hybrid(world: World, images: int, n: int, strategy: str, ks: list[int], accuracy: float, chunk: int,
               seed: int) -> dict:
    """The CLIP-shortlist hybrid in the synthetic world: a weaker classifier (top-1 ``accuracy``)
    ranks all classes, the diffusion classifier decides among its top k (the engine's ``allowed``),
    the rest keep the shortlister's order (the package's own ``shortlist_mask``/``merge_ranks``)."""
    from clip_benchmark_diffusion.adapter import shortlist as sl

    x0, labels = world.images(images, seed)
    sigma = shortlister_noise(world.num_classes, world.delta, accuracy)
    g = torch.Generator().manual_seed(seed + 7)
    scores = x0.flatten(1)[:, : world.num_classes] + sigma * torch.randn(images, world.num_classes, generator=g)
    seeds = list(range(seed * 1_000_000, seed * 1_000_000 + images))
    opts = ScoringOptions(batch_size=8192).replace(**strategies(world.num_classes, n)[strategy])
    out = {"classes": world.num_classes, "images": images, "strategy": strategy, "shortlister_sigma": sigma,
           "shortlister_top1": float((scores.argmax(1) == labels).float().mean()), "rows": {}}
    for k in ks:
        allowed = sl.shortlist_mask(scores, k)
        res = [r for i in range(0, images, chunk)
               for r in score(world, opts, x0[i:i + chunk], seeds[i:i + chunk], allowed[i:i + chunk])]
        rank = sl.merge_ranks(torch.stack([r.outcome.rank for r in res]), allowed, scores)
        out["rows"][k] = {"top1": float((rank.argmin(1) == labels).float().mean()),
                          "recall": sl.recall_at_k(allowed, labels),
                          "calls": float(np.mean([r.denoiser_calls for r in res])),
                          "calls_max": int(max(r.denoiser_calls for r in res))}
        print(f"  K={world.num_classes} hybrid top-{k} ({strategy}): top-1 {100 * out['rows'][k]['top1']:.1f}% "
              f"recall {100 * out['rows'][k]['recall']:.1f}% calls {out['rows'][k]['calls']:.0f}", flush=True)
    return out


# Sift-and-Refine's threshold per synthetic class count, chosen by ``--sift-sweep`` on images of the same world
# drawn with another seed (the cheapest threshold that lost nothing against full evaluation there).
# K = 10, 200 images of seed 2001: 0.5 -> 4 differ, 1 -> 1, 1.5 -> 0 (0.346x full's calls), 2 -> 0 (0.432x).
SIFT_THRESHOLD: dict[int, float] = {10: 1.5}


def run_sift_sweep(world: World, images: int, n: int, thresholds: list[float], chunk: int, seed: int) -> None:
    """Sift-and-Refine at each threshold against full evaluation, on images the tables never use (seed + 2000)."""
    x0, labels = world.images(images, seed + 2000)
    seeds = list(range((seed + 2000) * 1_000_000, (seed + 2000) * 1_000_000 + images))

    def top1_calls(opts: ScoringOptions) -> tuple[np.ndarray, float]:
        res = [r for i in range(0, images, chunk) for r in score(world, opts, x0[i:i + chunk], seeds[i:i + chunk])]
        return np.array([int(r.outcome.rank.argmin()) for r in res]), float(np.mean([r.denoiser_calls for r in res]))

    full, full_calls = top1_calls(ScoringOptions(batch_size=8192).replace(strategy="full", n_samples=[n]))
    for th in thresholds:
        top1, calls = top1_calls(ScoringOptions(batch_size=8192).replace(strategy="sift_refine", max_samples=n,
                                                                         sift_threshold=th))
        print(f"  K={world.num_classes} sift_refine threshold {th:g}: {calls:.0f} calls/img ({calls / full_calls:.3f}x "
              f"full), top-1 differs from full on {int((top1 != full).sum())} of {images}", flush=True)


def strategies(num_classes: int, n: int) -> dict[str, dict]:
    """Every strategy with at most ``n`` samples per candidate.

    staged: Li et al.'s shapes scaled to ``n`` samples: their small-dataset (n/10 then n samples,
    keep 5 then 1) for K <= 10, their ImageNet one (n/20, n/10, n/2, n; keep K/2, K/20, K/100, 1).
    """
    if num_classes <= 10:
        staged = dict(n_samples=[n // 10, n], to_keep=[5, 1])
    else:
        keep = [max(round(num_classes * f), 1) for f in (1 / 2, 1 / 20, 1 / 100)] + [1]
        staged = dict(n_samples=[n // 20, n // 10, n // 2, n], to_keep=keep)
    # Chen et al.'s Sift-and-Refine: an absolute threshold on the summed gap to the leader, in this world's
    # error units, so only where one was chosen on other images of the same world (``--sift-sweep``).
    sift = ({"sift_refine": dict(strategy="sift_refine", max_samples=n, sift_threshold=SIFT_THRESHOLD[num_classes])}
            if num_classes in SIFT_THRESHOLD else {})
    return {
        **sift,
        "full": dict(strategy="full", n_samples=[n]),
        "staged": dict(strategy="staged", **staged),
        "ttest": dict(strategy="ttest", min_samples=20, max_samples=n, p_value=2e-3),
        "anytime": dict(strategy="anytime", min_samples=4, max_samples=n, alpha=0.05, survivors=1),
        "anytime_s5": dict(strategy="anytime", min_samples=4, max_samples=n, alpha=0.05, survivors=5),
        # Guaranteed against full evaluation on the same n samples (finite-population sequence).
        "anytime_full": dict(strategy="anytime", min_samples=4, max_samples=n, alpha=0.05, guarantee="full"),
        "anytime_full_a20": dict(strategy="anytime", min_samples=4, max_samples=n, alpha=0.2, guarantee="full"),
        # Each (t, noise) sample's errors divided by their mean over the candidates scored on it.
        "full_norm": dict(strategy="full", n_samples=[n], sample_norm="mean"),
        "anytime_norm": dict(strategy="anytime", min_samples=4, max_samples=n, alpha=0.05, sample_norm="mean"),
        "ttest_norm": dict(strategy="ttest", min_samples=20, max_samples=n, p_value=2e-3, sample_norm="mean"),
    }


def run_world(world: World, images: int, n: int, names: list[str], chunk: int, seed: int) -> dict:
    x0, labels = world.images(images, seed)
    # Nearest mean = the largest of the first K coordinates (all means have the same norm).
    bayes_rule = (x0.flatten(1)[:, : world.num_classes].argmax(1) == labels).float().mean()
    out = {"classes": world.num_classes, "dims": world.dims, "delta": world.delta, "images": images, "args_seed": seed,
           "samples": n, "bayes_accuracy": bayes_accuracy(world.num_classes, world.delta),
           "bayes_rule_on_these_images": float(bayes_rule), "rows": {}}
    seeds = list(range(seed * 1_000_000, seed * 1_000_000 + images))
    for name in names:
        opts = ScoringOptions(batch_size=8192).replace(**strategies(world.num_classes, n)[name])
        start = time.perf_counter()
        res = [r for i in range(0, images, chunk) for r in score(world, opts, x0[i:i + chunk], seeds[i:i + chunk])]
        out["rows"][name] = {
            "per_image": {"target": labels.tolist(), "top1": [int(r.outcome.rank.argmin()) for r in res],
                          "calls": [r.denoiser_calls for r in res],
                          "confidence": [r.outcome.confidence for r in res],
                          "target_rank": [int(r.outcome.rank[t]) for r, t in zip(res, labels.tolist())]},
            "seconds": time.perf_counter() - start}
        print(f"  K={world.num_classes} {name}: {out['rows'][name]['seconds']:.0f} s", flush=True)
    return out


def summarise(rows: dict) -> dict[str, dict]:
    """Top-1, agreement with full, losses against full, calls; per strategy."""
    def right_of(name: str) -> np.ndarray:
        p = rows[name]["per_image"]
        return np.array(p["top1"]) == np.array(p["target"])

    out = {}
    for name, r in rows.items():
        # A normalised strategy is measured against normalised full evaluation (same estimand).
        full_right = right_of("full_norm" if name.endswith("_norm") and "full_norm" in rows else "full")
        p = r["per_image"]
        right = np.array(p["top1"]) == np.array(p["target"])
        lost = int((full_right & ~right).sum())
        n_full = int(full_right.sum())
        out[name] = {"top1": right.mean(), "vs_full": right.mean() - full_right.mean(),
                     "ece": reliability(p["confidence"], right).ece,
                     "top5": (np.array(p["target_rank"]) < 5).mean(),
                     "calls": float(np.mean(p["calls"])), "calls_max": int(np.max(p["calls"])),
                     "lost": lost, "full_right": n_full,
                     # Exact (Clopper-Pearson) 95% upper bound on the loss rate where full is right.
                     "lost_upper": float(stats.beta.ppf(0.95, lost + 1, n_full - lost)) if n_full > lost else 1.0}
    return out


def table(worlds: list[dict], real: dict | None) -> str:
    head = ("| task | strategy | top-1 % | vs full (pts) | vs Bayes (pts) | top-5 % | calls/img mean | max "
            "| calls vs full | true class lost where full right (95% upper) | ECE (pts) |\n|" + "---|" * 11)
    lines = [head]
    blocks = [(f"synthetic K={w['classes']}, {w['images']} img, Bayes {100 * w['bayes_accuracy']:.1f}%",
               w["rows"], w["bayes_accuracy"]) for w in worlds]
    if real is not None:
        blocks.append((f"diffusion_tiny, {real['images']} img, held-out templates", real["rows"], None))
    for (label, rows, bayes), w in zip(blocks, worlds + [None]):
        if w is not None:  # the exact posterior softmax(delta x_g): what calibrated confidence looks like here
            x0, labels = World(w["classes"], w["dims"], w["delta"]).images(w["images"], w["args_seed"])
            post = torch.softmax(w["delta"] * x0.flatten(1)[:, : w["classes"]].double(), dim=1)
            right = (post.argmax(1) == labels).numpy()
            lines.append(f"| {label} | Bayes posterior (exact, no sampling) | {100 * right.mean():.1f} | - "
                         f"| {100 * (right.mean() - bayes):+.1f} | - | - | - | - | - "
                         f"| {100 * reliability(post.max(1).values.numpy(), right).ece:.1f} |")
        s = summarise(rows)
        for name, r in s.items():
            vs_bayes = f"{100 * (r['top1'] - bayes):+.1f}" if bayes is not None else "-"
            lines.append(f"| {label} | {name} | {100 * r['top1']:.1f} | {100 * r['vs_full']:+.1f} | {vs_bayes} "
                         f"| {100 * r['top5']:.1f} | {r['calls']:,.0f} | {r['calls_max']:,} "
                         f"| {r['calls'] / s['full']['calls']:.3f} | {r['lost']}/{r['full_right']} "
                         f"(≤ {100 * r['lost_upper']:.2g}%) | {100 * r['ece']:.1f} |")
    if real is not None and real.get("clip") is not None:
        c = real["clip"]
        lines.append(f"| diffusion_tiny, {real['images']} img, held-out templates | CLIP {c['model']} (softmax) "
                     f"| {100 * c['top1']:.1f} | - | - | {100 * c['top5']:.1f} | - | - | - | - | {100 * c['ece']:.1f} |")
    return "\n".join(lines)


def run_loss_check(world: World, images: int, n: int, strategy: str, chunk: int, seed: int) -> dict:
    """How often ``strategy`` loses the true class where full evaluation ranks it first, on many
    images for little compute: full evaluation (the strategy's own normalisation) runs only on the
    images the strategy gets wrong, the only ones where a loss can hide. Seeds as ``run_world``'s,
    with the seed shifted so these images are new ones."""
    x0, labels = world.images(images, seed + 1000)
    seeds = list(range((seed + 1000) * 1_000_000, (seed + 1000) * 1_000_000 + images))
    spec = strategies(world.num_classes, n)
    opts = ScoringOptions(batch_size=8192).replace(**spec[strategy])
    full_name = "full_norm" if strategy.endswith("_norm") else "full"
    start = time.perf_counter()
    res = [r for i in range(0, images, chunk) for r in score(world, opts, x0[i:i + chunk], seeds[i:i + chunk])]
    top1 = torch.tensor([int(r.outcome.rank.argmin()) for r in res])
    wrong = (top1 != labels).nonzero().squeeze(1).tolist()
    # The true class was eliminated when it saw fewer samples than the final decision used.
    eliminated = [i for i in wrong if res[i].outcome.samples[labels[i]] < res[i].outcome.samples.max()]
    full_opts = ScoringOptions(batch_size=8192).replace(**spec[full_name])
    full_right = []
    for i in range(0, len(wrong), chunk):
        idx = wrong[i:i + chunk]
        out = score(world, full_opts, x0[idx], [seeds[j] for j in idx])
        full_right += [j for j, r in zip(idx, out) if int(r.outcome.rank.argmin()) == int(labels[j])]
    out = {"classes": world.num_classes, "images": images, "strategy": strategy, "reference": full_name,
           "top1": float((top1 == labels).float().mean()),
           "calls": float(np.mean([r.denoiser_calls for r in res])), "calls_max": int(max(r.denoiser_calls for r in res)),
           "wrong": len(wrong), "lost": len(full_right), "lost_eliminated": len(set(full_right) & set(eliminated)),
           "eliminated_true": len(eliminated), "seconds": time.perf_counter() - start}
    print(f"  K={world.num_classes} loss check ({strategy}, {images} img): top-1 {100 * out['top1']:.1f}%, "
          f"{out['calls']:.0f} calls/img; wrong {out['wrong']}, of which {full_name} right {out['lost']} "
          f"({out['lost_eliminated']} by eliminating the true class)", flush=True)
    return out


def loss_table(checks: list[dict]) -> str:
    lines = ["| task | strategy | top-1 % | calls/img mean | max | strategy wrong | of those, full right (lost) "
             "| lost by eliminating the true class | loss rate per image (95% upper) |", "|" + "---|" * 9]
    for c in checks:
        upper = float(stats.beta.ppf(0.95, c["lost"] + 1, c["images"] - c["lost"]))
        lines.append(f"| synthetic K={c['classes']}, {c['images']} new img | {c['strategy']} vs {c['reference']} "
                     f"| {100 * c['top1']:.1f} | {c['calls']:,.0f} | {c['calls_max']:,} | {c['wrong']} | {c['lost']} "
                     f"| {c['lost_eliminated']} | {c['lost']}/{c['images']} (≤ {100 * upper:.2g}%) |")
    return "\n".join(lines)


def hybrid_table(hybrids: list[dict], worlds: list[dict]) -> str:
    lines = ["| task | shortlist k | recall@k % | hybrid top-1 % | pure top-1 % | calls/img mean | max "
             "| pure calls / hybrid calls |", "|" + "---|" * 8]
    for h in hybrids:
        # The pure row: k = K in the same run (same images), else the same strategy in a world of K classes.
        pure = h["rows"].get(h["classes"], h["rows"].get(str(h["classes"]))) or next(
            (summarise(w["rows"]).get(h["strategy"]) for w in worlds
             if w["classes"] == h["classes"] and h["strategy"] in w["rows"]), None)
        label = (f"synthetic K={h['classes']}, {h['images']} img, shortlister top-1 "
                 f"{100 * h['shortlister_top1']:.1f}%, {h['strategy']}")
        for k, r in h["rows"].items():
            ratio = f"{pure['calls'] / r['calls']:.0f}x" if pure else "-"
            pure_top1 = f"{100 * pure['top1']:.1f}" if pure else "-"
            lines.append(f"| {label} | {k} | {100 * r['recall']:.1f} | {100 * r['top1']:.1f} "
                         f"| {pure_top1} "
                         f"| {r['calls']:,.0f} | {r['calls_max']:,} | {ratio} |")
    return "\n".join(lines)


def clip_row(result: Path, real: dict) -> dict:
    """The CLIP run's top-1, top-5 and ECE on the same images as the diffusion benchmark."""
    run = read_run(result)
    target = real["rows"]["full"]["per_image"]["target"]
    if run.target != target:
        raise SystemExit(f"{result} did not score the same images, in the same order, as the diffusion benchmark")
    top5 = [t in row for row, t in zip(run.top5, run.target)]
    return {"model": run.model, "top1": float(np.mean(run.correct)), "top5": float(np.mean(top5)),
            "ece": reliability(run.confidence, run.correct).ece}


def plot(worlds: list[dict], real: dict | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(f"synthetic, K = {w['classes']}", w["rows"], w["bayes_accuracy"]) for w in worlds]
    if real is not None:
        panels.append(("diffusion_tiny (Fashion-MNIST, K = 10)", real["rows"], None))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.2), squeeze=False)
    # One colour and marker per strategy in every panel and one legend: many strategies tie on
    # accuracy, so text labels next to the points would overlap.
    names = list(dict.fromkeys(name for _, rows, _ in panels for name in rows))
    style = {name: (plt.cm.tab20(2 * i % 20 + i // 10 % 2), "osD^v<>ph*"[i % 10]) for i, name in enumerate(names)}
    for ax, (title, rows, bayes) in zip(axes[0], panels):
        for name, r in summarise(rows).items():
            color, marker = style[name]
            ax.scatter(r["calls"], 100 * r["top1"], s=40, color=color, marker=marker, label=name, alpha=0.85)
        if bayes is not None:
            ax.axhline(100 * bayes, color="k", ls=":", lw=1, label="Bayes-optimal (closed form)")
        ax.set_xscale("log")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("denoiser calls per image (mean)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("top-1 accuracy (%)")
    handles = {h.get_label(): h for ax in axes[0] for h in ax.collections + ax.lines}
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=min(len(handles), 6), fontsize=8)
    fig.tight_layout(rect=(0, 0.14, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classes", default="10,100,1000", help="comma list of synthetic class counts")
    p.add_argument("--images", default="1000,500,200", help="images per synthetic world, in the same order")
    p.add_argument("--bayes", type=float, default=0.8, help="Bayes-optimal top-1 of every synthetic world")
    p.add_argument("--samples", type=int, default=100, help="most samples per candidate, every strategy")
    p.add_argument("--strategies", default="full,staged,ttest,anytime,anytime_s5")
    p.add_argument("--chunk", type=int, default=50, help="images per engine call")
    p.add_argument("--hybrid-classes", type=int, default=0, help="class count of the hybrid run (0: none)")
    p.add_argument("--hybrid-images", type=int, default=200)
    p.add_argument("--hybrid-ks", default="1,5,10,20,50", help="k = the class count is the pure strategy on the same images")
    p.add_argument("--hybrid-strategy", default="anytime")
    p.add_argument("--shortlist-accuracy", type=float, default=0.6, help="the synthetic shortlister's top-1")
    p.add_argument("--loss-check", default="", help="CLASSES:IMAGES:STRATEGY, e.g. 1000:1000:anytime_norm (new images)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--sift-sweep", default="", help="CLASSES:IMAGES:T1,T2,... Sift-and-Refine thresholds on new images")
    p.add_argument("--include", nargs="*", default=[],
                   help="elimination_benchmark.json files of earlier runs whose worlds join the table (split long runs)")
    p.add_argument("--real", nargs="*", default=[],
                   help="benchmark.json files of scripts/benchmark_strategies.py on the same images (the first with full)")
    p.add_argument("--clip", help="a CLIP result JSON (with predictions) on the same images as --real, for its ECE")
    p.add_argument("--out", default="runs/elimination", help="folder for the JSON, table and plot")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    if args.classes and "full" not in args.strategies.split(","):
        raise SystemExit("--strategies must include full: every row is measured against it")
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    worlds = [{"args_seed": json.loads(Path(path).read_text())["args"]["seed"], **w}
              for path in args.include for w in json.loads(Path(path).read_text())["worlds"]]
    for k, n in zip(map(int, filter(None, args.classes.split(","))), map(int, filter(None, args.images.split(",")))):
        world = World(k, max(k, 16), separation_for(k, args.bayes))
        print(f"synthetic K={k}: delta={world.delta:.4f}, Bayes accuracy {bayes_accuracy(k, world.delta):.4f}, "
              f"{n} images", flush=True)
        worlds.append(run_world(world, n, args.samples, args.strategies.split(","), args.chunk, args.seed))
        (out / "elimination_benchmark.json").write_text(json.dumps({"args": vars(args), "worlds": worlds}))
    hybrids = [h for path in args.include for h in json.loads(Path(path).read_text()).get("hybrids", [])]
    if args.hybrid_classes:
        k = args.hybrid_classes
        world = World(k, max(k, 16), separation_for(k, args.bayes))
        hybrids.append(run_hybrid(world, args.hybrid_images, args.samples, args.hybrid_strategy,
                                  [int(x) for x in args.hybrid_ks.split(",")], args.shortlist_accuracy, args.chunk,
                                  args.seed))
        (out / "elimination_benchmark.json").write_text(json.dumps({"args": vars(args), "worlds": worlds,
                                                                     "hybrids": hybrids}))
    if args.sift_sweep:
        k, n_img, ths = args.sift_sweep.split(":")
        world = World(int(k), max(int(k), 16), separation_for(int(k), args.bayes))
        run_sift_sweep(world, int(n_img), args.samples, [float(t) for t in ths.split(",")], args.chunk, args.seed)
    checks = [c for path in args.include for c in json.loads(Path(path).read_text()).get("loss_checks", [])]
    if args.loss_check:
        k, n_img, name = args.loss_check.split(":")
        world = World(int(k), max(int(k), 16), separation_for(int(k), args.bayes))
        checks.append(run_loss_check(world, int(n_img), args.samples, name, args.chunk, args.seed))
    (out / "elimination_benchmark.json").write_text(json.dumps({"args": vars(args), "worlds": worlds,
                                                                 "hybrids": hybrids, "loss_checks": checks}))
    real = None
    for path in args.real:  # several runs of benchmark_strategies.py on the same images join into one block
        part = json.loads(Path(path).read_text())
        real = part if real is None else {**real, "rows": {**real["rows"], **part["rows"]}}
        if part["images"] != real["images"]:
            raise SystemExit(f"{path} scored {part['images']} images, the first --real file {real['images']}")
    if real is not None:
        real["clip"] = clip_row(Path(args.clip), real) if args.clip else None
    md = table(worlds, real)
    if hybrids:
        md += "\n\n" + hybrid_table(hybrids, worlds)
    if checks:
        md += "\n\n" + loss_table(checks)
    (out / "elimination_benchmark_table.md").write_text(md + "\n")
    if worlds or real is not None:
        plot(worlds, real, out / "elimination_benchmark.png")
    print(md)
    print(f"wrote {out / 'elimination_benchmark.json'}, {out / 'elimination_benchmark_table.md'}, "
          f"{out / 'elimination_benchmark.png'}")


if __name__ == "__main__":
    main()
