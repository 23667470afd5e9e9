"""The denoiser's fast path (issue 27): how a loaded denoiser runs, apart from what it computes.

Each option is a scoring option (``options.py``), applied here to a loaded denoiser, recorded in the
result metadata and, when it changes float results, in the store key:

- ``compile``: ``torch.compile`` of the denoiser in place (``nn.Module.compile``: the weights, and so
  the weights fingerprint, are untouched), with static shapes: the engine pads a partial batch to one
  of a few row counts (``scoring/batching.py: static_rows``), each compiled once. Dynamic shapes
  compiled once but ran the shipped UNet 15% slower on a CPU than static ones (docs/throughput.md).
  ``cuda_graphs`` also replays CUDA graphs (inductor's ``reduce-overhead``). The warm-ups (the first
  call at each row count) are timed and reported together.
- ``channels_last``: NHWC activations for UNets (cuDNN's fast layout); ``auto`` keeps it to CUDA.
- ``attention``: diffusers routes every attention through PyTorch's SDPA (``AttnProcessor2_0`` and its
  relatives), the default; ``classic`` swaps in diffusers' own ``AttnProcessor`` (baddbmm, softmax,
  bmm) where one exists: on a CPU, SDPA's kernel is slow for the small heads of small UNets, and
  inductor fuses the classic form's softmax. The report names the processors in use.
- dtype: the ``dtype`` option (bfloat16 runs on CPUs with AVX512-BF16 or AMX; :func:`cpu_bf16_note`
  says when a CPU lacks them, where bfloat16 is emulated and slower than float32).
"""
from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from clip_benchmark_diffusion.errors import UserError
from clip_benchmark_diffusion.options import ScoringOptions


@dataclass(frozen=True)
class FastPath:
    """The fast-path settings resolved for one device and one denoiser."""

    compile: str          # off / on / cuda_graphs
    channels_last: bool   # NHWC input and weights (UNets only)
    attention: str = "sdpa"   # sdpa / classic

    @classmethod
    def resolve(cls, options: ScoringOptions, device: torch.device, denoiser_kind: str) -> "FastPath":
        """``options`` on ``device`` for a ``unet`` or ``transformer`` denoiser; CUDA graphs off CUDA
        are refused in one line (before any weights move)."""
        options.fast_path.check_device(device.type)
        wanted = {"auto": device.type == "cuda", "on": True, "off": False}[options.channels_last]
        return cls(compile=options.compile, channels_last=wanted and denoiser_kind == "unet",
                   attention=options.attention)


@dataclass
class Warmup:
    """The first calls' seconds under ``torch.compile``: one per input shape (its compile time, paid
    once per process), summed."""

    seconds: float | None = None
    shapes: set[tuple[int, ...]] = field(default_factory=set)


@dataclass
class AppliedFastPath:
    """What was applied to one denoiser, for the result metadata."""

    path: FastPath
    attention: str
    warmup: Warmup = field(default_factory=Warmup)

    def metadata(self) -> dict[str, Any]:
        out: dict[str, Any] = {"compile": self.path.compile, "channels_last": self.path.channels_last,
                               "attention": self.attention}
        if self.path.compile != "off":
            out["compile_warmup_s"] = None if self.warmup.seconds is None else round(self.warmup.seconds, 2)
            out["compiled_shapes"] = len(self.warmup.shapes)
        return out


def apply_fast_path(denoiser: torch.nn.Module, path: FastPath) -> AppliedFastPath:
    """Apply ``path`` to ``denoiser`` in place (its memory format, attention processors and compiled
    call), undoing a previous path's: options can change on a loaded model (``DiffusionClassifier.set_options``)."""
    denoiser.to(memory_format=torch.channels_last if path.channels_last else torch.contiguous_format)
    set_attention(denoiser, path.attention)
    # nn.Module.compile() keeps the compiled call here; None is eager again (torch has no public undo)
    denoiser._compiled_call_impl = None
    if path.compile != "off":
        quiet_compile_notices()
        mode = "reduce-overhead" if path.compile == "cuda_graphs" else None
        denoiser.compile(mode=mode, dynamic=False)
    return AppliedFastPath(path=path, attention=attention_kind(denoiser))


