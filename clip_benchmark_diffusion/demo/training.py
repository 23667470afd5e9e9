"""What the two demo training scripts share: their command line, built from a config dataclass."""
from __future__ import annotations

import argparse
from dataclasses import asdict
from pathlib import Path
from typing import TypeVar

_C = TypeVar("_C")


def parse_config(config_cls: type[_C], default_out: Path, out_help: str, description: str,
                 argv: list[str] | None = None) -> tuple[_C, Path]:
    """``--out`` plus one ``--field-name`` flag per field of ``config_cls`` (typed by its default)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", type=Path, default=default_out, help=out_help)
    for name, value in asdict(config_cls()).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    args = vars(parser.parse_args(argv))
    out_dir = args.pop("out")
    return config_cls(**args), out_dir
