"""Every elimination strategy on the same images for the price of one full evaluation.

Strategies read a candidate's (t, noise) samples in order and the samples are the same for every
strategy (seeded per image), so one full evaluation's per-sample class errors determine what every
strategy would decide and how many denoiser calls it would spend. ``capture`` runs the full
evaluation through clip_benchmark's zero-shot code (in-process, the recipe's own scoring with
``strategy=full``) and saves each image's (classes x samples) class-error matrix; ``replay`` drives
the package's real strategy classes (``make_strategy``) over those matrices, asking for exactly
the entries each strategy requests, and prints top-1, the loss against full evaluation, calls per
image and the expected calibration error of each strategy.

Choose settings on a capture of the *validation* split and report them on the test split:

    python scripts/build_fashion_mnist.py --validation runs/fashion_mnist_validation
    python scripts/replay_strategies.py capture --dataset-root runs/fashion_mnist_validation --out runs/errors_val.pt
    python scripts/replay_strategies.py capture --out runs/errors_test.pt          # the shipped test images
    python scripts/replay_strategies.py replay runs/errors_val.pt
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from clip_benchmark_diffusion.calibration import reliability
from clip_benchmark_diffusion.options import ScoringOptions
from clip_benchmark_diffusion.scoring.math import sample_weighting
from clip_benchmark_diffusion.scoring.strategies import make_strategy
from clip_benchmark_diffusion.scoring.timesteps import NoiseGrid



class _Recorder:
    """Checkpoints that keep every image's latest (G, M, N) errors instead of persisting them."""

    def __init__(self) -> None:
        self.cerr: dict[int, torch.Tensor] = {}

    def load(self, i: int):
        return None

    def save(self, i: int, cerr: torch.Tensor, calls: int, new: torch.Tensor) -> None:
        self.cerr[i] = cerr.clone()


