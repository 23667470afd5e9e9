"""Fit a diffusion recipe's probability temperature on held-out validation images (never test labels).

Scores the validation split (the 1,000 train images the demo models never trained on; written by
``scripts/build_fashion_mnist.py --validation`` if the folder is missing) with the recipe's own
scoring through clip_benchmark's zero-shot code in-process, then picks the T and power k that maximise the
likelihood of the validation labels under softmax(-(gap / T)^k) (each class's mean paired
difference to the top-1 class over the samples it saw)
(``clip_benchmark_diffusion.calibration.fit_calibration``). Prints T and k (to put into the recipe's
``temperature`` and ``temperature_power`` scoring options), the two forms (k fixed at 1, k fitted)
compared on random halves of the validation images, and, on the same validation images, the expected calibration error
of the sampling posterior and of the fitted softmax (in-sample for the latter: the honest figure
is the test-set ECE that ``compare`` prints afterwards).

    python scripts/fit_temperature.py --model diffusion_tiny
    python scripts/fit_temperature.py --model diffusion_tiny_flow --threads 2
    python scripts/fit_temperature.py --capture runs/errors_val.pt   # from a replay_strategies.py capture
    python scripts/fit_temperature.py --model diffusion_pairs --dataset wds/fashion_pairs_100 --images 200

``--dataset wds/fashion_pairs_100`` fits on two-garment scenes made from the same validation hold-out
(``scripts/build_fashion_pairs.py --validation``, built here if missing).

With ``--capture`` nothing is scored again: the recipe's strategy is replayed over a full
evaluation's per-sample errors of the validation images (``scripts/replay_strategies.py``), which
reproduces its decisions exactly.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from clip_benchmark_diffusion.calibration import error_nll, error_softmax, fit_calibration, fit_temperature, reliability



# Each dataset's validation folder (built from the train split's hold-out when missing).
VALIDATION_ROOTS = {
    "wds/fashion_mnist": "runs/fashion_mnist_validation",
    "wds/fashion_pairs_100": "runs/fashion_pairs_validation/fashion_pairs_100",
}
# Scenes per pair class in a pairs validation folder built here: 200 scenes (the hold-out allows 5 per class).
PAIRS_VALIDATION_PER_CLASS = 2


def build_validation_folder(dataset: str, root: Path) -> None:
    """Write the validation images of ``dataset`` to ``root`` (a sibling script's builder)."""
    if dataset == "wds/fashion_pairs_100":
        from build_fashion_pairs import build_validation as build_pairs  # a sibling: scripts/ is sys.path[0]

        build_pairs(root, PAIRS_VALIDATION_PER_CLASS)
        return
    from build_fashion_mnist import build_validation  # a sibling: scripts/ is sys.path[0]

    build_validation(root)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="diffusion_tiny", help="recipe name (options after @ are overridden)")
    p.add_argument("--pretrained", default="default")
    p.add_argument("--dataset", default="wds/fashion_mnist", choices=sorted(VALIDATION_ROOTS),
                   help="which kind of validation images")
    p.add_argument("--validation-root", default="",
                   help="the validation wds folder (built here if missing; default: the dataset's under runs/)")
    p.add_argument("--images", type=int, default=1000, help="first N validation images")
    p.add_argument("--batch-size", type=int, default=100, help="images per dataloader batch")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--capture", default="", help="replay the recipe's strategy over this capture instead of scoring")
    p.add_argument("--refit", default="", help="refit from the per-image gaps of an earlier run's JSON (nothing scored)")
    p.add_argument("--out", default="", help="JSON with the fit and the per-image errors (default runs/temperature_<model>.json)")
    return p.parse_args()


def from_capture(args: argparse.Namespace):
    """(outcomes, calls, labels, options) of the recipe's own strategy replayed over a capture."""
    from clip_benchmark_diffusion.registry import parse_model_spec

    data = torch.load(args.capture)
    if data["model"] != args.model or data["pretrained"] != args.pretrained:
        raise SystemExit(f"{args.capture} holds {data['model']} ({data['pretrained']}), not {args.model}")
    if "validation" not in str(data["dataset_root"]):
        raise SystemExit(f"{args.capture} was captured on {data['dataset_root']}: fit on validation images only")
    options = parse_model_spec(args.model).options
    import replay_strategies as replay  # a sibling: scripts/ is sys.path[0]
    pairs = [replay.replay_one(options, e) for e in data["err"][: args.images]]
    return [o for o, _ in pairs], [c for _, c in pairs], data["target"][: args.images].numpy(), options


def main() -> None:
    args = parse_args()
    if args.refit:
        refit(args)
        return
    if args.capture:
        outcomes, calls, labels, options = from_capture(args)
        report(args, outcomes, calls, labels, options)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    root = Path(args.validation_root or VALIDATION_ROOTS[args.dataset])
    if not (root / "test" / "0.tar").exists():
        build_validation_folder(args.dataset, root)
    import benchmark_strategies as bench  # a sibling: scripts/ is sys.path[0]
    from clip_benchmark.metrics import zeroshot_classification as zc

    from clip_benchmark_diffusion.adapter.loader import load_diffusion_classifier
    from clip_benchmark_diffusion.integration.clip_benchmark import ensure_installed

    ensure_installed()
    model, transform, tokenizer = load_diffusion_classifier(args.model, args.pretrained, device=args.device)
    model.eval()
    batches, classes, templates = bench.load_images(args.dataset, str(root), "test", transform,
                                                    args.images, args.batch_size)
    model.begin_task("zeroshot_classification", expected_images=sum(len(y) for _, y in batches))
    clf = zc.zero_shot_classifier(model, tokenizer, classes, templates, args.device)
    logits, target = zc.run_classification(model, clf, batches, args.device)
    report(args, [r.outcome for r in model.account.record.results], model.image_calls(), target.numpy(), model.options)


