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


def _plugin_commands() -> set[str]:
    """The subcommands plugins add (their names only)."""
    from clip_benchmark_diffusion.plugins import plugin_manager

    probe = argparse.ArgumentParser(add_help=False).add_subparsers()
    plugin_manager().hook.register_commands(subparsers=probe)
    return set(probe.choices)


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
    if argv[:1] == ["demo"] and "demo" not in _plugin_commands():
        print("clip_benchmark_diffusion: the demo is a separate distribution in this repository; install it with "
              "`pip install -e demo` (make demo and make test do)", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(prog="clip_benchmark_diffusion", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("list-models", help="registered diffusion recipes and their defaults, as JSON")
    p.add_argument("pattern", nargs="?", default="*", help="shell-style wildcard, e.g. '*sd2*'")
    p.set_defaults(func=_list_models)
    sub.add_parser("plugins", help="loaded plugins, as JSON").set_defaults(func=_plugins)
    sub.add_parser("eval", help="the same as `clip_benchmark eval` (all its flags)")
    from clip_benchmark_diffusion.plugins import plugin_manager

    plugin_manager().hook.register_commands(subparsers=sub)   # plugins' commands (the demo's `demo`)
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
