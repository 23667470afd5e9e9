"""A denoiser that returns NaN or inf stops the run at its first batch with one line, not a hang
(NaN once meant "not computed yet", so the same items were asked for forever) and not a silent
class-0 win at confidence 1 (inf ties every class)."""
from __future__ import annotations

import time

import pytest
import torch

from analytic_denoiser import SHAPE, cands, grid, images, oracle
from cli_helpers import assert_clean_failure, console, quick_options
from clip_benchmark_diffusion.options import ScoringOptions
try:
    from clip_benchmark_diffusion.scoring.engine import NonFiniteOutput, ScoringEngine
except ImportError: pass


def _poisoned(value: float):
    """The analytic denoiser with one output value replaced by ``value`` in every batch."""
    inner = oracle("epsilon", "gaussian")

    def denoise(x_t, levels, cond):
        out = inner(x_t, levels, cond).clone()
        out.view(len(out), -1)[0, 0] = value
        return out
    return denoise


@pytest.mark.parametrize("value, kind", [(float("nan"), "NaN"), (float("inf"), "inf"), (-float("inf"), "inf")])
@pytest.mark.parametrize("strategy", ["full", "anytime"])
def test_the_engine_refuses_a_non_finite_batch_at_once(value, kind, strategy):
    torch.manual_seed(0)
    protos = torch.randn(3, *SHAPE)
    options = ScoringOptions(strategy=strategy, n_samples=(8,), max_samples=20, batch_size=4)
    engine = ScoringEngine(_poisoned(value), grid(options.max_sample_count), "epsilon", options, "cpu")
    with pytest.raises(NonFiniteOutput, match=f"{kind} for 1 of 4 inputs"):
        engine.score(images(protos, [0, 1]), [0, 1], cands(protos))
    assert engine.stats.denoiser_batches == 1


def _poison_folder(folder, value: float) -> None:
    """The saved unet's output bias set to ``value``: every output is then non-finite."""
    from safetensors.torch import load_file, save_file

    path = folder / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(path)
    state["conv_out.bias"][:] = value
    save_file(state, path, metadata={"format": "pt"})


@pytest.mark.parametrize("value, kind", [(float("nan"), "NaN"), (float("inf"), "inf")])
def test_a_checkpoint_with_non_finite_outputs_is_one_line_through_the_stock_command(value, kind, tmp_path,
                                                                                  digits_wds):
    from tiny_models import save_tiny_sd

    model = save_tiny_sd(tmp_path / "model")
    _poison_folder(model, value)
    opts = quick_options(tmp_path)
    start = time.perf_counter()
    # A hang (the bug) ends in TimeoutExpired: the run needs about 15 s here.
    proc = console("clip_benchmark", "eval", "--num_workers", "0", "--pretrained_model", f"diffusion_sd2@{opts},{model}",
                   "--dataset", "wds/digits", "--dataset_root", str(digits_wds), "--output", "digits_{model}.json",
                   cwd=tmp_path, timeout=180)
    seconds = time.perf_counter() - start
    line = assert_clean_failure(proc, f"returned {kind} for 32 of 32 inputs in float32", str(model),
                                "diffusion_sd2", cwd=tmp_path)
    assert proc.returncode == 2 and "check the weights" in line
    print(f"refused in {seconds:.1f} s: {line}")
    assert seconds < 120


def test_float16_on_a_family_that_overflows_in_it_is_warned_about():
    from clip_benchmark_diffusion.adapter.loader import float16_note
    from clip_benchmark_diffusion.registry import get_family

    note = float16_note(get_family("flux"), torch.float16)
    assert note and "dtype=float16 on a flux model" in note and "use dtype=bfloat16 or float32" in note
    assert float16_note(get_family("flux"), torch.bfloat16) is None
    assert float16_note(get_family("stable_diffusion"), torch.float16) is None   # its own default
