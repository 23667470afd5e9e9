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


def _eval(argv: list[str]) -> int:
    """Exactly ``clip_benchmark eval ...``, with our models registered."""
    from clip_benchmark_diffusion.integration.clip_benchmark import ensure_installed

    ensure_installed()
    import clip_benchmark.cli as cb_cli

    sys.argv = ["clip_benchmark", "eval", *argv]
    return cb_cli.main() or 0


def main(argv: list[str] | None = None) -> int:
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
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UserError as exc:
        print(str(exc), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
