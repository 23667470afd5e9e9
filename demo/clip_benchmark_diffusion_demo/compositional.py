"""``clip_benchmark_diffusion demo --compositional``: issue 11's table, diffusion vs CLIP on the same scenes.

Three stock ``clip_benchmark eval`` commands, each holding both models: one on the four caption-selection
probes (``sugar_crepe/<probe>``), one on the two-garment Winoground set (``winoground`` from a local
folder: two scenes that differ by a position or colour swap, their two captions), one on the 100-class
set (``wds/fashion_pairs_100``). The Winoground row is the group score (each image picks its caption
and each caption its image); its text and image scores are printed under the table.
With per-item predictions dumped, every row gets each model's accuracy with a 95% Wilson interval
and the exact McNemar test of the paired difference (:mod:`clip_benchmark_diffusion.compare`).
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from clip_benchmark_diffusion.compare import Accuracy, PairedComparison, accuracy_interval
from clip_benchmark_diffusion_demo import CLIP_PAIRS_NAME, CLIP_PAIRS_WEIGHTS, DIFFUSION_PAIRS_DIR
from clip_benchmark_diffusion_demo.pairs import N_PAIR_CLASSES, PROBES
from clip_benchmark_diffusion_demo.pairs_data import PAIRS_DATASET_DIR, PROBES_DIR, WINOGROUND_DIR
from clip_benchmark_diffusion_demo.run import _console, run_stock, subset_dataset
from clip_benchmark_diffusion.errors import UserError
from clip_benchmark_diffusion.predictions import Run, calibration_lines, compare_runs, read_run
from clip_benchmark_diffusion.reliability_plot import draw_reliability

CLASSIFICATION = "wds/fashion_pairs_100"
DEFAULT_DIFFUSION = "diffusion_pairs,default"
DEFAULT_CLIP = f"{CLIP_PAIRS_NAME},{CLIP_PAIRS_WEIGHTS}"
ROW_LABELS = {
    "fashion_pairs_100": "100 ordered pairs (top-1)",
    "swap_obj": "position swap",
    "swap_att": "colour swap (binding)",
    "replace_obj": "replace garment (control)",
    "replace_att": "replace colour (control)",
    "winoground": "Winoground group (2 swaps)",
}
# Chance of each row: 1/100 top-1, 1/2 for a two-caption probe, 1/6 for Winoground's group score
# (of the 24 joint orderings of an instance's four scores, 4 satisfy both directions).
CHANCE = {"fashion_pairs_100": 1 / N_PAIR_CLASSES, "winoground": 1 / 6}


@dataclass(frozen=True)
class Row:
    """One task: both models' accuracies on the same items and their paired test."""

    task: str
    chance: float
    diffusion: Accuracy
    clip: Accuracy
    paired: PairedComparison  # diffusion minus CLIP


def probe_subset(items: int, dest: Path) -> Path:
    """The first ``items`` items of every probe (the same scenes in each), as a sugar_crepe root."""
    first = json.loads((PROBES_DIR / "swap_obj.json").read_text())
    if items >= len(first):
        return PROBES_DIR
    if dest.exists():
        shutil.rmtree(dest)
    (dest / "val2017").mkdir(parents=True)
    for probe in PROBES:
        ann = dict(list(json.loads((PROBES_DIR / f"{probe}.json").read_text()).items())[:items])
        (dest / f"{probe}.json").write_text(json.dumps(ann))
        for item in ann.values():
            target = dest / "val2017" / item["filename"]
            if not target.exists():
                shutil.copy(PROBES_DIR / "val2017" / item["filename"], target)
    return dest


def winoground_subset(items: int, dest: Path) -> Path:
    """The first ``items`` Winoground instances (the same scenes as the probes' first items), as a local root."""
    from clip_benchmark_diffusion.integration.winoground_local import EXAMPLES, IMAGES, read_examples

    examples = read_examples(WINOGROUND_DIR)
    if items >= len(examples):
        return WINOGROUND_DIR
    if dest.exists():
        shutil.rmtree(dest)
    (dest / IMAGES).mkdir(parents=True)
    for ex in examples[:items]:
        for key in ("image_0", "image_1"):
            shutil.copy(WINOGROUND_DIR / IMAGES / f"{ex[key]}.png", dest / IMAGES / f"{ex[key]}.png")
    (dest / EXAMPLES).write_text("".join(json.dumps(ex) + "\n" for ex in examples[:items]))
    return dest