def capture(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    from clip_benchmark.metrics import zeroshot_classification as zc

    from clip_benchmark_diffusion.adapter.loader import load_diffusion_classifier
    from clip_benchmark_diffusion.integration.clip_benchmark import ensure_installed

    import benchmark_strategies as bench  # a sibling: scripts/ is sys.path[0]
    ensure_installed()
    model, transform, tokenizer = load_diffusion_classifier(args.model, args.pretrained, device=args.device)
    model.eval()
    options = model.options.replace(strategy="full", n_samples=[args.max_samples])
    model.set_options(options)
    engine = model.engine
    engine.checkpoint_s = 0.0          # the recorder sees every chunk
    matrices: list[torch.Tensor] = []
    original = engine.score

    def score(latents, seeds, cands, on_done=None, allowed=None, checkpoints=None):
        rec = _Recorder()
        results = original(latents, seeds, cands, on_done=on_done, allowed=allowed, checkpoints=rec)
        valid = (cands.members >= 0).float()                                        # (G, M)
        for i in range(len(seeds)):
            cerr = rec.cerr[i].nan_to_num(0.0)
            matrices.append((cerr * valid[:, :, None]).sum(1) / valid.sum(1, keepdim=True))  # (G, N)
        return results

    engine.score = score
    batches, classes, templates = bench.load_images(args.dataset, args.dataset_root, "test", transform,
                                                    args.images, args.batch_size)
    model.begin_task("zeroshot_classification", expected_images=sum(len(y) for _, y in batches))
    clf = zc.zero_shot_classifier(model, tokenizer, classes, templates, args.device)
    logits, target = zc.run_classification(model, clf, batches, args.device)
    err = torch.stack(matrices)                                                      # (B, G, N)
    ranks = torch.stack([r.outcome.rank for r in model.account.record.results])
    # The recorded matrices must reproduce the run's own decisions image by image.
    assert torch.equal(err.mean(2).argmin(1), ranks.argmin(1)), "recorded errors do not match the run's ranking"
    torch.save({"err": err, "target": target, "classes": list(classes), "options": options.to_dict(),
                # each sample's noise level (log-SNR, model time, tau), so a capture can be reweighted offline
                "grid": {**engine.grid.describe(digits=8), "a": engine.grid.a.tolist(), "b": engine.grid.b.tolist()},
                "objective": model.model.objective,
                "model": args.model, "pretrained": args.pretrained, "dataset_root": args.dataset_root}, args.out)
    print(f"captured {tuple(err.shape)} class errors (images, classes, samples) to {args.out}; "
          f"full top-1 {100 * (ranks.argmin(1) == target).float().mean():.1f}%")


def replay_one(options: ScoringOptions, err: torch.Tensor) -> tuple[object, int]:
    """Drive the real strategy over one image's (G, N) errors; its outcome and denoiser calls."""
    G, N = err.shape
    strategy = make_strategy(options, G)
    if strategy.err.shape[1] > N:
        raise SystemExit(f"the capture has {N} samples per class; {options.strategy} asks for up to {strategy.err.shape[1]}")
    full = err[:, : strategy.err.shape[1]]
    calls = 0
    while not strategy.done:
        want = strategy.wanted()
        calls += int(want.sum())
        strategy.record(want, full)
        strategy.update()
    return strategy.outcome(), calls


VARIANTS: dict[str, dict] = {
    # The recipe defaults and the benchmark's named strategies, with a few knobs around them.
    "full": dict(strategy="full"),  # on all of the capture's samples
    "ttest_min10": dict(strategy="ttest", min_samples=10, p_value=2e-3),
    "ttest_min5": dict(strategy="ttest", min_samples=5, p_value=2e-3),
    "anytime": dict(strategy="anytime", min_samples=4, alpha=0.05),
    "anytime_a20": dict(strategy="anytime", min_samples=4, alpha=0.2),
    "anytime_a50": dict(strategy="anytime", min_samples=4, alpha=0.5),
    "anytime_m3": dict(strategy="anytime", min_samples=3, alpha=0.05),
    # Guaranteed against full evaluation on the same samples (finite-population sequence).
    "anytime_full": dict(strategy="anytime", min_samples=4, alpha=0.05, guarantee="full"),
    "anytime_full_a20": dict(strategy="anytime", min_samples=4, alpha=0.2, guarantee="full"),
    "anytime_full_a50": dict(strategy="anytime", min_samples=4, alpha=0.5, guarantee="full"),
    # The 10-class setting chosen on the validation capture (docs/elimination_benchmark.md, session 7).
    "anytime_full_a50_m3": dict(strategy="anytime", min_samples=3, alpha=0.5, guarantee="full"),
}


def captured_grid(data: dict) -> NoiseGrid:
    """The capture's noise levels (older captures kept only tau and log-SNR: rebuilt per family kind)."""
    g = data.get("grid")
    if g is None:
        raise SystemExit(f"this capture predates recorded noise levels; capture again to reweight it")
    tau, lam = torch.tensor(g["tau"], dtype=torch.float64), torch.tensor(g["log_snr"], dtype=torch.float64)
    if "a" in g:
        a, b = torch.tensor(g["a"], dtype=torch.float64), torch.tensor(g["b"], dtype=torch.float64)
    elif data["objective"] == "flow":
        a, b = 1 - tau, tau
    else:
        a, b = torch.sigmoid(lam).sqrt(), torch.sigmoid(-lam).sqrt()
    return NoiseGrid(a=a, b=b, model_time=torch.tensor(g["model_time"], dtype=torch.float64), tau=tau)


def reweighted(data: dict, weighting: str) -> torch.Tensor:
    """The capture's (B, G, N) errors under another weighting on the same grid, exactly as the engine
    would compute them: error = weight * l2(scale * diff) = weight * scale^2 * (the epsilon error)."""
    opts = data["options"]
    if opts["weighting"] != "uniform" or opts["loss"] != "l2":
        raise SystemExit(f"reweighting needs a capture with weighting=uniform and loss=l2, not "
                         f"{opts['weighting']}/{opts['loss']}")
    if weighting == "elbo":
        raise SystemExit("elbo places its own grid: capture again with CLIP_BENCHMARK_DIFFUSION_OPTIONS=weighting=elbo")
    weight, scale = sample_weighting(captured_grid(data), weighting, data["objective"])
    factor = weight if scale is None else weight * scale.pow(2)
    return data["err"] * factor.to(data["err"].dtype)


def replay(args: argparse.Namespace) -> None:
    data = torch.load(args.capture)
    err, target = data["err"], data["target"]
    if args.weighting:
        err = reweighted(data, args.weighting)
        print(f"reweighted to {args.weighting!r} on the captured grid")
    N = err.shape[2]
    temperature = args.temperature
    full_top1 = err.mean(2).argmin(1)
    names = args.strategies.split(";") if args.strategies else list(VARIANTS)
    rows = {}
    print(f"{args.capture}: {err.shape[0]} images, {err.shape[1]} classes, {N} samples; full top-1 "
          f"{100 * (full_top1 == target).float().mean():.2f}% at {err.shape[1] * N} calls/img")
    print(f"{'strategy':<22} {'top-1':>6} {'lost':>5} {'gained':>6} {'calls':>7} {'max':>5} {'x full':>7} "
          f"{'ECE post':>8} {'ECE T':>6}")
    for name in names:
        label, sep, text = name.partition("=")   # "label={...}" names a JSON row in the table and --out
        if sep and text.startswith("{"):
            name = label
        spec = dict(VARIANTS[name]) if name in VARIANTS else json.loads(text if sep and text.startswith("{") else name)
        spec.setdefault("max_samples", args.max_samples or N)
        if spec["strategy"] == "full":
            spec.setdefault("n_samples", [spec["max_samples"]])
        options = ScoringOptions(**{k: v for k, v in ScoringOptions().to_dict().items() if k not in spec},
                                 **{k: tuple(v) if isinstance(v, list) else v for k, v in spec.items()})
        outs = [replay_one(options, e) for e in err]
        top1 = torch.tensor([int(o.rank.argmin()) for o, _ in outs])
        calls = np.array([c for _, c in outs])
        right, full_right = (top1 == target).numpy(), (full_top1 == target).numpy()
        conf_post = [o.confidence for o, _ in outs]
        ece_t = None
        if temperature:
            conf_t = [o.top1_probability(temperature, args.temperature_power) for o, _ in outs]
            ece_t = reliability(conf_t, right).ece
        ece_post = reliability(conf_post, right).ece
        rows[name] = {"options": spec, "top1": float(right.mean()), "lost": int((full_right & ~right).sum()),
                      "gained": int((~full_right & right).sum()), "calls_mean": float(calls.mean()),
                      "calls_max": int(calls.max()), "ece_posterior": ece_post, "ece_temperature": ece_t,
                      # benchmark_elimination.py --real reads these (as benchmark_strategies.py writes them)
                      "per_image": {"target": target.tolist(), "top1": top1.tolist(), "calls": calls.tolist(),
                                    "confidence": conf_post,
                                    "target_rank": [int(o.rank[t]) for (o, _), t in zip(outs, target.tolist())]}}
        print(f"{name:<22} {100 * right.mean():>6.2f} {rows[name]['lost']:>5d} {rows[name]['gained']:>6d} "
              f"{calls.mean():>7.1f} {calls.max():>5d} {calls.mean() / (err.shape[1] * N):>7.3f} "
              f"{100 * ece_post:>8.2f} {'' if ece_t is None else f'{100 * ece_t:.2f}':>6}")
    if args.out:
        Path(args.out).write_text(json.dumps({"capture": args.capture, "images": err.shape[0], "temperature": temperature,
                                              "temperature_power": args.temperature_power,
                                              "full_top1": float((full_top1 == target).float().mean()),
                                              "rows": rows}, indent=2) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("capture", help="one full evaluation, keeping every per-sample class error")
    c.add_argument("--model", default="diffusion_tiny")
    c.add_argument("--pretrained", default="default")
    c.add_argument("--dataset", default="wds/fashion_mnist")
    c.add_argument("--dataset-root", default=None, help="default: the shipped 1,000 test images")
    c.add_argument("--images", type=int, default=1000)
    c.add_argument("--max-samples", type=int, default=50)
    c.add_argument("--batch-size", type=int, default=100)
    c.add_argument("--threads", type=int, default=0)
    c.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    c.add_argument("--out", required=True)
    r = sub.add_parser("replay", help="every strategy over a capture")
    r.add_argument("capture")
    r.add_argument("--strategies", default="",
                   help=f"semicolon list of {', '.join(VARIANTS)}, JSON option dicts or label=JSON")
    r.add_argument("--max-samples", type=int, default=0, help="cap per candidate (default: the capture's)")
    r.add_argument("--temperature", type=float, default=0.0, help="also the ECE of softmax(-(error / T)^k)")
    r.add_argument("--temperature-power", type=float, default=1.0, help="k in the above (a recipe's temperature_power)")
    r.add_argument("--weighting", default="", help="replay under this weighting (native, exp7) on the captured grid")
    r.add_argument("--out", default="")
    args = p.parse_args()
    if args.command == "capture":
        if args.dataset_root is None:
            from clip_benchmark_diffusion_demo import DATASET_DIR
            args.dataset_root = str(DATASET_DIR)
        capture(args)
    else:
        replay(args)


if __name__ == "__main__":
    main()
