"""Throughput per denoiser call (issue 27): auto batch size, streamed conditioning, the fast path."""
from __future__ import annotations

import json
import math
import re

import pytest
import torch

from analytic_denoiser import SHAPE, cands, grid, images, oracle
from cli_helpers import load_script
from clip_benchmark_diffusion.errors import UserError
from clip_benchmark_diffusion.families.fast_path import FastPath
from clip_benchmark_diffusion.options import ScoringOptions
from clip_benchmark_diffusion.scoring import batching
from clip_benchmark_diffusion.scoring.engine import Candidates, ScoringEngine
from test_out_of_memory import _SmallDevice


@pytest.mark.parametrize("limit", [1, 2, 5, 8, 37, 64, 1000, 1024, 5000])
def test_the_probe_finds_the_largest_batch_under_an_injected_memory_limit(limit):
    probes: list[int] = []

    def fits(n: int) -> bool:
        probes.append(n)
        return n <= limit

    assert batching.largest_fitting_batch(fits) == min(limit, batching.AUTO_MAX)
    assert len(probes) <= 2 * math.log2(batching.AUTO_MAX) + 1      # doubling, then bisection
    assert max(probes) <= batching.AUTO_MAX


def _engine(options, denoiser, probe_batch=None, notes=None):
    return ScoringEngine(denoiser, grid(options.max_sample_count, "epsilon", options.weighting), "epsilon", options,
                         "cpu", note=None if notes is None else notes.append, probe_batch=probe_batch)


def test_auto_batch_probes_the_device_then_scores_exactly_as_a_fixed_batch():
    torch.manual_seed(0)
    protos = torch.randn(5, *SHAPE)
    x = images(protos, [0, 3, 1, 4, 2, 2], noise=1.0)
    options = ScoringOptions(strategy="anytime", min_samples=4, max_samples=20, alpha=0.5, batch_size=64)
    fixed = _engine(options, oracle("epsilon", "gaussian"))
    reference = fixed.score(x, list(range(len(x))), cands(protos))
    small, notes = _SmallDevice(oracle("epsilon", "gaussian"), limit=37), []
    auto = _engine(options.replace(batch_size="auto"), small, probe_batch=True, notes=notes)
    results = auto.score(x, list(range(len(x))), cands(protos))
    assert auto.batch_size == 37                                   # the largest the "device" holds
    assert len(notes) == 1 and re.fullmatch(r"denoiser batch auto: 37 rows fit this model, resolution and dtype "
                                            r"\(probed in \d+\.\d s; batch_size=N sets it\)", notes[0])
    assert auto.probe_seconds > 0                                  # apart from the scoring's denoiser_seconds
    assert max(small.sizes) == 37
    assert auto.stats.denoiser_calls == fixed.stats.denoiser_calls  # probes are not counted as scoring
    for a, b in zip(results, reference):
        assert torch.equal(a.outcome.rank, b.outcome.rank)
        assert torch.allclose(a.outcome.mean_error, b.outcome.mean_error, rtol=1e-6, equal_nan=True)


def test_auto_batch_off_cuda_is_the_old_default_and_no_probe():
    small = _SmallDevice(oracle("epsilon", "gaussian"), limit=10**6)
    engine = _engine(ScoringOptions(), small)
    assert ScoringOptions().batch_size == 0 and engine.batch_size == batching.AUTO_CPU == 64
    assert small.calls == 0
    assert ScoringOptions().replace(batch_size="auto") == ScoringOptions()
    with pytest.raises(UserError, match="batch_size must be 0"):
        ScoringOptions(batch_size=-1)


