"""Capture what a diffusers pipeline hands its denoiser and scheduler, to compare with the package.

Used by ``test_pipeline_parity.py``: the oracle is diffusers itself (a pipeline's ``__call__``
and its scheduler), so these helpers only record, never compute: a forward hook binds every
denoiser call to the parameter names of ``forward`` (positional or keyword, defaults filled in),
and a wrapper around ``scheduler.step`` / ``add_noise`` / ``scale_noise`` keeps their inputs and
outputs.
"""
from __future__ import annotations

import inspect
from typing import Any

import torch


def _detach(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _detach(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_detach(v) for v in value)
    return value


class DenoiserCalls:
    """Every forward call of ``module`` while active: ``{"inputs": {param: value}, "output": tensor}``."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module
        self.signature = inspect.signature(module.forward)
        self.calls: list[dict[str, Any]] = []
        self._handle = None

    def _hook(self, module, args, kwargs, output):
        bound = self.signature.bind(*args, **kwargs)
        bound.apply_defaults()
        out = output[0] if isinstance(output, tuple) else output.sample
        self.calls.append({"inputs": _detach(dict(bound.arguments)), "output": out.detach().clone()})

    def __enter__(self) -> "DenoiserCalls":
        self._handle = self.module.register_forward_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()


class SchedulerCalls:
    """Records ``step``, ``add_noise`` and ``scale_noise`` of one scheduler instance (the methods are
    wrapped on the instance, so the scheduler computes exactly as it would unobserved)."""

    def __init__(self, scheduler: Any) -> None:
        self.scheduler = scheduler
        self.steps: list[dict[str, Any]] = []
        self.noising: list[dict[str, Any]] = []
        cls = type(scheduler)
        if hasattr(cls, "step"):
            scheduler.step = self._step
        if hasattr(cls, "add_noise"):
            scheduler.add_noise = self._add_noise
        if hasattr(cls, "scale_noise"):
            scheduler.scale_noise = self._scale_noise

    def _step(self, model_output, timestep, sample, *args, return_dict: bool = True, **kwargs):
        # The sigma index must be read before the step advances it (flow and Euler schedulers).
        index = getattr(self.scheduler, "step_index", None)
        index = self.scheduler.begin_index if index is None and hasattr(self.scheduler, "begin_index") else index
        out = type(self.scheduler).step(self.scheduler, model_output, timestep, sample, *args, return_dict=True,
                                        **kwargs)
        self.steps.append({"model_output": _detach(model_output), "timestep": _detach(timestep),
                           "sample": _detach(sample), "index": index, "out": _detach(dict(out))})
        return out if return_dict else out.to_tuple()

    def _add_noise(self, original_samples, noise, timesteps):
        out = type(self.scheduler).add_noise(self.scheduler, original_samples, noise, timesteps)
        self.noising.append({"clean": _detach(original_samples), "noise": _detach(noise),
                             "timestep": _detach(timesteps), "noised": _detach(out)})
        return out

    def _scale_noise(self, sample, timestep, noise=None):
        out = type(self.scheduler).scale_noise(self.scheduler, sample, timestep, noise)
        self.noising.append({"clean": _detach(sample), "noise": _detach(noise), "timestep": _detach(timestep),
                             "noised": _detach(out)})
        return out


def assert_same_denoiser_inputs(oracle: dict[str, Any], ours: dict[str, Any], row: int = 0,
                                rtol: float = 1e-5, atol: float = 1e-5, ignore: tuple[str, ...] = ("return_dict",),
                                ) -> None:
    """Every ``forward`` argument of the pipeline's call (batch of one) equals row ``row`` of ours.

    Tensors are compared in value, shape and dtype (timesteps in value only: a scheduler's int64
    ``t`` and our float ``t`` are the same input once the denoiser embeds them, and a 0-d timestep is
    broadcast over the batch by the denoiser); ``None`` must be ``None``; dicts key by key.
    ``return_dict`` is how the caller wants the output wrapped, not an input of the model.
    """
    names = (set(oracle) | set(ours)) - set(ignore)
    for name in sorted(names):
        _assert_same(name, oracle.get(name), ours.get(name), row, rtol, atol)


def _assert_same(name: str, theirs: Any, mine: Any, row: int, rtol: float, atol: float) -> None:
    if isinstance(theirs, dict) or isinstance(mine, dict):
        assert isinstance(theirs, dict) and isinstance(mine, dict), f"{name}: {type(theirs)} vs {type(mine)}"
        assert set(theirs) == set(mine), f"{name}: keys {sorted(theirs)} vs {sorted(mine)}"
        for key in theirs:
            _assert_same(f"{name}[{key!r}]", theirs[key], mine[key], row, rtol, atol)
        return
    if theirs is None or mine is None:
        assert theirs is None and mine is None, f"{name}: pipeline passes {_short(theirs)}, package {_short(mine)}"
        return
    if isinstance(theirs, torch.Tensor):
        assert isinstance(mine, torch.Tensor), f"{name}: tensor vs {type(mine)}"
        if "timestep" in name:
            mine_row = mine.reshape(-1)[row] if mine.ndim else mine
            theirs_row = theirs.reshape(-1)[0] if theirs.ndim else theirs
            torch.testing.assert_close(mine_row.double(), theirs_row.double(), rtol=1e-6, atol=0,
                                       msg=lambda m: f"{name}: {m}")
            return
        mine_row = mine[row:row + 1]
        assert mine_row.shape == theirs.shape, f"{name}: shape {tuple(theirs.shape)} vs ours {tuple(mine_row.shape)}"
        assert mine_row.dtype == theirs.dtype, f"{name}: dtype {theirs.dtype} vs ours {mine_row.dtype}"
        torch.testing.assert_close(mine_row, theirs, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")
        return
    assert theirs == mine, f"{name}: pipeline passes {theirs!r}, package {mine!r}"


def _short(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor{tuple(value.shape)}"
    return repr(value)
