"""``clip_benchmark_diffusion demo``: the embedded diffusion model and its CLIP counterpart, side by side.

Both models were trained here on Fashion-MNIST's train split with the same captions. The demo
evaluates them on the shipped test subset with the *stock* ``clip_benchmark eval`` command (one
command holding both models), builds the CSV with ``clip_benchmark build``, prints a comparison
table and draws a figure.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from clip_benchmark_diffusion_demo import CLIP_TINY_NAME, CLIP_TINY_WEIGHTS, DATASET_DIR, register_open_clip_configs
from clip_benchmark_diffusion_demo.captions import CLASSNAMES
from clip_benchmark_diffusion_demo.fashion_mnist import DEMO_PER_CLASS
from clip_benchmark_diffusion.predictions import PREDICTIONS_ENV, Run, comparison_lines, read_run

DIFFUSION = "diffusion_tiny"          # the DDPM UNet
FLOW = "diffusion_tiny_flow"          # the SD3-format rectified-flow transformer
# result kind -> how the demo names it; the two diffusion models and their CLIP counterpart
KINDS = {"diffusion": DIFFUSION, "flow": FLOW, "clip": CLIP_TINY_NAME}
DATASET = "wds/fashion_mnist"
DEFAULT_IMAGES = 200
SHIPPED_IMAGES = DEMO_PER_CLASS * len(CLASSNAMES)


@dataclass(frozen=True)
class DemoPaths:
    out: Path

    @property
    def data(self) -> Path:
        return self.out / "data"

    @property
    def results(self) -> Path:
        return self.out / "results"


def subset_dataset(images: int, dest: Path, source: Path = DATASET_DIR, shipped: int = SHIPPED_IMAGES) -> Path:
    """The first ``images`` samples of a shipped wds folder (already class-interleaved) as a wds folder."""
    if images >= shipped:
        return source
    if dest.exists():
        shutil.rmtree(dest)
    (dest / "test").mkdir(parents=True)
    for name in ("classnames.txt", "zeroshot_classification_templates.txt"):
        shutil.copy(source / name, dest / name)
    with tarfile.open(source / "test" / "0.tar") as src, tarfile.open(dest / "test" / "0.tar", "w") as dst:
        keys: list[str] = []
        for member in src:
            key = member.name.rsplit(".", 1)[0]
            if key not in keys:
                if len(keys) == images:
                    break
                keys.append(key)
            dst.addfile(member, src.extractfile(member))
    (dest / "test" / "nshards.txt").write_text("1\n")
    return dest


def _console(name: str) -> str:
    return shutil.which(name, path=str(Path(sys.executable).parent)) or name


def run_stock(commands: list[list[str]]) -> float:
    """Run stock ``clip_benchmark`` commands with per-item predictions dumped; returns their wall seconds.

    Their stdout (clip_benchmark's per-class reports) is not shown: the demos' tables replace it. On
    many classes and few images some classes are never predicted, and that report then has
    scikit-learn warn "Precision is ill-defined" once per model: noise nobody running a demo can act
    on, so it is filtered.
    """
    filters = ",".join(filter(None, [os.environ.get("PYTHONWARNINGS"), "ignore:Precision is ill-defined",
                                     "ignore:Recall is ill-defined"]))
    env = {**os.environ, PREDICTIONS_ENV: "1", "PYTHONWARNINGS": filters}
    start = time.perf_counter()
    for cmd in commands:
        print("$ " + " ".join(cmd), flush=True)
        proc = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL)
        if proc.returncode != 0:
            sys.exit(f"clip_benchmark_diffusion: the clip_benchmark command failed (exit {proc.returncode})")
    return time.perf_counter() - start


def run_stock_eval(data: Path, results: Path, batch_size: int) -> float:
    """One stock ``clip_benchmark eval`` command holding all three models; returns its wall seconds."""
    results.mkdir(parents=True, exist_ok=True)
    cmd = [_console("clip_benchmark"), "eval",
           "--pretrained_model", f"{DIFFUSION},default", f"{FLOW},default", f"{CLIP_TINY_NAME},{CLIP_TINY_WEIGHTS}",
           "--dataset", DATASET, "--dataset_root", str(data), "--batch_size", str(batch_size),
           "--num_workers", "0", "--output", str(results / "{dataset}_{model}_{pretrained}.json")]
    return run_stock([cmd])


def build_csv(results: Path) -> Path:
    csv = results / "benchmark.csv"
    files = sorted(str(p) for p in results.glob("fashion_mnist_*.json"))
    subprocess.run([_console("clip_benchmark"), "build", *files, "--output", str(csv)], check=True)
    return csv


def clip_seconds_per_image(data: Path) -> float:
    """CLIP's cost for comparison: image-tower forward time per image, batched, on this machine."""
    import open_clip
    import torch
    from clip_benchmark.datasets.builder import build_dataset

    register_open_clip_configs()
    model, _, transform = open_clip.create_model_and_transforms(CLIP_TINY_NAME, pretrained=str(CLIP_TINY_WEIGHTS))
    model.eval()
    with warnings.catch_warnings():  # clip_benchmark's own webdataset call, as in the integration
        warnings.filterwarnings("ignore", message=r"WebDataset\(shardshuffle=\.\.\.\) is None", category=UserWarning)
        ds = build_dataset(dataset_name=DATASET, root=str(data), transform=transform, split="test", download=False)
        x = torch.stack([img for img, _ in ds])
    with torch.no_grad():
        start = time.perf_counter()
        for chunk in x.split(100):
            model.encode_image(chunk)
    return (time.perf_counter() - start) / len(x)


def load_results(results: Path) -> dict[str, Run]:
    """``{"diffusion": run, "flow": run, "clip": run}``, each result with its per-image predictions."""
    kind_of = {name: kind for kind, name in KINDS.items()}
    out = {}
    for path in results.glob("fashion_mnist_*.json"):
        run = read_run(path)
        if run.model in kind_of:
            out[kind_of[run.model]] = run
    if set(out) != set(KINDS):
        sys.exit(f"clip_benchmark_diffusion: expected the results of {', '.join(KINDS.values())} in {results}, "
                 f"found {sorted(out)}")
    return out


def comparison_table(res: dict[str, Run], clip_seconds: float) -> str:
    rows = [("model", "top-1", "top-5", "mean/class recall", "denoiser calls/img", "s/img")]
    for kind in KINDS:
        r = res[kind].result
        m = r["metrics"]
        diffusion = kind != "clip"
        calls = f"{m['denoiser_calls_per_image']:.0f} (max {m['denoiser_calls_per_image_max']})" if diffusion else "-"
        secs = m["seconds_per_image"] if diffusion else clip_seconds
        rows.append((f"{r['model']}", f"{100 * m['acc1']:.1f}", f"{100 * m['acc5']:.1f}",
                     f"{100 * m['mean_per_class_recall']:.1f}", calls, f"{secs:.4f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def main(images: int = DEFAULT_IMAGES, out: str = "runs/demo", batch_size: int = 100) -> int:
    paths = DemoPaths(Path(out))
    data = subset_dataset(images, paths.data / "fashion_mnist")
    n = min(images, SHIPPED_IMAGES)
    print(f"Evaluating {DIFFUSION}, {FLOW} and {CLIP_TINY_NAME} on {n} Fashion-MNIST test images "
          f"(held-out prompt templates) with the stock clip_benchmark command...", flush=True)
    wall = run_stock_eval(data, paths.results, batch_size)
    csv = build_csv(paths.results)
    res = load_results(paths.results)
    table = comparison_table(res, clip_seconds_per_image(data))
    from clip_benchmark_diffusion_demo.figure import draw

    figure = draw(res, paths.out / "demo.png")
    print(f"\n{table}\n")
    for a, b in (("diffusion", "clip"), ("flow", "clip"), ("diffusion", "flow")):
        print("\n".join(comparison_lines(res[a], res[b])) + "\n")
    print(f"stock command wall time {wall:.0f} s; results in {paths.results}, CSV {csv}, figure {figure}")
    print("all 1,000 shipped images: clip_benchmark_diffusion demo --images 1000")
    return 0
