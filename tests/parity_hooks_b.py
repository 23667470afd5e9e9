"""Helpers for the transformer families' pipeline-parity tests: record what a denoiser receives and
returns, record what a scheduler computes inside a real diffusers pipeline call, and compare two
denoiser calls argument by argument (positional arguments bound to their parameter names)."""
from __future__ import annotations

import inspect
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable

import torch

# Arguments that do not reach the computation (or are None on both sides in every family).
NOT_INPUTS = ("return_dict", "joint_attention_kwargs", "cross_attention_kwargs", "attention_kwargs",
              "controlnet_block_samples", "controlnet_single_block_samples", "controlnet_blocks_repeat")


@dataclass
class Call:
    inputs: dict[str, Any]    # every argument by parameter name
    output: Any


@contextmanager
def record_calls(module: torch.nn.Module, rewrite: Callable[[int, dict], dict] | None = None):
    """Yield a list that fills with one :class:`Call` per forward of ``module``; ``rewrite(i, inputs)``
    may replace the inputs of call ``i`` before it runs (documented per use)."""
    calls: list[Call] = []
    sig = inspect.signature(module.forward)

    def pre(mod, args, kwargs):
        if rewrite is None:
            return None
        bound = sig.bind(*args, **kwargs)
        return (), rewrite(len(calls), dict(bound.arguments))

    def post(mod, args, kwargs, out):
        bound = sig.bind(*args, **kwargs)
        calls.append(Call(dict(bound.arguments), out))

    handles = [module.register_forward_pre_hook(pre, with_kwargs=True),
               module.register_forward_hook(post, with_kwargs=True)]
    try:
        yield calls
    finally:
        for h in handles:
            h.remove()


@contextmanager
def record_method(obj: Any, name: str):
    """Wrap ``obj.name`` (a bound method, e.g. a scheduler's ``step``) for the block; yield a list of
    ``(args, kwargs, result, state)`` per call, ``state`` being ``obj.step_index`` before the call."""
    records: list[tuple[tuple, dict, Any, Any]] = []
    original = getattr(obj, name)

    def wrapper(*args, **kwargs):
        state = getattr(obj, "step_index", None)
        result = original(*args, **kwargs)
        records.append((args, kwargs, result, state))
        return result

    setattr(obj, name, wrapper)
    try:
        yield records
    finally:
        delattr(obj, name)   # back to the class's method


def _output_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, tuple):
        return out[0]
    return out.sample


def output_of(call: Call) -> torch.Tensor:
    return _output_tensor(call.output)


def assert_same_inputs(got: dict[str, Any], want: dict[str, Any], atol: float = 1e-6, where: str = "") -> None:
    """Every argument either side gives (not None) is given by both, with the same values: tensors to
    ``atol`` after broadcasting (a 0-d timestep and a (1,) one are the same input), dicts recursively."""
    names = sorted({k for k, v in {**got, **want}.items() if k not in NOT_INPUTS}
                   - {k for k in {**got, **want} if got.get(k) is None and want.get(k) is None})
    for k in names:
        g, w = got.get(k), want.get(k)
        label = f"{where}{k}"
        assert g is not None and w is not None, f"{label}: package gives {g is not None}, pipeline gives {w is not None}"
        if isinstance(w, dict):
            assert isinstance(g, dict), label
            assert_same_inputs(g, w, atol, where=f"{label}.")
        elif isinstance(w, torch.Tensor):
            assert isinstance(g, torch.Tensor), label
            if g.ndim == w.ndim:
                assert g.shape == w.shape, f"{label}: package {tuple(g.shape)}, pipeline {tuple(w.shape)}"
            gb, wb = torch.broadcast_tensors(g.detach().double(), w.detach().double())
            assert gb.shape == wb.shape and torch.allclose(gb, wb, atol=atol, rtol=1e-5), \
                f"{label}: max |diff| {float((gb - wb).abs().max()):.3g} (package {tuple(g.shape)} {g.dtype}, " \
                f"pipeline {tuple(w.shape)} {w.dtype})"
        else:
            assert g == w, f"{label}: package {g!r}, pipeline {w!r}"
