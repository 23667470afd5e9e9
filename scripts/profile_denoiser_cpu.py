"""One denoiser forward of a shipped model on the CPU under each lever left to try (issue 27): what a
call costs per row, where its time goes by block, and how far each variant's output moves.

Timings are of the bare forward (no engine), interleaved over ``--rounds`` rounds of ``--repeats``
calls each, on one random batch of ``--batch`` rows (the recipe's batch is 200); medians per round
are printed, so the spread between rounds shows how far the machine's load moved them.

Variants:

- ``float32``, ``bfloat16``: the weights cast (``dtype=bfloat16`` of the package);
- ``bfloat16+channels_last``: NHWC activations (the ``channels_last`` option);
- ``classic_attention``, ``bfloat16+classic_attention``: diffusers' ``AttnProcessor`` (baddbmm,
  softmax, bmm) in place of PyTorch SDPA;
- ``sdpa_math``, ``bfloat16+sdpa_math``: SDPA forced to its math backend;
- ``bfloat16+jit_onednn``: TorchScript trace and freeze with oneDNN Graph fusion;
- ``+compile`` (``bfloat16+compile``, ``bfloat16+classic_attention+compile``): ``torch.compile`` with static
  shapes, as ``compile=on`` runs it (its warm-up is the first call, untimed).

    python scripts/profile_denoiser_cpu.py                      # diffusion_tiny, batch 200
    python scripts/profile_denoiser_cpu.py --variants float32,bfloat16 --rounds 5
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import time
from collections.abc import Callable

import torch

VARIANTS = ("float32", "bfloat16", "bfloat16+channels_last", "classic_attention", "bfloat16+classic_attention",
            "sdpa_math", "bfloat16+sdpa_math", "bfloat16+jit_onednn", "bfloat16+compile",
            "bfloat16+classic_attention+compile")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="diffusion_tiny")
    p.add_argument("--batch", type=int, default=200)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--variants", default=",".join(VARIANTS))
    return p.parse_args(argv)


def build(name: str, unet: torch.nn.Module, x: torch.Tensor, t: torch.Tensor,
          cond: torch.Tensor) -> Callable[[], torch.Tensor]:
    """A no-argument forward of ``unet`` under variant ``name``; the package's own options (classic
    attention, channels_last, compile) applied as the package applies them (``families/fast_path.py``)."""
    from clip_benchmark_diffusion.families.fast_path import FastPath, apply_fast_path, prepare_input
    from torch.nn.attention import SDPBackend, sdpa_kernel

    parts = set(name.split("+"))
    model = copy.deepcopy(unet)
    if "bfloat16" in parts:
        model, x, cond = model.to(torch.bfloat16), x.bfloat16(), cond.bfloat16()
    path = FastPath(compile="on" if "compile" in parts else "off", channels_last="channels_last" in parts,
                    attention="classic" if "classic_attention" in parts else "sdpa")
    apply_fast_path(model, path)
    x = prepare_input(x, path)

    def backend() -> contextlib.AbstractContextManager:
        return sdpa_kernel(SDPBackend.MATH) if "sdpa_math" in parts else contextlib.nullcontext()
    if "jit_onednn" in parts:
        class Positional(torch.nn.Module):
            def __init__(self, inner: torch.nn.Module) -> None:
                super().__init__()
                self.inner = inner

            def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
                return self.inner(x, t, encoder_hidden_states=cond, return_dict=False)[0]

        torch.jit.enable_onednn_fusion(True)
        traced = torch.jit.freeze(torch.jit.trace(Positional(model).eval(), (x, t, cond), check_trace=False))
        for _ in range(3):          # the profiling runs that let oneDNN Graph fuse
            traced(x, t, cond)
        return lambda: traced(x, t, cond).float()

    def forward() -> torch.Tensor:
        with backend():
            return model(x, t, encoder_hidden_states=cond).sample.float()
    return forward


def block_shares(unet: torch.nn.Module, run: Callable[[], torch.Tensor], repeats: int) -> dict[str, float]:
    """Each top-level block's share of the forward's wall time, by forward hooks."""
    blocks = {"time_embedding": unet.time_embedding, "conv_in": unet.conv_in}        # in the forward's order
    blocks.update({f"down_blocks.{i}": b for i, b in enumerate(unet.down_blocks)})
    blocks["mid_block"] = unet.mid_block
    blocks.update({f"up_blocks.{i}": b for i, b in enumerate(unet.up_blocks)})
    blocks["conv_out"] = unet.conv_out
    spent = {k: 0.0 for k in blocks}
    started: dict[str, float] = {}
    hooks = []
    for k, mod in blocks.items():
        hooks.append(mod.register_forward_pre_hook(lambda m, a, k=k: started.__setitem__(k, time.perf_counter())))
        hooks.append(mod.register_forward_hook(
            lambda m, a, o, k=k: spent.__setitem__(k, spent[k] + time.perf_counter() - started[k])))
    try:
        run()
        spent.update({k: 0.0 for k in spent})
        start = time.perf_counter()
        for _ in range(repeats):
            run()
        total = time.perf_counter() - start
    finally:
        for h in hooks:
            h.remove()
    return {k: v / total for k, v in spent.items()}


@torch.no_grad()
def main(argv: list[str] | None = None) -> dict[str, list[float]]:
    args = parse_args(argv)
    torch._dynamo.config.recompile_limit = 64     # the compiled variants share the UNet's forward
    from clip_benchmark_diffusion.adapter.loader import load_diffusion_classifier

    model, _, _ = load_diffusion_classifier(args.model, "default", device="cpu")
    unet = model.model.denoiser.eval()
    cfg = unet.config
    torch.manual_seed(0)
    table = model.model.encode_prompts([f"a photo of a {c}." for c in ("shirt", "shoe", "bag")],
                                       model.options)["encoder_hidden_states"]
    x = torch.randn(args.batch, cfg.in_channels, cfg.sample_size, cfg.sample_size)
    t = torch.randint(0, 1000, (args.batch,))
    cond = table[torch.randint(0, len(table), (args.batch,))]
    names = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    runs = {name: build(name, unet, x, t, cond) for name in names}
    reference = build("float32", unet, x, t, cond)()
    print(f"{args.model}: {type(unet).__name__} {cfg.sample_size} px, channels {list(cfg.block_out_channels)}, "
          f"batch {args.batch}, {torch.get_num_threads()} threads")
    for name, run in runs.items():
        print(f"  {name}: largest difference from float32 {float((run() - reference).abs().max()):.2e}")
    ms: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(args.rounds):
        for name, run in runs.items():
            run()
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                run()
                times.append(time.perf_counter() - start)
            ms[name].append(1000 * statistics.median(times) / args.batch)
    base = statistics.median(ms[names[0]])
    print(f"ms per row (median of {args.repeats} calls, per round), and the median's ratio to {names[0]}:")
    for name in names:
        rounds = " ".join(f"{v:.2f}" for v in ms[name])
        print(f"  {name:28s} {rounds}   median {statistics.median(ms[name]):.2f}  "
              f"x{base / statistics.median(ms[name]):.2f}")
    for dtype in ("float32", "bfloat16"):
        net = unet if dtype == "float32" else copy.deepcopy(unet).to(torch.bfloat16)
        xx, cc = x.to(getattr(torch, dtype)), cond.to(getattr(torch, dtype))
        shares = block_shares(net, lambda: net(xx, t, encoder_hidden_states=cc).sample, args.repeats)
        print(f"{dtype} forward by block (* reads the text): " + ", ".join(
            f"{k}{'*' if reads_text(unet, k) else ''} {100 * v:.1f}%" for k, v in shares.items()))
    return ms


def reads_text(unet: torch.nn.Module, block: str) -> bool:
    """Whether a top-level block has cross-attention (the time embedding reads only t here)."""
    return bool(getattr(unet.get_submodule(block), "has_cross_attention", False))


if __name__ == "__main__":
    main()
