"""Memory of the candidate conditioning at ImageNet scale (issue 27): 1,000 classes x 80 templates.

Loads a model through the package, feeds clip_benchmark's own ImageNet class names and its 80
templates through clip_benchmark's ``zero_shot_classifier`` (80,000 prompts, ``error_mean``), builds
the conditioning table and scores one image on a few of the classes (the table holds all of them;
which rows a batch reads does not change its size). Prints the table's rows and bytes, where it
lives (on the device, or in pinned CPU memory with rows moved per batch), the denoiser batch and
the peak memory: CUDA's peak allocation on a GPU, the process's peak resident set on a CPU (where
host and device are one memory, so the table counts in it).

    python scripts/measure_conditioning_memory.py                       # the tiny SD3-format model, CPU
    python scripts/measure_conditioning_memory.py --device cuda --classes 1000 --templates 80
    python scripts/measure_conditioning_memory.py --model diffusion_sd3 \
        --pretrained demo/clip_benchmark_diffusion_demo/models/diffusion_tiny_flow     # without the demo package
"""
from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="diffusion_tiny_flow")
    p.add_argument("--pretrained", default="default",
                   help="weights: the recipe's default, or a model folder (e.g. the shipped model's, under a built-in "
                        "recipe such as diffusion_sd3, where the demo package is not installed)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--templates", type=int, default=80)
    p.add_argument("--scored-classes", type=int, default=2, help="classes the one image is scored on")
    p.add_argument("--template-ensemble", choices=("error_mean", "embedding_mean"), default="error_mean")
    p.add_argument("--max-sequence-length", type=int, default=0,
                   help="T5 tokens (0: the recipe's; the shipped flow model's recipe reads 1)")
    p.add_argument("--stream", action="store_true",
                   help="on CUDA, stream the table from pinned CPU memory even where it would fit on the device")
    args = p.parse_args(argv)
    import clip_benchmark.datasets as cbd
    from clip_benchmark.metrics import zeroshot_classification as zc
    from clip_benchmark_diffusion.adapter.loader import load_diffusion_classifier
    from clip_benchmark_diffusion.integration.clip_benchmark import ensure_installed
    from clip_benchmark_diffusion.scoring import batching
    from clip_benchmark_diffusion.scoring.batching import peak_memory_bytes, table_bytes

    ensure_installed()
    root = Path(cbd.__file__).parent
    names = json.loads((root / "en_classnames.json").read_text())["imagenet1k"][: args.classes]
    templates = json.loads((root / "en_zeroshot_classification_templates.json").read_text())["imagenet1k"]
    templates = templates[: args.templates]
    model, transform, tokenizer = load_diffusion_classifier(args.model, args.pretrained, device=args.device)
    model.eval()
    changes = {"max_sequence_length": args.max_sequence_length} if args.max_sequence_length else {}
    model.set_options(model.options.replace(strategy="full", n_samples=[2], template_ensemble=args.template_ensemble,
                                            **changes))
    if args.stream:
        batching.TABLE_SHARE = 0.0      # this process only: no table is small enough to live on the device
    rss0 = rss_mib()
    model.begin_task("zeroshot_classification", expected_images=1)
    start = time.perf_counter()
    zc.zero_shot_classifier(model, tokenizer, names, templates, args.device)
    cands = model.classes.candidates()
    encode_s = time.perf_counter() - start
    rss1 = rss_mib()
    rows = cands.cond[next(iter(cands.cond))].shape[0]
    nbytes = table_bytes(cands.cond)
    device = torch.device(args.device)
    held = 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        held = torch.cuda.memory_allocated(device)
    image = torch.rand(1, model.model.image_channels, 28, 28, device=device) * 2 - 1
    allowed = torch.zeros(1, cands.num_classes, dtype=torch.bool)
    allowed[0, : args.scored_classes] = True
    start = time.perf_counter()
    with torch.no_grad():   # as encode_image scores (without it autograd holds every forward's activations)
        results = model.engine.score(model.model.encode_images(image), [0], cands, allowed=allowed)
    score_s = time.perf_counter() - start
    where = "pinned CPU memory, rows moved per batch" if model.classes.streamed else f"{cands.cond[next(iter(cands.cond))].device}"
    print(f"{args.model} on {args.device}: {len(names)} classes x {len(templates)} templates, {args.template_ensemble}: "
          f"{rows} conditioning rows "
          f"({', '.join(f'{k} {tuple(v.shape[1:])} {str(v.dtype)[6:]}' for k, v in cands.cond.items())})")
    prompts = len(model.classes.prompts.texts)
    print(f"table: {nbytes / 2**20:.1f} MiB in {where}; encoding {prompts} prompts took {encode_s:.1f} s")
    print(f"scoring 1 image on {args.scored_classes} classes: {results[0].denoiser_calls} denoiser calls at batch "
          f"{model.engine.batch_size}, {score_s:.1f} s")
    if device.type == "cuda":
        print(f"peak CUDA memory while scoring: {peak_memory_bytes(device) / 2**20:.1f} MiB "
              f"({held / 2**20:.1f} MiB held before it: the weights, and the table where it is on the device)")
    print(f"peak resident set: {rss0:.0f} MiB before the table, {rss1:.0f} MiB after it, {rss_mib():.0f} MiB after "
          f"scoring (+{rss_mib() - rss1:.0f} MiB: the batch's activations)")
    return {"prompts": prompts, "rows": rows, "table_bytes": nbytes, "streamed": model.classes.streamed,
            "denoiser_calls": results[0].denoiser_calls, "encode_s": encode_s, "denoiser_batch": model.engine.batch_size,
            "cuda_peak_bytes": peak_memory_bytes(device) if device.type == "cuda" else None, "cuda_held_bytes": held,
            "rss_mib": {"before_table": rss0, "after_table": rss1, "after_scoring": rss_mib()}}


if __name__ == "__main__":
    main()