def stock_commands(diffusion: str, clip: str, classification_root: Path, probes_root: Path, results: Path,
                   batch_size: int, winoground_root: Path | None = None) -> list[list[str]]:
    """The ``clip_benchmark eval`` command lines: all probes, Winoground, then classification. Caption
    selection comes first because it is not kept in the score store: if the long 100-class run is cut
    short, a rerun resumes it from the store without having lost the caption tasks' work."""
    common = ["--pretrained_model", diffusion, clip, "--batch_size", str(batch_size), "--num_workers", "0",
              "--output", str(results / "{dataset}_{model}_{pretrained}.json")]
    return [
        [_console("clip_benchmark"), "eval", "--dataset", *(f"sugar_crepe/{p}" for p in PROBES),
         "--dataset_root", str(probes_root), *common],
        *([[_console("clip_benchmark"), "eval", "--dataset", "winoground", "--dataset_root", str(winoground_root),
             *common]] if winoground_root is not None else []),
        [_console("clip_benchmark"), "eval", "--dataset", CLASSIFICATION, "--dataset_root", str(classification_root),
         *common],
    ]


def load_runs(results: Path) -> dict[str, dict[str, Run]]:
    """``{task: {"diffusion": run, "clip": run}}`` from the result files of both commands."""
    out: dict[str, dict[str, Run]] = {}
    for path in sorted(results.glob("*.json")):
        run = read_run(path)
        task = run.result["dataset"].replace("wds/", "").replace("sugar_crepe/", "")
        kind = "diffusion" if "diffusion_classifier" in run.result else "clip"
        out.setdefault(task, {})[kind] = run
    missing = [t for t in ROW_LABELS if set(out.get(t, {})) != {"diffusion", "clip"}]
    if missing:
        raise UserError(f"{results} lacks a diffusion and a CLIP result for {', '.join(missing)}")
    return out


def table_rows(runs: dict[str, dict[str, Run]]) -> list[Row]:
    """One row per task, in ``ROW_LABELS`` order; the paired test needs the same items in order."""
    rows = []
    for task in ROW_LABELS:
        diffusion, clip, paired = compare_runs(runs[task]["diffusion"], runs[task]["clip"])
        rows.append(Row(task, CHANCE.get(task, 0.5), diffusion, clip, paired))
    return rows


def winoground_lines(runs: dict[str, Run]) -> list[str]:
    """Each model's Winoground text, image and group scores with 95% Wilson intervals, and (diffusion)
    how its errors were made comparable across images."""
    lines = []
    for kind in ("diffusion", "clip"):
        run = runs[kind]
        metrics, n = run.result["metrics"], len(run.target)
        parts = []
        for name, key in (("text", "text_acc"), ("image", "image_acc"), ("group", "acc")):
            k = round(metrics[key] * n)
            a = accuracy_interval([True] * k + [False] * (n - k))
            parts.append(f"{name} {100 * a.value:.1f} [{100 * a.low:.1f}, {100 * a.high:.1f}]")
        norm = run.result.get("diffusion_classifier", {}).get("caption_selection", {}).get("normalisation")
        lines.append(f"{run.model}: " + ", ".join(parts) + (f" (errors normalised: {norm})" if norm else ""))
    return lines


