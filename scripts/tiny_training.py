"""What the two demo training scripts share: command line, data split and the step loop."""
from __future__ import annotations

import argparse
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, TypeVar

import numpy as np

from clip_benchmark_diffusion_demo.fashion_mnist import demo_test_subset, train_validation_split

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


# Config fields a resumed run may change: they do not alter what the steps compute (the checks run
# on the EMA weights and put the training weights back; they draw from their own seeded generators).
RESUMABLE_CHANGES = frozenset({
    "threads", "log_every", "minutes", "stop_after", "checkpoint", "checkpoint_every",
    "eval_every", "eval_images", "eval_timesteps", "eval_probe_scenes", "final_eval_timesteps",
})


@dataclass
class LoopResult:
    steps_done: int
    train_minutes: float
    losses: list[float] = field(default_factory=list)
    curve: list[dict] = field(default_factory=list)
    segments: list[dict] = field(default_factory=list)  # one per invocation: steps and minutes it ran
    stopped: bool = False  # ended by ``stop_after``: the checkpoint holds the run, no final check was made

    def record(self) -> dict:
        """What a training summary reports of the loop: steps, minutes, invocations, checks."""
        return {"steps_done": self.steps_done, "train_minutes": round(self.train_minutes, 2),
                "segments": self.segments, "curve": self.curve, **({"stopped": True} if self.stopped else {})}

    def mean_loss(self, last: int) -> float:
        """Mean of the last ``last`` step losses (0.0 before any step)."""
        tail = self.losses[-last:]
        return sum(tail) / max(1, len(tail))


@dataclass(frozen=True)
class Checkpoint:
    """Where a run keeps its resumable state, so that it can be split across sessions or survive a kill.

    ``state()`` returns every tensor, generator state and counter the next step depends on (weights,
    optimiser, learning-rate schedule, EMA, random generators) and ``restore(state)`` puts it back;
    a resumed run then computes bit for bit what the uninterrupted run would have.
    """

    path: Path
    every: int                          # write it every ``every`` steps (and when the loop ends)
    config: dict                        # the run's config: resuming under a different one is refused
    state: Callable[[], dict]
    restore: Callable[[dict], None]

    def load(self, result: LoopResult) -> None:
        """Resume from ``path`` if it exists: fills ``result`` and calls ``restore``."""
        import torch

        if not self.path.exists():
            return
        try:
            saved = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same one-line answer
            raise SystemExit(f"clip_benchmark_diffusion: checkpoint {self.path} cannot be read "
                             f"({' '.join(str(exc).split())[:200]}); move it away to start the run afresh") from None
        changed = sorted(k for k in set(saved["config"]) | set(self.config)
                         if k not in RESUMABLE_CHANGES and saved["config"].get(k) != self.config.get(k))
        if changed:
            what = ", ".join(f"{k} {saved['config'].get(k)!r} -> {self.config.get(k)!r}" for k in changed)
            raise SystemExit(f"clip_benchmark_diffusion: checkpoint {self.path} belongs to another run ({what}); "
                             "rerun with its settings, or give another --checkpoint to start afresh")
        self.restore(saved["state"])
        result.steps_done, result.train_minutes = saved["steps_done"], saved["train_minutes"]
        result.losses, result.curve, result.segments = saved["losses"], saved["curve"], saved["segments"]
        print(f"resumed from {self.path} at step {result.steps_done} "
              f"({result.train_minutes:.1f} min of training so far)", flush=True)

    def save(self, result: LoopResult, open_segment: dict | None = None) -> None:
        """Write the state atomically (a kill during the write leaves the previous checkpoint).

        ``open_segment``: this invocation's steps so far, recorded as if it ended here (it did, if
        the process is killed before the next write)."""
        import torch

        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        segments = result.segments + ([open_segment] if open_segment else [])
        torch.save({"config": self.config, "state": self.state(), "steps_done": result.steps_done,
                    "train_minutes": result.train_minutes, "losses": result.losses, "curve": result.curve,
                    "segments": segments}, tmp)
        os.replace(tmp, self.path)


def training_checkpoint(config, modules: dict, optimizer, lr_schedule, gen, ema=None,
                        scenes=None) -> Checkpoint | None:
    """The :class:`Checkpoint` of a run whose config has ``checkpoint`` and ``checkpoint_every``
    (None without ``--checkpoint``): it keeps ``modules`` (name -> nn.Module), the optimiser, the
    learning-rate schedule, the EMA (diffusers ``EMAModel``) if any, the torch generator ``gen``,
    torch's global generator and the scene source (:class:`~.pairs_training.PairBatches`) if any."""
    import torch

    if not config.checkpoint:
        return None
    parts = {**modules, "optimizer": optimizer, "lr_schedule": lr_schedule, **({"ema": ema} if ema else {})}

    def state() -> dict:
        return {**{name: part.state_dict() for name, part in parts.items()}, "gen": gen.get_state(),
                "torch_rng": torch.get_rng_state(), "scenes": scenes.state() if scenes is not None else ""}

    def restore(saved: dict) -> None:
        for name, part in parts.items():
            part.load_state_dict(saved[name])
        gen.set_state(saved["gen"])
        torch.set_rng_state(saved["torch_rng"])
        if scenes is not None:
            scenes.restore(saved["scenes"])

    return Checkpoint(Path(config.checkpoint), config.checkpoint_every, asdict(config), state, restore)


def run_training(steps: int, minutes: float, step: Callable[[], float], check: Callable[[int], dict],
                 log_every: int, check_every: int, describe: Callable[[], str] = lambda: "",
                 checkpoint: Checkpoint | None = None, stop_after: int = 0) -> LoopResult:
    """Call ``step`` (one optimiser step, returning its loss) until ``steps`` or ``minutes`` run out.

    The budget counts training only, not the checks, summed over every invocation of a resumed run.
    Every ``log_every`` steps it prints the mean loss and ``describe()``; every ``check_every``
    steps, and once at the end, it records ``check(step)``. With a ``checkpoint`` it resumes from
    it and writes it as it goes; ``stop_after`` ends this invocation at that step (the checkpoint
    then holds the run; rerunning the same command continues it).
    """
    if stop_after and checkpoint is None:
        raise SystemExit("clip_benchmark_diffusion: --stop-after needs --checkpoint (where the run is kept "
                         "until it continues)")
    result = LoopResult(0, 0.0)
    if checkpoint is not None:
        checkpoint.load(result)
    first, start = result.steps_done, time.time() - 60 * result.train_minutes
    segment_start = time.time()

    def segment() -> dict | None:
        result.train_minutes = (time.time() - start) / 60
        if result.steps_done == first:
            return None
        return {"from_step": first, "to_step": result.steps_done,
                "minutes": round((time.time() - segment_start) / 60, 2)}

    while result.steps_done < steps and time.time() - start < 60 * minutes:
        if stop_after and result.steps_done >= stop_after:
            result.stopped = True
            break
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
            spent = time.time() - check_start
            start, segment_start = start + spent, segment_start + spent
        if checkpoint is not None and n % checkpoint.every == 0 and n < steps:
            checkpoint.save(result, segment())
    last = segment()
    if last is not None:
        result.segments.append(last)
    if checkpoint is not None:
        checkpoint.save(result)
    if result.stopped:
        print(f"stopped at step {result.steps_done} of {steps} ({result.train_minutes:.1f} min of training); "
              f"{checkpoint.path} holds the run: rerun the command with a later --stop-after, or without it, "
              "to continue", flush=True)
        return result
    if not result.curve or result.curve[-1]["step"] != result.steps_done:  # the budget may end a run early
        result.curve.append(check(result.steps_done))
    return result
