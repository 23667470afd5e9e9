"""Images per second: a re-implementation of Li et al.'s reference loop against the package (issue 27).

Both score the same images of the shipped DDPM model (``diffusion_tiny``) on the same schedule
(Li et al.'s CIFAR-10 one, the ``li2023`` preset: 50 then 500 samples, keep 5 then 1, L1 loss) and
the same noise levels, one prompt per class (the first template, as Li et al. use one). The
reference loop is what Li et al.'s evaluation does, written from its description: per image, per
stage, the (class, timestep) pairs not yet scored, batched ``--ref-batch`` (their default, 32) per
denoiser call, in float32, under ``torch.no_grad``. The package variants are the scoring options
of ``families/fast_path.py`` one at a time and together.

Timings are interleaved in one process (round r runs every variant on the same ``--images-per-round``
images, in a rotating order) and the median of the rounds' images per second is printed with its
ratio to the reference: on a shared machine only a comparison inside one process means anything.

Separately (``--agreement-images``), every package variant scores validation images and the script
prints how many top-1 predictions differ from the plain package's (float32): on the recipe's own
scoring with all its templates (``--agreement-schedule recipe``, what a user runs), on Li et al.'s
schedule with one template (``li2023``), or on a cheap full schedule (``full``: few samples decide,
so a perturbation flips more predictions there: conservative). ``--rounds 0`` skips the timings.

    python scripts/build_fashion_mnist.py --validation runs/fmnist_val     # validation images, once
    python scripts/benchmark_throughput.py --dataset-root runs/fmnist_val
    python scripts/benchmark_throughput.py --variants reference,package,bf16 --rounds 5
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import time
from pathlib import Path

import torch

from clip_benchmark_diffusion.options import OPTIONS_ENV, PRESETS

# name -> (load-time options (dtype), scoring options): the package's variants
VARIANTS = {
    "package": ({}, {}),
    "batch256": ({}, {"batch_size": 256}),
    "channels_last": ({}, {"channels_last": "on"}),
    "bf16": ({"dtype": "bfloat16"}, {}),
    "bf16+batch256": ({"dtype": "bfloat16"}, {"batch_size": 256}),
    "bf16+batch256+channels_last": ({"dtype": "bfloat16"}, {"batch_size": 256, "channels_last": "on"}),
    "workers2": ({}, {"cpu_workers": 2}),
    "bf16+workers2": ({"dtype": "bfloat16"}, {"cpu_workers": 2}),
    "compile": ({}, {"compile": "on"}),
    "bf16+compile": ({"dtype": "bfloat16"}, {"compile": "on"}),
    "classic": ({}, {"attention": "classic"}),
    "bf16+classic": ({"dtype": "bfloat16"}, {"attention": "classic"}),
    "bf16+classic+workers2": ({"dtype": "bfloat16"}, {"attention": "classic", "cpu_workers": 2}),
    "bf16+classic+compile": ({"dtype": "bfloat16"}, {"attention": "classic", "compile": "on"}),
    "classic+compile": ({}, {"attention": "classic", "compile": "on"}),
    "all": ({"dtype": "bfloat16"}, {"batch_size": 256, "channels_last": "on", "compile": "on"}),
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="diffusion_tiny")
    p.add_argument("--dataset-root", default="runs/fmnist_val", help="a wds folder (validation images)")
    p.add_argument("--variants", default="reference,package,batch256,channels_last,bf16,bf16+batch256",
                   help=f"comma list of reference, reference_workers2 (Li et al.'s --n_workers 2) and {', '.join(VARIANTS)}")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--images-per-round", type=int, default=2)
    p.add_argument("--ref-batch", type=int, default=32, help="the reference loop's denoiser batch (Li et al.: 32)")
    p.add_argument("--agreement-images", type=int, default=0, help="images for the prediction-change check (0: none)")
    p.add_argument("--agreement-schedule", choices=("recipe", "li2023", "full"), default="recipe")
    p.add_argument("--agreement-samples", type=int, default=10, help="samples of the full agreement schedule")
    p.add_argument("--out", default="runs/throughput.json")
    return p.parse_args()


@contextlib.contextmanager
def env_options(changes: dict):
    old = os.environ.get(OPTIONS_ENV)
    os.environ[OPTIONS_ENV] = ",".join(f"{k}={v}" for k, v in changes.items())
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(OPTIONS_ENV)
        else:
            os.environ[OPTIONS_ENV] = old


def load(model: str, load_options: dict):
    from clip_benchmark_diffusion.adapter.loader import load_diffusion_classifier

    with env_options(load_options):
        m, transform, tokenizer = load_diffusion_classifier(model, "default", device="cpu")
    return m.eval(), transform, tokenizer


@torch.no_grad()
def reference_loop(m, images: torch.Tensor, classes: list[str], template: str, batch: int, seed: int = 0) -> list[int]:
    """Li et al.'s evaluation of each image on its own: staged pruning, the new (class, t) pairs of a
    stage in denoiser batches of ``batch``, the same noise for every class at one sample index."""
    opts = m.options.replace(**PRESETS["li2023"])
    unet = m.model.denoiser
    embeds = m.model.encode_prompts([template.replace("{c}", c) for c in classes], opts)["encoder_hidden_states"]
    grid = m.model.grid(max(opts.n_samples), opts)
    a, b, t_in = grid.a.float(), grid.b.float(), grid.model_time.float()
    preds = []
    for i, img in enumerate(images):
        x0 = m.model.encode_images(img[None])[0]                                   # (C, H, W)
        noise = torch.randn((max(opts.n_samples), *x0.shape), generator=torch.Generator().manual_seed(seed + i))
        err = torch.full((len(classes), max(opts.n_samples)), float("nan"))
        alive = list(range(len(classes)))
        for n, keep in zip(opts.n_samples, opts.to_keep):
            todo = [(c, k) for c in alive for k in range(n) if err[c, k].isnan()]
            for s in range(0, len(todo), batch):
                c, k = torch.tensor(todo[s: s + batch]).unbind(1)
                x_t = a[k, None, None, None] * x0 + b[k, None, None, None] * noise[k]
                eps_hat = unet(x_t, t_in[k], encoder_hidden_states=embeds[c]).sample
                err[c, k] = (noise[k] - eps_hat).abs().mean((1, 2, 3))
            means = err[alive, :n].mean(1)
            alive = [alive[j] for j in torch.argsort(means, stable=True)[:keep].tolist()]
        preds.append(alive[0])
    return preds


def sharded_reference(m, images: torch.Tensor, classes: list[str], template: str, batch: int, seed: int,
                      workers: int) -> list[int]:
    """The reference loop as Li et al. parallelise it (``--n_workers``: each worker a share of the images),
    with the workers as threads of one torch thread each instead of processes (one copy of the model)."""
    from concurrent.futures import ThreadPoolExecutor

    threads = max(1, torch.get_num_threads() // workers)

    def share(j: int) -> list[int]:
        torch.set_num_threads(threads)
        return reference_loop(m, images[j::workers], classes, template, batch, seed=seed + j * 100_000)

    with ThreadPoolExecutor(workers) as pool:
        parts = list(pool.map(share, range(workers)))
    return [parts[i % workers][i // workers] for i in range(len(images))]


def package_predict(m, images: torch.Tensor, classes: list[str], templates: list[str],
                    options) -> list[int]:
    from clip_benchmark.metrics import zeroshot_classification as zc

    m.set_options(options)
    m.begin_task("zeroshot_classification", expected_images=len(images))
    clf = zc.zero_shot_classifier(m, m.tokenizer, classes, templates, "cpu")
    batches = [(images, torch.zeros(len(images), dtype=torch.long))]
    logits, _ = zc.run_classification(m, clf, batches, "cpu")
    return logits.argmax(1).tolist()


def main() -> None:
    args = parse_args()
    # several compiled variants share the UNet's forward in one process: each compiles up to 5 batch sizes
    torch._dynamo.config.recompile_limit = 64
    from clip_benchmark_diffusion.integration.clip_benchmark import ensure_installed

    ensure_installed()
    names = args.variants.split(",")
    base, transform, _ = load(args.model, {})
    need = max(args.rounds * args.images_per_round, args.agreement_images)
    import benchmark_strategies as bench  # a sibling: scripts/ is sys.path[0]

    ((x, y),), classes, templates = bench.load_images("wds/benchmark", args.dataset_root, "test", transform, need, need)
    template = templates[0]
    models = {}
    for name in names:
        if name.startswith("reference"):
            continue
        load_opts, scoring = VARIANTS[name]
        m = base if not load_opts and "compile" not in scoring else load(args.model, load_opts)[0]
        models[name] = (m, scoring)
    recipe = {name: m.options for name, (m, _) in models.items()}   # before the rounds set li2023's
    li = {**PRESETS["li2023"]}
    rates: dict[str, list[float]] = {n: [] for n in names}
    preds: dict[str, list[int]] = {n: [] for n in names}
    warmups: dict[str, float | None] = {}
    for r in range(args.rounds):
        imgs = x[r * args.images_per_round: (r + 1) * args.images_per_round]
        order = names[r % len(names):] + names[: r % len(names)]           # rotate: no variant always first
        for name in order:
            start = time.perf_counter()
            if name == "reference":
                p = reference_loop(base, imgs, classes, template, args.ref_batch, seed=r * 1000)
            elif name == "reference_workers2":
                p = sharded_reference(base, imgs, classes, template, args.ref_batch, r * 1000, workers=2)
            else:
                m, scoring = models[name]
                p = package_predict(m, imgs, classes, [template], m.options.replace(**li, **scoring))
                fast = m.model.fast.metadata()
                if "compile_warmup_s" in fast:   # the first call at each padded batch size compiles it: paid
                    paid = (fast["compile_warmup_s"] or 0.0) - (warmups.get(name) or 0.0)   # once, reported apart
                    warmups[name] = fast["compile_warmup_s"]
                    start += paid
            rates[name].append(len(imgs) / (time.perf_counter() - start))
            preds[name] += p
            print(f"round {r} {name:<28} {rates[name][-1]:.3f} img/s", flush=True)
    agreement = agreement_check(args, models, recipe, x, y, classes, templates) if args.agreement_images else {}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "rates": rates, "warmups": warmups,
                                          "agreement": agreement}, indent=2))
    if args.rounds:
        print_rates(args, names, rates, warmups)
    print(f"wrote {args.out}")


def print_rates(args: argparse.Namespace, names: list[str], rates: dict[str, list[float]],
                warmups: dict[str, float | None]) -> None:
    ref = statistics.median(rates["reference"]) if "reference" in rates else None
    print(f"\n{args.model}, li2023 schedule ({2750} calls/img), {args.rounds} rounds x {args.images_per_round} "
          f"images, interleaved, CPU {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}")
    print(f"{'variant':<30} {'img/s (median)':>15} {'rounds':>24} {'x reference':>12}")
    for name in names:
        med = statistics.median(rates[name])
        ratio = f"{med / ref:.2f}x" if ref else "-"
        print(f"{name:<30} {med:>15.3f} {' '.join(f'{v:.3f}' for v in rates[name]):>24} {ratio:>12}")
    for name, w in warmups.items():
        print(f"{name}: torch.compile warm-up {w:.1f} s (each batch size's first call, paid once per process, "
              "excluded above)")


def agreement_check(args: argparse.Namespace, models: dict, recipe: dict, x: torch.Tensor, y: torch.Tensor,
                    classes: list[str], templates: list[str]) -> dict:
    """Top-1 and predictions changed against the plain package (float32) for every package variant."""
    schedule = {"recipe": ({}, templates), "li2023": (PRESETS["li2023"], templates[:1]),
                "full": ({"strategy": "full", "n_samples": [args.agreement_samples], "loss": "l1"}, templates[:1])}
    changes, prompts = schedule[args.agreement_schedule]
    ximg, yimg = x[: args.agreement_images], y[: args.agreement_images]
    print(f"\nprediction changes against float32 on {len(ximg)} images of {args.dataset_root}, "
          f"{args.agreement_schedule} scoring, {len(prompts)} template(s)", flush=True)
    out, ref_pred = {}, None
    for name in ["package"] + [n for n in models if n != "package"]:
        m, scoring = models[name]
        start = time.perf_counter()
        p = torch.tensor(package_predict(m, ximg, classes, prompts, recipe[name].replace(**changes, **scoring)))
        ref_pred = p if ref_pred is None else ref_pred
        changed = int((p != ref_pred).sum())
        out[name] = {"top1": float((p == yimg).float().mean()), "changed": changed,
                     "seconds": time.perf_counter() - start}
        print(f"{name:<30} top-1 {100 * out[name]['top1']:.1f}%  predictions changed {changed} "
              f"({100 * changed / len(ximg):.1f} points), {out[name]['seconds']:.0f} s", flush=True)
    return out


if __name__ == "__main__":
    main()
