"""Accuracy intervals and the paired McNemar test, and the ``compare`` command's input checks."""
from __future__ import annotations

import json
import math

import pytest

from cli_helpers import assert_clean_failure, console
from clip_benchmark_diffusion.compare import accuracy_interval, paired_comparison
from clip_benchmark_diffusion.predictions import predictions_path


def wilson(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """The Wilson score interval written out, to check scipy's against."""
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return centre - half, centre + half


@pytest.mark.parametrize("k,n", [(879, 1000), (40, 40), (0, 12), (1516, 1700)])
def test_accuracy_interval_is_the_wilson_interval(k, n):
    acc = accuracy_interval([True] * k + [False] * (n - k))
    low, high = wilson(k, n)
    assert (acc.correct, acc.total) == (k, n)
    assert acc.low == pytest.approx(low, abs=1e-9) and acc.high == pytest.approx(high, abs=1e-9)
    assert acc.low <= acc.value <= acc.high


def test_paired_comparison_is_the_exact_mcnemar_test():
    # 10 images only A gets right, 2 only B, 88 both or neither: p = 2 * P(Binom(12, 1/2) <= 2)
    a = [True] * 10 + [False] * 2 + [True] * 50 + [False] * 38
    b = [False] * 10 + [True] * 2 + [True] * 50 + [False] * 38
    paired = paired_comparison(a, b)
    assert (paired.a_only, paired.b_only, paired.total) == (10, 2, 100)
    assert paired.difference == pytest.approx(0.08)
    assert paired.p_value == pytest.approx(2 * (1 + 12 + 66) / 2 ** 12)
    assert paired_comparison(b, a).p_value == pytest.approx(paired.p_value)
    assert paired_comparison(a, a).p_value == 1.0                       # no discordant image: no evidence
    with pytest.raises(ValueError, match="same images"):
        paired_comparison(a, b[:-1])


def _result(folder, name, dataset, targets, top1, model=None, pretrained="x"):
    path = folder / f"{name}.json"
    path.write_text(json.dumps({"dataset": dataset, "model": model or name, "pretrained": pretrained,
                                "task": "zeroshot_classification",
                                "metrics": {"acc1": sum(t == p for t, p in zip(targets, top1)) / len(targets)}}))
    predictions_path(path).write_text(
        "".join(json.dumps({"target": t, "top5": [p, (p + 1) % 10], "denoiser_calls": None}) + "\n"
                for t, p in zip(targets, top1)))
    return path


def test_compare_command_prints_intervals_and_the_paired_test(tmp_path):
    targets = [i % 10 for i in range(30)]
    a = _result(tmp_path, "model_a", "wds/x", targets, targets)                          # 30/30
    b = _result(tmp_path, "model_b", "wds/x", targets, [t if i % 3 else (t + 1) % 10 for i, t in enumerate(targets)])
    proc = console("clip_benchmark_diffusion", "compare", str(a), str(b), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("model_a: top-1 100.00% (95% CI 88.6-100.0, 30/30)")
    assert lines[1].startswith("model_b: top-1 66.67%")
    assert "+33.33 points on the same 30 images; 10 right only by the first, 0 only by the second" in lines[2]
    assert f"p = {2 / 2 ** 10:.3g}" in lines[2]


def test_two_checkpoints_of_one_model_are_told_apart_by_their_weights(tmp_path):
    targets = [i % 10 for i in range(20)]
    a = _result(tmp_path, "old", "wds/x", targets, targets, model="diffusion_tiny", pretrained="default")
    b = _result(tmp_path, "new", "wds/x", targets, targets, model="diffusion_tiny", pretrained="/runs/ckpt_7k")
    proc = console("clip_benchmark_diffusion", "compare", str(a), str(b), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("diffusion_tiny (default): top-1 100.00%")
    assert lines[1].startswith("diffusion_tiny (/runs/ckpt_7k): top-1 100.00%")
    assert lines[2].startswith("diffusion_tiny (default) - diffusion_tiny (/runs/ckpt_7k): +0.00 points")


def test_compare_command_refuses_runs_it_cannot_pair(tmp_path):
    a = _result(tmp_path, "model_a", "wds/x", [0, 1, 2], [0, 1, 2])
    other = _result(tmp_path, "model_b", "wds/y", [0, 1, 2], [0, 1, 1])
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps({"dataset": "wds/x", "model": "m"}))
    for args, expected in (((a, other), "did not evaluate the same images"),
                           ((a, bare), "CLIP_BENCHMARK_DIFFUSION_DUMP_PREDICTIONS=1"),
                           ((a, tmp_path / "missing.json"), "no result file")):
        proc = console("clip_benchmark_diffusion", "compare", *map(str, args), cwd=tmp_path)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
        assert_clean_failure(proc, expected)


def test_a_result_rewritten_without_predictions_is_not_compared_with_the_old_ones(tiny_sd, digits_wds, tmp_path,
                                                                                   inproc):
    """The first run dumps predictions; the second rewrites the same result without them. compare once read
    the first run's file and reported its accuracy under the second's name, exit 0."""
    from cli_helpers import quick_options

    opts = quick_options(tmp_path, strategy="full", n_samples=[1])
    common = ["--dataset", "wds/digits", "--dataset_root", str(digits_wds), "--output", "r.json"]
    first = inproc("--pretrained_model", f"diffusion_sd2@{opts},{tiny_sd}", *common, cwd=tmp_path,
                   env={"CLIP_BENCHMARK_DIFFUSION_DUMP_PREDICTIONS": "1"})
    assert first.returncode == 0, first.stderr[-2000:]
    assert predictions_path(tmp_path / "r.json").is_file()
    (tmp_path / "other.json").write_bytes((tmp_path / "r.json").read_bytes())
    predictions_path(tmp_path / "other.json").write_bytes(predictions_path(tmp_path / "r.json").read_bytes())
    second = inproc("--pretrained_model", f"diffusion_sd2@fast,{tiny_sd}", *common, cwd=tmp_path,
                    env={"CLIP_BENCHMARK_DIFFUSION_DUMP_PREDICTIONS": ""})
    assert second.returncode == 0, second.stderr[-2000:]
    stale = predictions_path(tmp_path / "r.json")
    if not stale.exists():   # removed with the rewrite; put it back as a user copying folders around would
        stale.write_bytes(predictions_path(tmp_path / "other.json").read_bytes())
    proc = console("clip_benchmark_diffusion", "compare", str(tmp_path / "other.json"), str(tmp_path / "r.json"),
                   cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout
    assert_clean_failure(proc, "r.predictions.jsonl beside", "is left from an earlier run: the result was written "
                         "without predictions", "CLIP_BENCHMARK_DIFFUSION_DUMP_PREDICTIONS=1")


def test_a_predictions_file_of_another_run_is_refused(tmp_path):
    import hashlib

    from clip_benchmark_diffusion.predictions import DIGEST_FIELD

    targets = [i % 10 for i in range(10)]
    a = _result(tmp_path, "a", "wds/x", targets, targets)
    b = _result(tmp_path, "b", "wds/x", targets, targets[::-1])
    for path in (a, b):
        data = json.loads(path.read_text())
        digest = hashlib.sha256(predictions_path(path).read_bytes()).hexdigest()
        path.write_text(json.dumps({**data, DIGEST_FIELD: digest}))
    assert console("clip_benchmark_diffusion", "compare", str(a), str(b), cwd=tmp_path).returncode == 0
    predictions_path(b).write_bytes(predictions_path(a).read_bytes())   # b's file replaced by a's
    proc = console("clip_benchmark_diffusion", "compare", str(a), str(b), cwd=tmp_path)
    assert proc.returncode == 2
    assert_clean_failure(proc, "b.predictions.jsonl beside", "the result was rewritten by another run")
