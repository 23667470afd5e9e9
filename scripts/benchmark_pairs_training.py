"""Seconds per training step of the ``--data pairs`` models, and the diffusion check's cost per UNet row.

Builds the models exactly as the training scripts do and times ``--steps`` optimiser steps after
``--warmup`` untimed ones (batch drawing, tokenising, forward, backward, AdamW; the diffusion
run's EMA update too), then one no-grad UNet forward over ``--eval-rows`` rows in chunks of
``--chunk`` (what a validation check pays per (scene, class, timestep)). Prints one line per figure.

Usage:
    python scripts/benchmark_pairs_training.py --threads 2
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the training scripts (shared cores)

import torch  # noqa: E402



def load_training_script(name: str):
    """A sibling script as a module (scripts/ is not a package)."""
    import importlib.util
    import sys
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(f"_script_{name}", Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _time(step, steps: int, warmup: int) -> float:
    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def diffusion_step_seconds(base_channels: int, batch_size: int, steps: int, warmup: int,
                           data: str = "pairs") -> float:
    from diffusers.training_utils import EMAModel

    script = load_training_script("train_diffusion_tiny")
    config = script.TrainConfig(data=data, base_channels=base_channels, batch_size=batch_size)
    tokenizer, text_encoder, unet, scheduler = script.build_components(0, data, base_channels)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    ema = EMAModel(params, decay=0.999, foreach=True)
    gen = torch.Generator().manual_seed(0)
    if data == "pairs":
        next_batch = script.pairs_batches(tokenizer, config)
    else:  # the shipped single-garment model: a baseline measured under the same load
        next_batch = script.fashion_batches(tokenizer, config, gen)[-1]

    def step() -> None:
        loss = script.denoising_loss(unet, text_encoder, scheduler, *next_batch(), gen)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        ema.step(params)

    return _time(step, steps, warmup)


def clip_step_seconds(batch_size: int, steps: int, warmup: int) -> float:
    import open_clip
    from open_clip.loss import ClipLoss

    script = load_training_script("train_clip_tiny")
    config = script.TrainConfig(data="pairs", batch_size=batch_size)
    name, cfg = script.MODELS["pairs"]
    open_clip.add_model_config(script.write_config(_tmp_dir(), data="pairs"))
    model, _, _ = open_clip.create_model_and_transforms(name)
    tokenizer = open_clip.get_tokenizer(name)
    pp = model.visual.preprocess_cfg
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    next_batch = script.pairs_batches(tokenizer, config, pp)
    loss_fn = ClipLoss()

    def step() -> None:
        x, tokens = next_batch()
        loss = loss_fn(model.encode_image(x, normalize=True), model.encode_text(tokens, normalize=True),
                       model.logit_scale.exp())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return _time(step, steps, warmup)


@torch.no_grad()
def unet_row_seconds(base_channels: int, rows: int, chunk: int) -> float:
    script = load_training_script("train_diffusion_tiny")
    _, _, unet, _ = script.build_components(0, "pairs", base_channels)
    unet.eval()
    x = torch.randn(chunk, 3, 28, 56)
    cond = torch.randn(chunk, 32, 64)
    unet(x, 500, encoder_hidden_states=cond)  # warm-up
    start = time.perf_counter()
    for _ in range(max(1, rows // chunk)):
        unet(x, 500, encoder_hidden_states=cond)
    return (time.perf_counter() - start) / (max(1, rows // chunk) * chunk)


def _tmp_dir():
    import tempfile
    from pathlib import Path

    return Path(tempfile.mkdtemp(prefix="bench_pairs_"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--diffusion", default="16:64,32:64", help="base_channels:batch_size, comma-separated")
    parser.add_argument("--baseline", action="store_true",
                        help="also time the shipped Fashion-MNIST diffusion config (base 16, batch 64)")
    parser.add_argument("--clip", default="256", help="batch sizes, comma-separated")
    parser.add_argument("--eval-rows", type=int, default=2000)
    parser.add_argument("--chunk", type=int, default=250)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"threads {args.threads}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)
    if args.baseline:
        s = diffusion_step_seconds(16, 64, args.steps, args.warmup, data="fashion_mnist")
        print(f"diffusion fashion_mnist (shipped config) base_channels 16 batch 64: {s:.3f} s/step", flush=True)
    for spec in filter(None, args.diffusion.split(",")):
        base, batch = map(int, spec.split(":"))
        s = diffusion_step_seconds(base, batch, args.steps, args.warmup)
        print(f"diffusion pairs  base_channels {base} batch {batch}: {s:.3f} s/step", flush=True)
        r = unet_row_seconds(base, args.eval_rows, args.chunk)
        print(f"diffusion pairs  base_channels {base} no-grad UNet row (chunk {args.chunk}): {1e3 * r:.2f} ms", flush=True)
    for batch in map(int, filter(None, args.clip.split(","))):
        s = clip_step_seconds(batch, args.steps, args.warmup)
        print(f"clip pairs  batch {batch}: {s:.3f} s/step", flush=True)


if __name__ == "__main__":
    main()
