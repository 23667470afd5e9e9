"""What the two demo training scripts share: command line, data split and the step loop."""
from __future__ import annotations

import argparse
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, TypeVar

import numpy as np

from clip_benchmark_diffusion.demo.fashion_mnist import demo_test_subset, train_validation_split

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


@dataclass(frozen=True)
class TrainingData:
    """uint8 images (N, 28, 28) and int64 labels to train on, and the images the progress checks use."""

    train_images: np.ndarray
    train_labels: np.ndarray
    check_images: np.ndarray
    check_labels: np.ndarray
    check_name: str  # "validation" or "test", for the log


def load_training_data(train_limit: int, val_per_class: int, check_images: int) -> TrainingData:
    """The official train split minus ``val_per_class`` held-out images per class.

    The progress checks use the first ``check_images`` held-out images, so no test image steers a
    run. ``val_per_class=0`` trains on all 60,000 and checks on the first images of the shipped
    test subset instead (how the first shipped weights were made). ``train_limit`` keeps only the
    first N training images (for tests).
    """
    images, labels, val_images, val_labels = train_validation_split(val_per_class)
    if train_limit:
        images, labels = images[:train_limit], labels[:train_limit]
    if val_per_class:
        return TrainingData(images, labels, val_images[:check_images], val_labels[:check_images], "validation")
    test_images, test_labels = demo_test_subset(check_images)
    return TrainingData(images, labels, test_images, test_labels, "test")


@dataclass
class LoopResult:
    steps_done: int
    train_minutes: float
    losses: list[float] = field(default_factory=list)
    curve: list[dict] = field(default_factory=list)

    def mean_loss(self, last: int) -> float:
        """Mean of the last ``last`` step losses (0.0 before any step)."""
        tail = self.losses[-last:]
        return sum(tail) / max(1, len(tail))


def run_training(steps: int, minutes: float, step: Callable[[], float], check: Callable[[int], dict],
                 log_every: int, check_every: int, describe: Callable[[], str] = lambda: "") -> LoopResult:
    """Call ``step`` (one optimiser step, returning its loss) until ``steps`` or ``minutes`` run out.

    The budget counts training only, not the checks. Every ``log_every`` steps it prints the mean
    loss and ``describe()``; every ``check_every`` steps, and once at the end, it records ``check(step)``.
    """
    result, start = LoopResult(0, 0.0), time.time()
    while result.steps_done < steps and time.time() - start < 60 * minutes:
        result.losses.append(step())
        result.steps_done += 1
        n = result.steps_done
        if n % log_every == 0:
            extra = describe()
            print(f"step {n}  loss {sum(result.losses[-log_every:]) / log_every:.4f}"
                  f"{'  ' + extra if extra else ''}  {(time.time() - start) / 60:.1f} min", flush=True)
        if check_every and n % check_every == 0 and n < steps:
            check_start = time.time()
            result.curve.append(check(n))
            start += time.time() - check_start
    result.train_minutes = (time.time() - start) / 60
    if not result.curve or result.curve[-1]["step"] != result.steps_done:  # the budget may end a run early
        result.curve.append(check(result.steps_done))
    return result
