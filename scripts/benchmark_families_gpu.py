"""Denoiser cost of full-size architectures, built from their configs with random weights.

For each model it prints milliseconds per denoiser call (one (image, prompt, noise level) row),
the achieved model FLOP/s utilisation (FLOPs of one forward counted by torch's FlopCounterMode,
against the device's peak), and images per hour under the default schedule at 10 and 1,000
classes (denoiser calls per image are inputs: the defaults are this project's measurements,
see docs/). No weights are downloaded: the architectures are the published configs.

Each model is timed under every ``--variants`` entry of the package's fast path
(``families/fast_path.py``): ``eager``, ``channels_last`` (UNets), ``compile`` (torch.compile,
its warm-up printed apart) and ``cuda_graphs`` (compile with CUDA graphs), one after another on
the same weights in one process; with
``--probe-batch`` it also prints the largest batch that fits (``batch_size=auto``'s probe,
``scoring/batching.py``) and the peak memory at the timed batch.

    python scripts/benchmark_families_gpu.py                       # all four, on the GPU, bf16 (a few minutes)
    python scripts/benchmark_families_gpu.py --variants eager,channels_last,compile --probe-batch
    python scripts/benchmark_families_gpu.py --models sd2 --batch auto --probe-cap 1024   # at batch_size=auto's batch
    python scripts/benchmark_families_gpu.py --models sd2 --device cpu --dtype float32 --resolution 64 --batch 1 \
        --repeats 1 --warmup 0                                      # a CPU smoke test of the script path

``scripts/gpu_figures.sh`` runs the issue-27 set on a lent GPU in one go.
"""
from __future__ import annotations

import argparse
import time

import torch

# Published configs of the denoisers (diffusers names), without their text encoders.
CONFIGS = {
    "sd2": ("UNet2DConditionModel", dict(
        sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024, use_linear_projection=True)),
    "sdxl": ("UNet2DConditionModel", dict(
        sample_size=128, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816)),
    "sd3": ("SD3Transformer2DModel", dict(
        sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
        num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
        pos_embed_max_size=192)),
    "flux": ("FluxTransformer2DModel", dict(
        patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
        axes_dims_rope=(16, 56, 56))),
}
NATIVE = {"sd2": 512, "sdxl": 1024, "sd3": 1024, "flux": 1024}
TEXT_TOKENS = {"sd2": 77, "sdxl": 77, "sd3": 77 + 256, "flux": 512}
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "4090": 165.0}  # dense bf16


def build(name: str, device: torch.device, dtype: torch.dtype):
    import diffusers

    diffusers.utils.logging.set_verbosity_error()   # its float32-modules notice does not apply to random weights
    cls_name, config = CONFIGS[name]
    with torch.device("meta"):
        model = getattr(diffusers, cls_name)(**config)
    model = model.to_empty(device=device).to(dtype)
    for p in model.parameters():          # random weights, small enough to keep activations finite
        torch.nn.init.normal_(p, std=0.02)
    return model.eval()