def test_static_rows_pad_a_partial_batch_to_one_of_five_sizes_and_waste_at_most_half():
    assert [batching.static_rows(n, 200) for n in (200, 150, 101, 100, 51, 50, 26, 25, 14, 13, 1)] == \
        [200, 200, 200, 100, 100, 50, 50, 25, 25, 13, 13]
    assert batching.static_rows(300, 200) == 300                    # never cut: above the batch, as it is
    for batch in (1, 7, 64, 200, 1000):
        sizes = {batching.static_rows(n, batch) for n in range(1, batch + 1)}
        assert batch in sizes and len(sizes) <= batching.STATIC_SIZES
        for n in range(1, batch + 1):
            rows = batching.static_rows(n, batch)
            assert n <= rows and (rows < 2 * n or rows == -(-batch // 16))


def test_a_compiled_denoiser_gets_padded_batches_and_the_same_scores_and_the_probe_runs_eagerly():
    """compile=on: each batch the denoiser sees has one of the static sizes of the batch in use (the
    auto probe's excepted, run eagerly), and every result equals an unpadded run's."""
    torch.manual_seed(0)
    protos = torch.randn(5, *SHAPE)
    x = images(protos, [0, 3, 1, 4, 2, 2], noise=1.0)
    options = ScoringOptions(strategy="anytime", min_samples=4, max_samples=20, alpha=0.5, batch_size=64)
    reference = _engine(options, oracle("epsilon", "gaussian")).score(x, list(range(len(x))), cands(protos))
    small = _SmallDevice(oracle("epsilon", "gaussian"), limit=37)
    engine = _engine(options.replace(batch_size="auto", compile="on"), small, probe_batch=True)
    results = engine.score(x, list(range(len(x))), cands(protos))
    probes = small.sizes[: small.sizes.index(37) + 1]
    assert probes == [8, 16, 32, 36, 37] and engine.batch_size == 37  # 64 failed: bisected, then 37 fits
    assert set(small.sizes[len(probes):]) <= {37, 19, 10, 5, 3} and len(set(small.sizes[len(probes):])) > 1
    assert engine.stats.denoiser_calls == sum(r.denoiser_calls for r in results)   # padding is not counted
    for a, b in zip(results, reference):
        assert torch.equal(a.outcome.rank, b.outcome.rank)
        assert torch.allclose(a.outcome.mean_error, b.outcome.mean_error, rtol=1e-6, equal_nan=True)
    compiles = []
    doubled = torch.compile(lambda t: t * 2, backend=lambda gm, _: compiles.append(gm) or gm.forward, dynamic=False)
    with batching.eager_probes():
        assert torch.equal(doubled(torch.ones(3)), torch.full((3,), 2.0)) and not compiles
    doubled(torch.ones(3))
    assert len(compiles) == 1


def test_a_table_too_large_for_the_free_memory_is_streamed_from_the_cpu():
    table = {"encoder_hidden_states": torch.randn(80, 16, 8), "pooled_projections": torch.randn(80, 32)}
    nbytes = batching.table_bytes(table)
    assert nbytes == 80 * (16 * 8 + 32) * 4
    placed, streamed = batching.place_table(table, torch.device("cuda"), free_bytes=lambda: 4 * nbytes - 1)
    assert streamed and all(v.device.type == "cpu" for v in placed.values())
    placed, streamed = batching.place_table(table, torch.device("cpu"))
    assert not streamed and placed["pooled_projections"] is table["pooled_projections"]
    rows = torch.tensor([5, 0, 79, 5])
    got = batching.gather_rows(table, rows, torch.device("cpu"))
    assert torch.equal(got["encoder_hidden_states"], table["encoder_hidden_states"][rows])


@pytest.mark.parametrize("ensemble, rows_per_class", [("error_mean", 3), ("embedding_mean", 1)])
def test_the_memory_script_builds_the_table_through_clip_benchmark_and_scores_on_it(ensemble, rows_per_class):
    """scripts/measure_conditioning_memory.py at a small scale: clip_benchmark's own ImageNet names and
    templates through its zero_shot_classifier, one row per prompt or per class, calls on the scored classes."""
    out = load_script("measure_conditioning_memory").main(
        ["--device", "cpu", "--classes", "4", "--templates", "3", "--scored-classes", "2", "--template-ensemble", ensemble])
    assert out["prompts"] == 12 and out["rows"] == 4 * rows_per_class and not out["streamed"]
    assert out["denoiser_calls"] == 2 * rows_per_class * 2          # 2 classes x their rows x n_samples=[2]
    assert out["table_bytes"] == out["rows"] * (17 * 96 + 96) * 4   # the tiny SD3-format rows, float32


def test_the_denoiser_profile_script_times_each_variant_and_each_block(capsys):
    ms = load_script("profile_denoiser_cpu").main(
        ["--batch", "2", "--rounds", "2", "--repeats", "1", "--variants", "float32,bfloat16+classic_attention"])
    assert list(ms) == ["float32", "bfloat16+classic_attention"] and all(len(v) == 2 and min(v) > 0 for v in ms.values())
    out = capsys.readouterr().out
    assert "classic_attention: largest difference from float32" in out
    shares = re.findall(r"(\w+(?:\.\d)?)(\*?) ([\d.]+)%", out.split("float32 forward by block")[1].splitlines()[0])
    assert [name for name, _, _ in shares][:4] == ["time_embedding", "conv_in", "down_blocks.0", "down_blocks.1"]
    assert {name for name, star, _ in shares if star} == {"down_blocks.2", "mid_block", "up_blocks.0"}
    assert 50 < sum(float(v) for _, _, v in shares) <= 100.5


@pytest.mark.slow
def test_the_family_benchmark_times_a_full_size_unet_at_the_batch_it_probed():
    """scripts/benchmark_families_gpu.py --batch auto (the issue's "utilisation at the auto batch size"),
    on the CPU at 64 px with the probe capped at 2: the timed batch is the probed one."""
    rows = load_script("benchmark_families_gpu").main(
        ["--models", "sd2", "--device", "cpu", "--dtype", "float32", "--resolution", "64", "--batch", "auto",
         "--probe-cap", "2", "--repeats", "1", "--warmup", "0", "--variants", "eager"])
    assert [(r["model"], r["variant"], r["batch"], r["largest_batch"]) for r in rows] == [("sd2", "eager", 2, 2)]
    assert 0.8 < rows[0]["params_B"] < 0.9 and rows[0]["ms_per_call"] > 0     # SD2's UNet: 865M parameters
    assert 0.01 < rows[0]["tflop_per_call"] < 0.02                                # 8x8 latents


def test_a_streamed_table_scores_as_the_resident_one():
    """The engine gathers each batch's rows where the table lives: a table kept off the device (here:
    a CPU table for a CPU engine, the path a CUDA run takes with pinned memory) gives the same errors."""
    torch.manual_seed(1)
    protos = torch.randn(4, *SHAPE)
    x = images(protos, [0, 1, 2, 3, 1], noise=1.0)
    options = ScoringOptions(strategy="full", n_samples=(6,), batch_size=5)
    resident = cands(protos)
    streamed, was_streamed = batching.place_table(resident.cond, torch.device("cuda"), free_bytes=lambda: 0)
    assert was_streamed
    a = _engine(options, oracle("epsilon", "gaussian")).score(x, list(range(len(x))), resident)
    b = _engine(options, oracle("epsilon", "gaussian")).score(x, list(range(len(x))),
                                                             Candidates(cond=streamed, members=resident.members))
    for ra, rb in zip(a, b):
        assert torch.equal(ra.outcome.mean_error, rb.outcome.mean_error)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_streamed_table_scores_as_the_resident_one_on_cuda():
    torch.manual_seed(1)
    protos = torch.randn(4, *SHAPE)
    x = images(protos, [0, 1, 2, 3, 1], noise=1.0).cuda()
    options = ScoringOptions(strategy="full", n_samples=(6,), batch_size=5)
    base = cands(protos)
    resident = Candidates(cond={k: v.cuda() for k, v in base.cond.items()}, members=base.members)
    streamed, was_streamed = batching.place_table(base.cond, torch.device("cuda"), free_bytes=lambda: 0)
    assert was_streamed and all(v.is_pinned() for v in streamed.values())
    run = lambda c: ScoringEngine(oracle("epsilon", "gaussian"), grid(6), "epsilon", options, "cuda").score(  # noqa: E731
        x, list(range(len(x))), c)
    for ra, rb in zip(run(resident), run(Candidates(cond=streamed, members=base.members))):
        assert torch.equal(ra.outcome.mean_error, rb.outcome.mean_error)


def test_fast_path_options_that_change_float_results_enter_the_store_key_only_when_on():
    base = ScoringOptions()
    assert "compile" not in base.fingerprint_dict() and "channels_last" not in base.fingerprint_dict()
    assert base.replace(compile="on").fingerprint_dict()["compile"] == "on"
    assert base.replace(channels_last="on").fingerprint_dict()["channels_last"] == "on"
    assert base.replace(batch_size=7).fingerprint_dict() == base.fingerprint_dict()   # batching changes no score
    with pytest.raises(UserError, match="compile=cuda_graphs needs a CUDA device"):
        FastPath.resolve(base.replace(compile="cuda_graphs"), torch.device("cpu"), "unet")
    assert FastPath.resolve(base, torch.device("cuda"), "unet").channels_last       # auto: CUDA UNets only
    assert not FastPath.resolve(base, torch.device("cpu"), "unet").channels_last
    assert not FastPath.resolve(base.replace(channels_last="on"), torch.device("cuda"), "transformer").channels_last


class _ThreadRecorder:
    """The oracle denoiser, noting the thread and torch thread count of each call."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def __call__(self, x_t, levels, cond):
        import threading

        self.calls.append((threading.get_ident(), torch.get_num_threads(), len(x_t), torch.is_grad_enabled()))
        return self.inner(x_t, levels, cond)


def test_cpu_workers_split_each_batch_over_threads_and_score_as_one_call():
    """cpu_workers=2: every denoiser batch runs as two row slices in two threads, each with half of torch's
    threads, outside autograd; the scores equal one call's, and the caller's thread count is untouched."""
    import threading

    torch.manual_seed(0)
    protos = torch.randn(5, *SHAPE)
    x = images(protos, [0, 3, 1, 4, 2, 2], noise=1.0)
    options = ScoringOptions(strategy="anytime", min_samples=4, max_samples=20, alpha=0.5, batch_size=16)
    one = _ThreadRecorder(oracle("epsilon", "gaussian"))
    reference = _engine(options, one).score(x, list(range(len(x))), cands(protos))
    two = _ThreadRecorder(oracle("epsilon", "gaussian"))
    threads_before = torch.get_num_threads()
    results = _engine(options.replace(cpu_workers=2), two).score(x, list(range(len(x))), cands(protos))
    assert torch.get_num_threads() == threads_before
    assert {c[0] for c in one.calls} == {threading.get_ident()}
    sliced = [c for c in two.calls if c[0] != threading.get_ident()]
    assert len({c[0] for c in sliced}) == 2                                  # two worker threads
    assert all(c[2] == 1 for c in two.calls if c[0] == threading.get_ident())   # only a 1-row batch stays whole
    assert {c[1] for c in sliced} == {max(1, threads_before // 2)}
    assert not any(c[3] for c in sliced)
    assert sum(c[2] for c in two.calls) == sum(c[2] for c in one.calls)     # the same rows, in slices
    assert max(c[2] for c in two.calls) == 8                                # a batch of 16 in halves
    for a, b in zip(results, reference):
        assert torch.equal(a.outcome.rank, b.outcome.rank)
        assert torch.equal(a.outcome.mean_error, b.outcome.mean_error)


def test_cpu_workers_are_checked_kept_out_of_the_key_and_ignored_off_the_cpu():
    base = ScoringOptions()
    assert base.cpu_workers == 1
    assert base.replace(cpu_workers=4).fingerprint_dict() == base.fingerprint_dict()   # how fast, not what
    with pytest.raises(UserError, match="cpu_workers=0 must be 1"):
        base.replace(cpu_workers=0)
    with pytest.raises(UserError, match="drop compile=on or set cpu_workers=1"):
        base.replace(cpu_workers=2, compile="on")
    assert batching.CpuWorkers(2, torch.device("cuda")).workers == 1
    assert batching.CpuWorkers(3, torch.device("cpu"), threads=8).threads == 2
    ran = []
    out = batching.CpuWorkers(3, torch.device("cpu")).map(lambda s: (ran.append(s), torch.arange(10)[s])[1], 2)
    assert torch.equal(out, torch.arange(2)) and len(ran) == 2              # no more slices than rows


def _classify(model, tokenizer, x):
    from clip_benchmark.metrics import zeroshot_classification as zc

    model.begin_task("zeroshot_classification", expected_images=len(x))
    clf = zc.zero_shot_classifier(model, tokenizer, ["zero", "one", "two"], ["a photo of {c}."], "cpu")
    logits, _ = zc.run_classification(model, clf, [(x, torch.zeros(len(x), dtype=torch.long))], "cpu")
    return logits


def test_channels_last_is_recorded_in_the_result_and_scores_as_the_default(tiny_sd, tmp_path):
    """channels_last=on reorders the UNet's memory: float rounding may change (so it is in the store key
    and the result), the ranking of the tiny model's classes does not; turning it off restores the layout."""
    from tiny_models import load_tiny_classifier

    opts = tmp_path / "o.json"
    opts.write_text(json.dumps({"strategy": "full", "n_samples": [6], "batch_size": 8}))
    model, transform, tokenizer = load_tiny_classifier(tiny_sd, opts)
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    default = _classify(model, tokenizer, x)
    errors = torch.stack([r.outcome.mean_error for r in model.record.results])
    assert model.result_metadata("open_clip")["fast_path"] == {"compile": "off", "channels_last": False,
                                                               "attention": "sdpa"}
    model.set_options(model.options.replace(channels_last="on"))
    fast = _classify(model, tokenizer, x)
    meta = model.result_metadata("open_clip")
    assert meta["fast_path"]["channels_last"] is True and meta["scoring"]["channels_last"] == "on"
    conv = model.model.denoiser.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert torch.equal(fast.argmax(1), default.argmax(1))
    assert torch.allclose(torch.stack([r.outcome.mean_error for r in model.record.results]), errors, rtol=1e-4)
    assert meta["memory"]["denoiser_batch"] == 8 and meta["memory"]["peak_bytes"] > 0
    assert meta["memory"]["conditioning_bytes"] == 3 * 16 * 8 * 4   # 3 prompts x 16 tokens x width 8, float32
    model.set_options(model.options.replace(channels_last="off"))
    _classify(model, tokenizer, x[:1])
    assert model.model.denoiser.conv_in.weight.is_contiguous()


@pytest.mark.slow
def test_compile_scores_as_eager_and_reports_its_warm_up_once(tiny_sd, tmp_path, capfd):
    from tiny_models import load_tiny_classifier

    opts = tmp_path / "o.json"
    opts.write_text(json.dumps({"strategy": "full", "n_samples": [4], "batch_size": 8}))
    model, transform, tokenizer = load_tiny_classifier(tiny_sd, opts)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    eager = _classify(model, tokenizer, x)
    errors = torch.stack([r.outcome.mean_error for r in model.record.results])
    model.set_options(model.options.replace(compile="on"))
    compiled = _classify(model, tokenizer, x)
    meta = model.result_metadata("open_clip")["fast_path"]
    assert meta["compile"] == "on" and meta["compile_warmup_s"] > 0
    assert 1 <= meta["compiled_shapes"] <= batching.STATIC_SIZES   # static shapes: padded partial batches
    err = capfd.readouterr().err                                     # nothing a user cannot act on
    assert "Dynamo detected" not in err and "CUDA_HOME" not in err and "Warning" not in err, err[-2000:]
    assert torch.equal(compiled.argmax(1), eager.argmax(1))
    assert torch.allclose(torch.stack([r.outcome.mean_error for r in model.record.results]), errors, rtol=1e-4)
