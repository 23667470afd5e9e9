"""Fit a diffusion recipe's probability temperature on held-out validation images (never test labels).

Scores the validation split (the 1,000 train images the demo models never trained on; written by
``scripts/build_fashion_mnist.py --validation`` if the folder is missing) with the recipe's own
scoring through clip_benchmark's zero-shot code in-process, then picks the T that maximises the
likelihood of the validation labels under softmax(-gap / T) (each class's mean paired
difference to the top-1 class over the samples it saw)
(``clip_benchmark_diffusion.calibration.fit_temperature``). Prints T (to put into the recipe's
``temperature`` scoring option) and, on the same validation images, the expected calibration error
of the sampling posterior and of the fitted softmax (in-sample for the latter: the honest figure
is the test-set ECE that ``compare`` prints afterwards).

    python scripts/fit_temperature.py --model diffusion_tiny
    python scripts/fit_temperature.py --model diffusion_tiny_flow --threads 2
    python scripts/fit_temperature.py --capture runs/errors_val.pt   # from a replay_strategies.py capture

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

from clip_benchmark_diffusion.calibration import error_softmax, fit_temperature, reliability



def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="diffusion_tiny", help="recipe name (options after @ are overridden)")
    p.add_argument("--pretrained", default="default")
    p.add_argument("--validation-root", default="runs/fashion_mnist_validation",
                   help="the validation wds folder (built here if missing)")
    p.add_argument("--images", type=int, default=1000, help="first N validation images")
    p.add_argument("--batch-size", type=int, default=100, help="images per dataloader batch")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--capture", default="", help="replay the recipe's strategy over this capture instead of scoring")
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
    if args.capture:
        outcomes, calls, labels, options = from_capture(args)
        report(args, outcomes, calls, labels, options)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    root = Path(args.validation_root)
    if not (root / "test" / "0.tar").exists():
        from build_fashion_mnist import build_validation  # a sibling: scripts/ is sys.path[0]

        build_validation(root)
    import benchmark_strategies as bench  # a sibling: scripts/ is sys.path[0]
    from clip_benchmark.metrics import zeroshot_classification as zc

    from clip_benchmark_diffusion.adapter.loader import load_diffusion_classifier
    from clip_benchmark_diffusion.integration.clip_benchmark import ensure_installed

    ensure_installed()
    model, transform, tokenizer = load_diffusion_classifier(args.model, args.pretrained, device=args.device)
    model.eval()
    batches, classes, templates = bench.load_images("wds/fashion_mnist", str(root), "test", transform,
                                                    args.images, args.batch_size)
    model.begin_task("zeroshot_classification", expected_images=sum(len(y) for _, y in batches))
    clf = zc.zero_shot_classifier(model, tokenizer, classes, templates, args.device)
    logits, target = zc.run_classification(model, clf, batches, args.device)
    report(args, [r.outcome for r in model.record.results], model.record.calls, target.numpy(), model.options)


def report(args: argparse.Namespace, outcomes, calls, labels: np.ndarray, options) -> None:
    err = np.stack([o.gaps().double().nan_to_num(0.0).numpy() for o in outcomes])
    samples = np.stack([o.samples.numpy() for o in outcomes])
    top1 = np.array([int(o.rank.argmin()) for o in outcomes])
    right = top1 == labels
    temperature = fit_temperature(err, samples, labels)
    prob = error_softmax(err, samples, temperature)
    rows = np.arange(len(labels))
    nll = float(-np.log(np.clip(prob[rows, labels], 1e-300, None)).mean())
    ece_posterior = reliability([o.confidence for o in outcomes], right).ece
    ece_softmax = reliability(prob[rows, top1], right).ece
    print(f"{args.model}: {len(labels)} validation images, top-1 {100 * right.mean():.1f}%, "
          f"{np.mean(calls):.0f} denoiser calls/img")
    print(f"fitted temperature {temperature:.6g} (validation NLL {nll:.4f}); validation ECE: sampling posterior "
          f"{100 * ece_posterior:.2f} points, fitted softmax {100 * ece_softmax:.2f} points (in-sample)")
    out = Path(args.out or f"runs/temperature_{args.model}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "model": args.model, "pretrained": args.pretrained, "images": len(labels), "temperature": temperature,
        "validation_nll": nll, "validation_top1": float(right.mean()),
        "validation_ece_posterior": ece_posterior, "validation_ece_softmax_in_sample": ece_softmax,
        "scoring": options.to_dict(),
        "per_image": {"target": labels.tolist(), "gap": err.tolist(), "samples": samples.tolist()},
    }) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