def inputs(name: str, batch: int, resolution: int, device: torch.device, dtype: torch.dtype) -> tuple[tuple, dict]:
    """Random inputs of the shapes each family's scorer passes (see clip_benchmark_diffusion/families)."""
    lat = resolution // 8
    t = torch.full((batch,), 500.0, device=device)
    if name in ("sd2", "sdxl"):
        x = torch.randn(batch, 4, lat, lat, device=device, dtype=dtype)
        kw = {"encoder_hidden_states": torch.randn(batch, 77, 1024 if name == "sd2" else 2048, device=device, dtype=dtype)}
        if name == "sdxl":
            ids = torch.tensor([resolution, resolution, 0, 0, resolution, resolution], device=device, dtype=dtype)
            kw["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, 1280, device=device, dtype=dtype),
                                       "time_ids": ids.expand(batch, 6)}
        return (x, t), kw
    if name == "sd3":
        x = torch.randn(batch, 16, lat, lat, device=device, dtype=dtype)
        return (), {"hidden_states": x, "timestep": t, "pooled_projections": torch.randn(batch, 2048, device=device, dtype=dtype),
                    "encoder_hidden_states": torch.randn(batch, TEXT_TOKENS[name], 4096, device=device, dtype=dtype)}
    seq = (lat // 2) ** 2
    img_ids = torch.zeros(seq, 3, device=device)
    img_ids[:, 1] = torch.arange(lat // 2, device=device).repeat_interleave(lat // 2)
    img_ids[:, 2] = torch.arange(lat // 2, device=device).repeat(lat // 2)
    return (), {"hidden_states": torch.randn(batch, seq, 64, device=device, dtype=dtype), "timestep": t / 1000,
                "guidance": torch.full((batch,), 3.5, device=device),
                "pooled_projections": torch.randn(batch, 768, device=device, dtype=dtype),
                "encoder_hidden_states": torch.randn(batch, 512, 4096, device=device, dtype=dtype),
                "txt_ids": torch.zeros(512, 3, device=device), "img_ids": img_ids}


def _timed(fn, device: torch.device, repeats: int) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def _variant(model, name: str, variant: str):
    """The model as the package's fast path would run it (families/fast_path.py); None: not applicable."""
    from clip_benchmark_diffusion.families.fast_path import FastPath, apply_fast_path

    unet = CONFIGS[name][0].startswith("UNet")
    if variant == "channels_last" and not unet:
        return None
    path = FastPath(compile={"compile": "on", "cuda_graphs": "cuda_graphs"}.get(variant, "off"),
                    channels_last=unet and variant in ("channels_last", "compile", "cuda_graphs"))
    apply_fast_path(model, path)
    return path


def measure(name: str, args, device: torch.device, dtype: torch.dtype) -> list[dict]:
    from torch.utils.flop_counter import FlopCounterMode

    from clip_benchmark_diffusion.families.fast_path import prepare_input

    resolution = args.resolution or NATIVE[name]
    model = build(name, device, dtype)
    params = sum(p.numel() for p in model.parameters())
    rows = []
    with torch.no_grad():
        probed = None
        if args.probe_batch or args.batch == "auto":
            from clip_benchmark_diffusion.scoring.batching import largest_fitting_batch
            from clip_benchmark_diffusion.scoring.batching import is_out_of_memory

            def fits(n: int) -> bool:
                try:
                    pa, pkw = inputs(name, n, resolution, device, dtype)
                    model(*pa, **pkw)
                    return True
                except Exception as exc:  # noqa: BLE001 - out of memory means "does not fit"
                    if not is_out_of_memory(exc):
                        raise
                    del exc
                    torch.cuda.empty_cache()
                    return False
            probed = largest_fitting_batch(fits, cap=args.probe_cap)
        batch = probed if args.batch == "auto" else int(args.batch)
        a, kw = inputs(name, batch, resolution, device, dtype)
        counter = FlopCounterMode(display=False)
        with counter:
            model(*a, **kw)
        flops = counter.get_total_flops() / batch
        for variant in args.variants.split(","):
            path = _variant(model, name, variant)
            if path is None:
                continue
            x_args = tuple(prepare_input(t, path) if t.dim() == 4 else t for t in a)
            x_kw = {k: prepare_input(v, path) if isinstance(v, torch.Tensor) and v.dim() == 4 else v
                    for k, v in kw.items()}
            call = lambda: model(*x_args, **x_kw)  # noqa: E731
            start = time.perf_counter()
            call()                                # the warm-up: compile time for compiled variants
            warm = time.perf_counter() - start
            for _ in range(args.warmup):
                call()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            seconds = _timed(call, device, args.repeats) / batch
            peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
            rows.append({"model": name, "variant": variant, "params_B": params / 1e9, "resolution": resolution,
                         "batch": batch,
                         "tflop_per_call": flops / 1e12, "ms_per_call": 1000 * seconds,
                         "achieved_tflops": flops / seconds / 1e12, "warmup_s": warm, "peak_gib": peak,
                         "largest_batch": probed})
            _variant(model, name, "eager")        # undo before the next variant
    del model
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="sd2,sdxl,sd3,flux")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--batch", default="16",
                   help="denoiser batch (rows per forward), or auto: the largest that fits, as batch_size=auto probes it")
    p.add_argument("--resolution", type=int, default=0, help="image side in px (0: each model's native)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--variants", default="eager,channels_last", help="eager, channels_last, compile, cuda_graphs")
    p.add_argument("--probe-batch", action="store_true", help="also probe the largest batch that fits")
    p.add_argument("--probe-cap", type=int, default=256, help="the probe's largest batch (batch_size=auto's: 1024)")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="device peak (0: from the device name)")
    p.add_argument("--calls", default="10:210,1000:25000",
                   help="classes:denoiser calls per image under the default schedule (measured: demo, docs/)")
    args = p.parse_args(argv)
    if args.batch != "auto" and not args.batch.isdigit():
        p.error(f"--batch must be a positive integer or auto, got {args.batch!r}")
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    peak = args.peak_tflops
    if not peak and device.type == "cuda":
        gpu = torch.cuda.get_device_name(device)
        peak = next((v for k, v in PEAK_TFLOPS.items() if k in gpu), 0.0)
    calls = {int(k): int(v) for k, v in (item.split(":") for item in args.calls.split(","))}
    head = ["model", "variant", "params B", "px", "batch", "TFLOP/call", "ms/call", "MFU", "first call s", "peak GiB",
            "largest batch"] + [f"img/h @{c} cls" for c in calls]
    print(f"{device} {torch.cuda.get_device_name(device) if device.type == 'cuda' else ''}, {args.dtype}, "
          f"batch {args.batch}")
    print(" | ".join(head))
    out = []
    for name in args.models.split(","):
        for r in measure(name, args, device, dtype):
            out.append(r)
            mfu = f"{100 * r['achieved_tflops'] / peak:.0f}%" if peak else "-"
            per_hour = [f"{3600 / (n * r['ms_per_call'] / 1000):.1f}" for n in calls.values()]
            print(" | ".join([name, r["variant"], f"{r['params_B']:.2f}", str(r["resolution"]), str(r["batch"]),
                              f"{r['tflop_per_call']:.3f}", f"{r['ms_per_call']:.2f}", mfu, f"{r['warmup_s']:.1f}",
                              "-" if r["peak_gib"] is None else f"{r['peak_gib']:.1f}",
                              str(r["largest_batch"] or "-"), *per_hour]), flush=True)
    return out


if __name__ == "__main__":
    main()
