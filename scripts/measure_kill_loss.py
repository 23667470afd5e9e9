"""How much denoiser work a SIGKILL (or SIGTERM, SIGINT) throws away: stop the stock command at random
moments, resume.

One clean run (store off) gives the calls a full evaluation needs. Then the same command is
started with a fresh store and SIGKILLed at a random moment after its first denoiser call, again
and again, until a run finishes. Every UNet forward of every process appends its batch size to a
counter file (one ``write`` per forward, so it survives the kill); after each kill the store says
which images it finished. What the kills lost in all is what all attempts ran beyond one clean
run (the computation is deterministic, so a resumed run repeats exactly the lost work); per kill
it is that excess over the number of kills. Without checkpoints the per-kill loss is also
``ran - kept`` of each killed process (kept = calls of the images it stored); with checkpoints part
of the work is kept in the store's partials, so that difference undercounts what was kept.

    python scripts/measure_kill_loss.py --images 60 --batch-size 20 --kills 6
    python scripts/measure_kill_loss.py --images 60 --batch-size 20 --kills 6 --checkpoint-s inf   # no checkpoints
    python scripts/measure_kill_loss.py --images 40 --batch-size 20 --kills 4 --signal TERM        # SLURM preemption

The loss is also given in seconds of compute: calls x the clean run's seconds per denoiser call
(its ``seconds_per_image`` x images / calls), the figure to hold against the checkpoint interval.

Prints one line per kill and a summary; the figures are the numbers to compare before and after
a change to what is persisted.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COUNTER_ENV = "MEASURE_KILL_LOSS_COUNTER"
CHECKPOINT_ENV = "MEASURE_KILL_LOSS_CHECKPOINT_S"
# Runs the stock command with every UNet forward counted into the counter file.
CHILD = f"""
import os, sys
import diffusers
forward = diffusers.UNet2DConditionModel.forward
fd = os.open(os.environ[{COUNTER_ENV!r}], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
def counted(self, sample, *a, **k):
    out = forward(self, sample, *a, **k)
    os.write(fd, f"{{sample.shape[0]}}\\n".encode())
    return out
diffusers.UNet2DConditionModel.forward = counted
if os.environ.get({CHECKPOINT_ENV!r}):  # e.g. inf: the engine never checkpoints (the behaviour before)
    from clip_benchmark_diffusion.scoring.engine import ScoringEngine
    ScoringEngine.checkpoint_s = float(os.environ[{CHECKPOINT_ENV!r}])
from clip_benchmark.cli import main
sys.argv = ["clip_benchmark", *sys.argv[1:]]
sys.exit(main())
"""


def counted_calls(path: Path) -> int:
    return sum(int(line) for line in path.read_text().split()) if path.exists() else 0


def stored(db: Path) -> dict[str, int]:
    """Denoiser calls of each image in the store."""
    if not db.exists():
        return {}
    with sqlite3.connect(db, timeout=60) as conn:
        rows = conn.execute("SELECT key, payload FROM scores").fetchall()
    conn.close()
    return {key: json.loads(payload)["calls"] for key, payload in rows}


def command(args: argparse.Namespace, data: Path, out: Path) -> list[str]:
    return [sys.executable, "-c", CHILD, "eval", "--model", args.model, "--pretrained", "default",
            "--dataset", "wds/fashion_mnist", "--dataset_root", str(data), "--batch_size", str(args.batch_size),
            "--num_workers", "0", "--quiet", "--output", str(out)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="diffusion_tiny")
    p.add_argument("--images", type=int, default=60, help="first N shipped Fashion-MNIST test images")
    p.add_argument("--batch-size", type=int, default=20, help="dataloader batch size")
    p.add_argument("--kills", type=int, default=6, help="stop killing after this many kills")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-s", default="", help="seconds between the engine's checkpoints; inf: none")
    p.add_argument("--signal", default="KILL", choices=("KILL", "TERM", "INT"),
                   help="the signal that stops each attempt (TERM: what SLURM sends on preemption)")
    args = p.parse_args()
    from clip_benchmark_diffusion_demo.run import subset_dataset
    from clip_benchmark_diffusion.scoring.engine import CHECKPOINT_S

    work = Path(tempfile.mkdtemp(prefix="kill_loss_"))
    data = subset_dataset(args.images, work / "data")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", CHECKPOINT_ENV: args.checkpoint_s}
    rng = random.Random(args.seed)

    counter = work / "clean.count"
    start = time.perf_counter()
    subprocess.run(command(args, data, work / "clean.json"), check=True, stderr=subprocess.DEVNULL,
                   env={**env, COUNTER_ENV: str(counter), "CLIP_BENCHMARK_DIFFUSION_STORE": "off"})
    clean_calls, clean_s = counted_calls(counter), time.perf_counter() - start
    # compute per call, from the run's own accounting (scoring wall time, without start-up)
    metrics = json.loads((work / "clean.json").read_text())["metrics"]
    s_per_call = metrics["seconds_per_image"] * args.images / max(clean_calls, 1)
    print(f"clean run: {clean_calls} denoiser calls, {clean_s:.0f} s, {args.images} images, "
          f"dataloader batch {args.batch_size}, {1000 * s_per_call:.2f} ms of compute per call")
    sig = getattr(signal, f"SIG{args.signal}")
    batch_s = json.loads((work / "clean.json").read_text())["diffusion_classifier"]["scoring"]["batch_size"] * s_per_call
    interval = float(args.checkpoint_s) if args.checkpoint_s else CHECKPOINT_S
    bound = batch_s if args.signal != "KILL" else interval + batch_s
    print(f"bound per SIG{args.signal}: {bound:.2f} s of compute ("
          + ("the denoiser batch in flight, " if args.signal != "KILL" else
             f"the {interval:g} s checkpoint interval + the denoiser batch in flight, ")
          + f"{batch_s:.2f} s here)")

    out, db = work / "run" / "r.json", work / "run" / "clip_benchmark_diffusion_scores.sqlite"
    out.parent.mkdir()
    losses: list[int] = []
    total_run = 0
    for attempt in range(args.kills + 1):
        counter = work / f"run{attempt}.count"
        before = stored(db)
        err = work / f"run{attempt}.err"
        with open(err, "wb") as err_file:
            proc = subprocess.Popen(command(args, data, out), stderr=err_file, env={**env, COUNTER_ENV: str(counter)})
        killed = False
        if attempt < args.kills:
            while counted_calls(counter) == 0 and proc.poll() is None:  # wait for the first forward
                time.sleep(0.02)
            time.sleep(rng.uniform(0, clean_s / 3))
            if proc.poll() is None:
                proc.send_signal(sig)
                killed = True
        proc.wait()
        ran = counted_calls(counter)
        after = stored(db)
        kept = sum(c for k, c in after.items() if k not in before)
        total_run += ran
        if killed:
            losses.append(ran - kept)
            print(f"SIG{args.signal} {len(losses)}: ran {ran} calls, finished {len(after) - len(before)} images "
                  f"({kept} calls), exit {proc.returncode}")
        else:
            print(f"final run: ran {ran} calls, kept {kept} ({len(after) - len(before)} images), exit {proc.returncode}")
            if proc.returncode != 0:  # the figures would be wrong: say why instead
                sys.exit(f"the final run failed; its stderr ({err}) ends:\n{err.read_text()[-3000:]}")
            break
    if losses:
        mean = (total_run - clean_calls) / len(losses)
        per_batch = clean_calls / max(args.images / args.batch_size, 1)
        print(f"all attempts ran {total_run} calls = {total_run / clean_calls:.3f}x a clean run; lost per "
              f"SIG{args.signal}: {mean:.0f} denoiser calls = {mean * s_per_call:.2f} s of compute "
              f"({100 * mean / clean_calls:.1f}% of a clean run, {mean / per_batch:.2f} dataloader batches of work) "
              f"over {len(losses)} signals")


if __name__ == "__main__":
    main()