def quiet_compile_notices() -> None:
    """Silence what compiling a diffusers model prints that a user cannot act on: dynamo tracing
    through diffusers' cached torch-version checks, and, on a machine without CUDA, the notice that
    inductor's C++ kernels are built without a CUDA runtime."""
    warnings.filterwarnings("ignore", message=r"Dynamo detected a call to a `functools.lru_cache`-wrapped function",
                            category=UserWarning)
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)


def timed_first_call(applied: AppliedFastPath, shape: tuple[int, ...],
                     call: Callable[[], torch.Tensor]) -> torch.Tensor:
    """Run ``call`` on an input of ``shape``; under ``torch.compile`` the first call at each shape
    compiles, and is timed as part of the warm-up."""
    if applied.path.compile == "off" or shape in applied.warmup.shapes:
        return call()
    start = time.perf_counter()
    out = call()
    applied.warmup.seconds = (applied.warmup.seconds or 0.0) + time.perf_counter() - start
    applied.warmup.shapes.add(shape)
    return out


def prepare_input(x: torch.Tensor, path: FastPath) -> torch.Tensor:
    """The denoiser input in the memory format its weights use."""
    return x.contiguous(memory_format=torch.channels_last) if path.channels_last and x.dim() == 4 else x


# diffusers' SDPA processors with a classic form (the same attention through baddbmm, softmax, bmm)
_CLASSIC = {"AttnProcessor2_0": "AttnProcessor", "AttnAddedKVProcessor2_0": "AttnAddedKVProcessor"}


def attention_modules(denoiser: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The denoiser's attention layers by name: every module with a diffusers processor (``Attention``
    and the newer attention classes; DiT's transformer has no ``attn_processors`` of its own)."""
    return {name: m for name, m in denoiser.named_modules()
            if callable(getattr(m, "set_processor", None)) and getattr(m, "processor", None) is not None}


def set_attention(denoiser: torch.nn.Module, kind: str) -> None:
    """``classic``: each processor with a classic form swapped for it (the model's own processors are
    kept, for ``sdpa`` to put back); a model with none is refused in one line."""
    from diffusers.models import attention_processor as ap

    layers = attention_modules(denoiser)
    saved: dict[str, object] | None = getattr(denoiser, "_cbd_sdpa_processors", None)
    if kind == "sdpa":
        if saved is not None:
            for name, processor in saved.items():
                layers[name].set_processor(processor)
            del denoiser._cbd_sdpa_processors
        return
    if saved is not None:                      # already classic
        return
    swappable = {name: m for name, m in layers.items() if type(m.processor).__name__ in _CLASSIC}
    if not swappable:
        names = ", ".join(sorted({type(m.processor).__name__ for m in layers.values()})) or "none"
        raise UserError(f"attention=classic: this denoiser's attention ({names}) has no classic form in "
                        "diffusers; use attention=sdpa")
    denoiser._cbd_sdpa_processors = {name: m.processor for name, m in swappable.items()}
    for m in swappable.values():
        m.set_processor(getattr(ap, _CLASSIC[type(m.processor).__name__])())


def attention_kind(denoiser: torch.nn.Module) -> str:
    """``sdpa`` when every attention processor of a diffusers model calls PyTorch's SDPA, ``classic``
    when every one is a classic form, else their names."""
    layers = attention_modules(denoiser)
    if not layers:
        return "none"
    names = sorted({type(m.processor).__name__ for m in layers.values()})
    if all(n in _CLASSIC.values() for n in names):
        return "classic"
    # diffusers names its SDPA processors *2_0; FLUX's calls SDPA through diffusers' attention dispatcher
    return "sdpa" if all(n.endswith("2_0") or n == "FluxAttnProcessor" for n in names) else ",".join(names)


def cpu_bf16_note(dtype: torch.dtype, device: torch.device) -> str | None:
    """A warning for bfloat16 on a CPU without native bfloat16 arithmetic (emulated: slower than float32)."""
    if dtype != torch.bfloat16 or device.type != "cpu":
        return None
    if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return None
    return ("dtype=bfloat16 on a CPU without AVX512-BF16 or AMX: bfloat16 is emulated there and usually "
            "slower than float32 (dtype=float32 is the CPU default)")