CV_SPLITS = 20


def cross_validate(err: np.ndarray, samples: np.ndarray, labels: np.ndarray, top1: np.ndarray,
                   splits: int = CV_SPLITS) -> dict[str, tuple[float, float]]:
    """Temperature alone vs temperature and power, each fitted on a random half of the validation
    images and scored (NLL, ECE in points) on the other half: which form to put into the recipe."""
    rng = np.random.default_rng(0)
    out: dict[str, list[tuple[float, float]]] = {"temperature": [], "temperature + power": []}
    for _ in range(splits):
        idx = rng.permutation(len(labels))
        a, b = idx[: len(idx) // 2], idx[len(idx) // 2:]
        fits = {"temperature": (fit_temperature(err[a], samples[a], labels[a]), 1.0),
                "temperature + power": fit_calibration(err[a], samples[a], labels[a])}
        for name, (t, k) in fits.items():
            prob = error_softmax(err[b], samples[b], t, k)
            nll = error_nll(err[b], samples[b], labels[b], t, k)
            out[name].append((nll, 100 * reliability(prob[np.arange(len(b)), top1[b]], top1[b] == labels[b]).ece))
    return {k: tuple(np.mean(v, axis=0).tolist()) for k, v in out.items()}


def refit(args: argparse.Namespace) -> None:
    """The fit and its cross-validation again from a JSON this script wrote (same images, same gaps)."""
    data = json.loads(Path(args.refit).read_text())
    if data["model"] != args.model:
        raise SystemExit(f"{args.refit} holds {data['model']}, not {args.model}")
    per = data["per_image"]
    err, samples = np.asarray(per["gap"], dtype=float), np.asarray(per["samples"])
    top1 = np.asarray(per["top1"]) if "top1" in per else np.where(samples > 0, err, np.inf).argmin(axis=1)
    from clip_benchmark_diffusion.options import ScoringOptions

    fit_and_write(args, err, samples, top1, np.asarray(per["target"]), data.get("calls_per_image", 0.0),
                  None, ScoringOptions.from_dict(data["scoring"]))


def report(args: argparse.Namespace, outcomes, calls, labels: np.ndarray, options) -> None:
    err = np.stack([o.gaps().double().nan_to_num(0.0).numpy() for o in outcomes])
    samples = np.stack([o.samples.numpy() for o in outcomes])
    top1 = np.array([int(o.rank.argmin()) for o in outcomes])
    fit_and_write(args, err, samples, top1, labels, float(np.mean(calls)),
                  reliability([o.confidence for o in outcomes], top1 == labels).ece, options)


def fit_and_write(args: argparse.Namespace, err: np.ndarray, samples: np.ndarray, top1: np.ndarray,
                  labels: np.ndarray, calls_per_image: float, ece_posterior: float | None, options) -> None:
    right = top1 == labels
    temperature, power = fit_calibration(err, samples, labels)
    prob = error_softmax(err, samples, temperature, power)
    rows = np.arange(len(labels))
    nll = error_nll(err, samples, labels, temperature, power)
    ece_softmax = reliability(prob[rows, top1], right).ece
    calls = f", {calls_per_image:.0f} denoiser calls/img" if calls_per_image else ""
    print(f"{args.model}: {len(labels)} validation images, top-1 {100 * right.mean():.1f}%{calls}")
    posterior = "" if ece_posterior is None else f"sampling posterior {100 * ece_posterior:.2f} points, "
    print(f"fitted temperature {temperature:.6g}, temperature_power {power:.4g} (validation NLL {nll:.4f}); "
          f"validation ECE: {posterior}fitted softmax {100 * ece_softmax:.2f} points (in-sample)")
    cv = cross_validate(err, samples, labels, top1)
    for name, (cv_nll, cv_ece) in cv.items():
        print(f"  {name}: held-out half NLL {cv_nll:.4f}, ECE {cv_ece:.2f} points "
              f"(mean of {CV_SPLITS} random halves of these validation images)")
    out = Path(args.out or f"runs/temperature_{args.model}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "model": args.model, "pretrained": args.pretrained, "images": len(labels), "temperature": temperature,
        "temperature_power": power, "cross_validated": {k: {"nll": v[0], "ece": v[1]} for k, v in cv.items()},
        "validation_nll": nll, "validation_top1": float(right.mean()),
        "validation_ece_posterior": ece_posterior, "validation_ece_softmax_in_sample": ece_softmax,
        "scoring": options.to_dict(),
        "calls_per_image": calls_per_image,
        "per_image": {"target": labels.tolist(), "top1": top1.tolist(), "gap": err.tolist(),
                      "samples": samples.tolist()},
    }) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