def format_table(rows: list[Row], diffusion_name: str, clip_name: str) -> str:
    def acc(a: Accuracy) -> str:
        return f"{100 * a.value:5.1f} [{100 * a.low:4.1f}, {100 * a.high:4.1f}]"

    lines = [("task", "n", "chance", "diffusion % [95% CI]", "CLIP % [95% CI]", "diff", "McNemar p")]
    for r in rows:
        lines.append((ROW_LABELS[r.task], str(r.paired.total), f"{100 * r.chance:.0f}", acc(r.diffusion), acc(r.clip),
                      f"{100 * r.paired.difference:+.1f}", f"{r.paired.p_value:.2g}"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    table = "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)
    return (f"{table}\ndiffusion: {diffusion_name}; CLIP: {clip_name}; diff = diffusion - CLIP in points on the "
            "same items; McNemar: exact two-sided test on the items exactly one model gets right")


def draw(rows: list[Row], path: Path, diffusion_name: str, clip_name: str) -> Path:
    """Grouped bars with Wilson intervals and each task's chance level."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.6))
    for k, (name, pick, colour) in enumerate(((diffusion_name, lambda r: r.diffusion, "tab:blue"),
                                              (clip_name, lambda r: r.clip, "tab:orange"))):
        xs = [i + (k - 0.5) * 0.38 for i in range(len(rows))]
        vals = [100 * pick(r).value for r in rows]
        err = [[v - 100 * pick(r).low for v, r in zip(vals, rows)], [100 * pick(r).high - v for v, r in zip(vals, rows)]]
        ax.bar(xs, vals, width=0.38, yerr=err, capsize=3, label=name, color=colour)
    for i, r in enumerate(rows):
        ax.hlines(100 * r.chance, i - 0.45, i + 0.45, colors="k", linestyles="dotted")
    ax.set_xticks(range(len(rows)), [ROW_LABELS[r.task] for r in rows], rotation=15, fontsize=8)
    ax.set_ylabel("accuracy % (95% Wilson)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8)
    ax.set_title("Same scenes, same captions: diffusion vs CLIP (dotted: chance)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(out: str = "runs/compositional", images: int = 1000, items: int = 500, batch_size: int = 50,
         diffusion: str = DEFAULT_DIFFUSION, clip: str = DEFAULT_CLIP) -> int:
    if images < 1 or items < 1:
        raise UserError("--images and --items must be positive")
    if "," not in diffusion or "," not in clip:
        raise UserError("--diffusion-model and --clip-model take NAME,PRETRAINED as clip_benchmark's --pretrained_model")
    for given, default, present, script in ((diffusion, DEFAULT_DIFFUSION, (DIFFUSION_PAIRS_DIR / "model_index.json").is_file(),
                                             "train_diffusion_tiny.py"),
                                            (clip, DEFAULT_CLIP, CLIP_PAIRS_WEIGHTS.is_file(), "train_clip_tiny.py")):
        if given == default and not present:
            raise UserError(f"the pair's {given.split(',')[0]} model is not trained yet: run scripts/{script} --data pairs "
                            "(docs/compositional.md), or name another with --diffusion-model / --clip-model")
    out_dir = Path(out)
    results = out_dir / "results"
    classification = subset_dataset(images, out_dir / "data" / "fashion_pairs_100", source=PAIRS_DATASET_DIR)
    probes = probe_subset(items, out_dir / "data" / "fashion_pairs_probes")
    winoground = winoground_subset(items, out_dir / "data" / "fashion_winoground")
    wall = run_stock(stock_commands(diffusion, clip, classification, probes, results, batch_size, winoground))
    runs = load_runs(results)
    rows = table_rows(runs)
    names = diffusion.split(",", 1)[0], clip.split(",", 1)[0]
    print("\n" + format_table(rows, *names) + "\n")
    print("Winoground, two garments (text / image / group, 95% Wilson; chance 25 / 25 / 16.7):")
    print("\n".join(winoground_lines(runs["winoground"])) + "\n")
    classification_runs = runs["fashion_pairs_100"]
    print(f"{ROW_LABELS['fashion_pairs_100']}, per-image top-1 probabilities:")
    print("\n".join(calibration_lines(classification_runs["diffusion"], classification_runs["clip"])) + "\n")
    figure = draw(rows, out_dir / "compositional.png", *names)
    ordered = (classification_runs["diffusion"], classification_runs["clip"])  # diffusion first: the bars' colours
    reliability = draw_reliability({run.model: run for run in ordered}, out_dir / "compositional_reliability.png")
    print(f"stock commands' wall time {wall:.0f} s; results in {results}, figures {figure}, {reliability}")
    return 0
