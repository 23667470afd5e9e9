"""``clip_benchmark_diffusion``: a thin CLI over the library and clip_benchmark's own CLI."""
from __future__ import annotations

import argparse
import json
import sys

from clip_benchmark_diffusion.errors import UserError


def _list_models(args: argparse.Namespace) -> int:
    from clip_benchmark_diffusion.registry import get_recipe, list_models

    print(json.dumps([get_recipe(n).describe() for n in list_models(args.pattern)], indent=2))
    return 0


def _plugins(args: argparse.Namespace) -> int:
    from clip_benchmark_diffusion.plugins import loaded_plugins

    print(json.dumps(loaded_plugins(), indent=2))
    return 0


def _demo(args: argparse.Namespace) -> int:
    if args.compositional:
        from clip_benchmark_diffusion.demo.compositional import DEFAULT_CLIP, DEFAULT_DIFFUSION
        from clip_benchmark_diffusion.demo.compositional import main as compositional_main

        return compositional_main(out=args.out if args.out != "runs/demo" else "runs/compositional",
                                  images=args.images, items=args.items, batch_size=args.batch_size,
                                  diffusion=args.diffusion_model or DEFAULT_DIFFUSION,
                                  clip=args.clip_model or DEFAULT_CLIP)
    from clip_benchmark_diffusion.demo.run import main as demo_main

    return demo_main(images=args.images, out=args.out, batch_size=args.batch_size)


def _compare(args: argparse.Namespace) -> int:
    from clip_benchmark_diffusion.predictions import comparison_lines, read_run

    first, second = read_run(args.first), read_run(args.second)
    if args.reliability:
        from clip_benchmark_diffusion.predictions import calibration

        if calibration(first) is None and calibration(second) is None:
            raise UserError("neither predictions file holds per-image confidences (written before they were "
                            "added); rerun both evaluations to draw a reliability diagram")
    print("\n".join(comparison_lines(first, second)))
    if args.reliability:
        from clip_benchmark_diffusion.reliability_plot import draw_reliability

        labels = [first.model, second.model] if first.model != second.model else [str(args.first), str(args.second)]
        print(f"reliability diagram: {draw_reliability(dict(zip(labels, (first, second))), args.reliability)}")
    return 0


def _eval(argv: list[str]) -> int:
    """Exactly ``clip_benchmark eval ...``, with our models registered."""
    from clip_benchmark_diffusion.integration.clip_benchmark import ensure_installed

    ensure_installed()
    import clip_benchmark.cli as cb_cli

    sys.argv = ["clip_benchmark", "eval", *argv]
    return cb_cli.main() or 0


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:  # e.g. while clip_benchmark and torch import: nothing to keep yet
        print("clip_benchmark_diffusion: interrupted", file=sys.stderr)
        return 130


def _main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["eval"]:
        return _eval(argv[1:])
    parser = argparse.ArgumentParser(prog="clip_benchmark_diffusion", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("list-models", help="registered diffusion recipes and their defaults, as JSON")
    p.add_argument("pattern", nargs="?", default="*", help="shell-style wildcard, e.g. '*sd2*'")
    p.set_defaults(func=_list_models)
    sub.add_parser("plugins", help="loaded plugins, as JSON").set_defaults(func=_plugins)
    sub.add_parser("eval", help="the same as `clip_benchmark eval` (all its flags)")
    p = sub.add_parser("demo", help="the embedded diffusion model vs its CLIP counterpart, offline")
    p.add_argument("--images", type=int, default=200, help="first N of the 1,000 shipped test images")
    p.add_argument("--out", default="runs/demo", help="folder for results, CSV and figure")
    p.add_argument("--batch-size", type=int, default=100, help="dataloader batch size")
    p.add_argument("--compositional", action="store_true",
                   help="issue 11: two-garment scenes, 100 ordered-pair classes and four caption-selection probes, "
                        "diffusion vs CLIP trained on the same data (--images: first N of the 1,000 scenes)")
    p.add_argument("--items", type=int, default=500, help="--compositional: first N of each probe's 500 items")
    p.add_argument("--diffusion-model", help="--compositional: NAME,PRETRAINED of the diffusion model")
    p.add_argument("--clip-model", help="--compositional: NAME,PRETRAINED of the CLIP model")
    p.set_defaults(func=_demo)
    p = sub.add_parser("compare", help="two results on the same images: 95%% intervals and a paired McNemar test")
    p.add_argument("first", help="result JSON of clip_benchmark eval, run with CLIP_BENCHMARK_DIFFUSION_DUMP_PREDICTIONS=1")
    p.add_argument("second", help="result JSON of the other model on the same dataset")
    p.add_argument("--reliability", metavar="PNG", help="also draw both runs' reliability diagram into this file")
    p.set_defaults(func=_compare)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UserError as exc:
        print(str(exc), file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
