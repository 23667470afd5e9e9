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
