"""Expected calibration error and its bins; the compare command's calibration lines and diagram."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from cli_helpers import assert_clean_failure, console
from clip_benchmark_diffusion_demo import CLIP_TINY_DIR
from clip_benchmark_diffusion.calibration import reliability
from clip_benchmark_diffusion.predictions import predictions_path


def test_ece_of_a_hand_computed_case():
    # Bin 15 (0.933, 1]: 4 images at 0.95, 3 right: |0.75 - 0.95| = 0.2. Bin 9 (0.533, 0.6]: 2 at
    # 0.55, 1 right: 0.05. ECE = (4 * 0.2 + 2 * 0.05) / 6 = 0.15.
    rel = reliability([0.95] * 4 + [0.55] * 2, [True, True, True, False, True, False])
    assert rel.ece == pytest.approx(0.15)
    assert rel.count.tolist() == [0] * 8 + [2] + [0] * 5 + [4]
    assert rel.accuracy[14] == 0.75 and rel.confidence[8] == pytest.approx(0.55)
    assert np.isnan(rel.accuracy[0])


def test_bins_are_right_closed():
    rel = reliability([0.0, 1 / 15, 1 / 15 + 1e-9, 1.0], [True] * 4)
    assert rel.count[0] == 2 and rel.count[1] == 1 and rel.count[14] == 1


def test_calibrated_and_overconfident_predictions_are_told_apart():
    rng = np.random.default_rng(0)
    conf = rng.uniform(0.1, 1.0, 20_000)
    assert reliability(conf, rng.uniform(size=conf.size) < conf).ece < 0.015
    assert reliability(conf, rng.uniform(size=conf.size) < conf ** 2).ece > 0.1


def test_bad_confidences_are_refused():
    with pytest.raises(ValueError, match="one confidence per image"):
        reliability([0.5], [True, False])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        reliability([1.5], [True])


def _run(folder, name, targets, top1, confidence):
    path = folder / f"{name}.json"
    path.write_text(json.dumps({"dataset": "wds/x", "model": name, "pretrained": "x", "metrics": {}}))
    predictions_path(path).write_text("".join(
        json.dumps({"target": t, "top5": [p], "confidence": c, "denoiser_calls": None}) + "\n"
        for t, p, c in zip(targets, top1, confidence)))
    return path


def test_compare_prints_ece_and_draws_the_reliability_diagram(tmp_path):
    targets = [0, 1, 2, 3, 4, 5]
    a = _run(tmp_path, "model_a", targets, [0, 1, 2, 0, 4, 0], [0.95] * 4 + [0.55] * 2)   # the case above
    b = _run(tmp_path, "model_b", targets, targets, [1.0] * 6)                              # right and sure
    png = tmp_path / "rel.png"
    proc = console("clip_benchmark_diffusion", "compare", str(a), str(b), "--reliability", str(png), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "model_a: expected calibration error 15.00 points (mean top-1 confidence 81.67%" in proc.stdout
    assert "model_b: expected calibration error 0.00 points" in proc.stdout
    assert "model_a - model_b: ECE +15.00 points (95% paired bootstrap CI" in proc.stdout
    assert png.stat().st_size > 10_000


def test_reliability_needs_confidences(tmp_path):
    a = _run(tmp_path, "model_a", [0, 1], [0, 1], [None, None])
    proc = console("clip_benchmark_diffusion", "compare", str(a), str(a), "--reliability", str(tmp_path / "r.png"),
                   cwd=tmp_path)
    assert_clean_failure(proc, "neither predictions file holds per-image confidences")
    assert "expected calibration error" not in proc.stdout


def test_image_results_carry_probabilities_through_the_store_payload():
    import torch

    from clip_benchmark_diffusion.scoring.outcome import ImageResult, Outcome

    outcome = Outcome(rank=torch.tensor([1, 0, 2]), mean_error=torch.tensor([0.2, 0.1, 0.9]),
                      samples=torch.tensor([8, 8, 4]), prob=torch.tensor([0.25, 0.75, 0.0], dtype=torch.float64))
    payload = json.loads(json.dumps(ImageResult(outcome, denoiser_calls=20, seed=3).to_payload()))
    back = ImageResult.from_payload(payload)
    assert back.outcome.confidence == 0.75 and torch.equal(back.outcome.prob, outcome.prob)
    del payload["prob"]                                   # a payload stored before probabilities existed
    old = ImageResult.from_payload(payload)
    assert old.outcome.prob is None and old.outcome.confidence is None
    assert torch.equal(old.outcome.rank, outcome.rank)


# -- temperature-scaled probabilities from mean errors --------------------------------------------

def test_error_softmax_is_a_sigmoid_of_the_error_gap_for_two_classes_and_ignores_unscored_ones():
    from clip_benchmark_diffusion.calibration import error_softmax

    prob = error_softmax(np.array([0.010, 0.013, 0.001]), np.array([50, 12, 0]), temperature=0.002)
    assert prob[2] == 0.0   # never scored (outside a shortlist): no probability, however small its error
    assert prob[0] == pytest.approx(1 / (1 + np.exp(-(0.013 - 0.010) / 0.002)))
    assert prob.sum() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="positive"):
        error_softmax(np.zeros(2), np.ones(2), 0.0)


def test_fit_temperature_recovers_the_temperature_that_generated_the_labels():
    from clip_benchmark_diffusion.calibration import fit_temperature

    rng = np.random.default_rng(0)
    n, g, t0 = 4000, 10, 0.003
    err = 0.02 + 0.004 * rng.standard_normal((n, g))
    logits = -err / t0
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    labels = np.array([rng.choice(g, p=row) for row in p])
    samples = np.full((n, g), 50)
    fitted = fit_temperature(err, samples, labels)
    assert fitted == pytest.approx(t0, rel=0.08)
    # Units do not matter: errors 1,000x larger need a 1,000x larger temperature.
    assert fit_temperature(1000 * err, samples, labels) == pytest.approx(1000 * fitted, rel=1e-3)
    # Labels independent of the errors: the likelihood wants a flat softmax (a much larger T).
    assert fit_temperature(err, samples, rng.integers(0, g, n)) > 20 * t0


def test_error_softmax_power_bends_the_scaled_gap_and_power_one_is_plain_temperature_scaling():
    from clip_benchmark_diffusion.calibration import error_softmax

    err, samples = np.array([0.0, 0.003, 0.012]), np.array([50, 50, 50])
    z = np.exp(-np.array([0.0, 1.5, 6.0]) ** 0.7)           # |gap / T| ** power, T = 0.002
    assert error_softmax(err, samples, 0.002, 0.7) == pytest.approx(z / z.sum())
    assert error_softmax(err, samples, 0.002, 1.0) == pytest.approx(error_softmax(err, samples, 0.002))
    # Odd in the gap: a negative paired gap (a class that beat the top-1 on the few samples it saw) stays favoured.
    neg = error_softmax(np.array([0.0, -0.003]), np.array([50, 4]), 0.002, 0.7)
    assert neg[1] == pytest.approx(1 / (1 + np.exp(-(1.5 ** 0.7))))
    for bad in (0.0, -1.0, np.inf):
        with pytest.raises(ValueError, match="power"):
            error_softmax(err, samples, 0.002, bad)


def _labels_drawn_from(err: np.ndarray, temperature: float, power: float, rng) -> np.ndarray:
    """One label per row, drawn from softmax(-(err / temperature) ** power)."""
    logits = -(err / temperature) ** power
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    return np.array([rng.choice(err.shape[1], p=row) for row in p])


def test_fit_calibration_recovers_the_temperature_and_power_that_generated_the_labels():
    from clip_benchmark_diffusion.calibration import fit_calibration, fit_temperature

    rng = np.random.default_rng(1)
    n, g, t0, k0 = 6000, 10, 0.003, 0.6
    err = np.abs(0.006 * rng.standard_normal((n, g)))
    labels = _labels_drawn_from(err, t0, k0, rng)
    samples = np.full((n, g), 50)
    t, k = fit_calibration(err, samples, labels)
    assert k == pytest.approx(k0, rel=0.1) and t == pytest.approx(t0, rel=0.3)
    # Units: 1,000x larger errors, 1,000x larger T, the same power.
    t_big, k_big = fit_calibration(1000 * err, samples, labels)
    assert t_big == pytest.approx(1000 * t, rel=1e-2) and k_big == pytest.approx(k, rel=1e-2)
    # Data made by plain temperature scaling: the power comes out near 1 and T near fit_temperature's.
    labels = _labels_drawn_from(err, t0, 1.0, rng)
    t1, k1 = fit_calibration(err, samples, labels)
    assert k1 == pytest.approx(1.0, abs=0.1) and t1 == pytest.approx(fit_temperature(err, samples, labels), rel=0.2)


def test_run_record_confidences_use_the_temperature_on_the_top1_class_of_the_ranking():
    import torch

    from clip_benchmark_diffusion.adapter.run_account import RunRecord
    from clip_benchmark_diffusion.scoring.outcome import ImageResult, Outcome

    # Class 1 is top-1; class 0's unpaired mean over its 4 samples is lower (those 4 samples had a
    # low error level for every class) but its paired gap on them is +0.002: the softmax reads the
    # paired gaps, so the shared error level of a sample cannot make a beaten class look close.
    outcome = Outcome(rank=torch.tensor([1, 0, 2]), mean_error=torch.tensor([0.009, 0.010, 0.020]),
                      samples=torch.tensor([4, 50, 4]), prob=torch.tensor([0.1, 0.9, 0.0], dtype=torch.float64),
                      gap=torch.tensor([0.002, 0.0, 0.011]))
    record = RunRecord()
    record.add([ImageResult(outcome=outcome, denoiser_calls=58, seed=0)])
    assert record.confidences(0.0) == [pytest.approx(0.9)]          # the sampling posterior
    z = np.exp(-np.array([0.002, 0.0, 0.011]) / 0.001)
    assert record.confidences(0.001) == [pytest.approx(z[1] / z.sum())]
    z = np.exp(-(np.array([0.002, 0.0, 0.011]) / 0.001) ** 0.7)
    assert record.confidences(0.001, 0.7) == [pytest.approx(z[1] / z.sum())]
    # A result stored before gaps existed falls back to the unpaired difference of means.
    old = dataclasses.replace(outcome, gap=None)
    record = RunRecord()
    record.add([ImageResult(outcome=old, denoiser_calls=58, seed=0)])
    z = np.exp(-np.array([-0.001, 0.0, 0.010]) / 0.001)
    assert record.confidences(0.001) == [pytest.approx(z[1] / z.sum())]


def test_outcome_gaps_are_paired_differences_to_the_top1_on_the_samples_each_class_used():
    import torch

    from clip_benchmark_diffusion.options import ScoringOptions
    from clip_benchmark_diffusion.scoring.strategies import make_strategy

    # Every sample has its own error level (shared by all classes); class 2 is eliminated early.
    level = torch.tensor([1.0, 5.0, 1.0, 5.0, 3.0, 2.0, 4.0, 1.0])
    err = level[None, :] + torch.tensor([[0.0], [0.3], [2.0]])
    strategy = make_strategy(ScoringOptions().replace(strategy="anytime", min_samples=4, max_samples=8), 3)
    while not strategy.done:
        want = strategy.wanted()
        strategy.err = torch.where(want, err, strategy.err)
        strategy.update()
    o = strategy.outcome()
    assert int(o.rank.argmin()) == 0 and o.samples[2] < 8
    assert torch.allclose(o.gap, torch.tensor([0.0, 0.3, 2.0]))


def test_the_temperature_leaves_the_score_store_key_alone_and_refuses_bad_values():
    from clip_benchmark_diffusion.errors import UserError
    from clip_benchmark_diffusion.options import ScoringOptions

    base = ScoringOptions()
    assert base.replace(temperature=0.004).fingerprint_dict() == base.fingerprint_dict()
    assert base.replace(temperature=0.004, temperature_power=0.7).fingerprint_dict() == base.fingerprint_dict()
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(UserError, match="temperature"):
            base.replace(temperature=bad)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(UserError, match="temperature_power"):
            base.replace(temperature_power=bad)



@pytest.mark.slow  # three stock commands (42 s); the recipe temperature's confidences stay pinned in test_demo's fast run
@pytest.mark.skipif(not (CLIP_TINY_DIR.parent / "diffusion_tiny" / "model_index.json").is_file(),
                    reason="demo weights not built")
def test_the_stock_command_writes_temperature_probabilities(tmp_path):
    """The recipe option reaches the predictions file: a tiny T makes every top-1 certain, a huge T
    spreads it over the 10 classes, and the store is shared (scores do not depend on T)."""
    from cli_helpers import clip_benchmark_eval
    from clip_benchmark_diffusion_demo.run import subset_dataset
    from clip_benchmark_diffusion.predictions import PREDICTIONS_ENV

    data = subset_dataset(10, tmp_path / "data")
    conf = {}
    for t in (1e-9, 1e3, 0.0):
        out = tmp_path / f"t{t}.json"
        proc = clip_benchmark_eval("--model", "diffusion_tiny", "--pretrained", "default", "--dataset", "wds/fashion_mnist",
                                   "--dataset_root", str(data), "--output", str(out), cwd=tmp_path,
                                   env={"CLIP_BENCHMARK_DIFFUSION_OPTIONS": f"temperature={t},max_samples=20",
                                        PREDICTIONS_ENV: "1", "CLIP_BENCHMARK_DIFFUSION_STORE": str(tmp_path / "s.sqlite")})
        assert proc.returncode == 0, proc.stderr[-3000:]
        rows = [json.loads(line) for line in predictions_path(out).read_text().splitlines()]
        conf[t] = np.array([r["confidence"] for r in rows])
        assert json.loads(out.read_text())["diffusion_classifier"]["scoring"]["temperature"] == t
    assert np.all(conf[1e-9] == 1.0)
    assert np.all(np.abs(conf[1e3] - 0.1) < 1e-3)
    assert not np.allclose(conf[0.0], conf[1e-9]) and np.all(conf[0.0] < 1.0 + 1e-12)


def test_ece_difference_interval_tells_calibrated_from_overconfident_and_not_from_itself():
    from clip_benchmark_diffusion.calibration import ece_difference

    rng = np.random.default_rng(1)
    conf = rng.uniform(0.5, 1.0, 1000)
    right = rng.uniform(size=conf.size) < conf                                 # calibrated
    over = np.clip(conf + 0.1, 0, 1)                                            # 10 points too sure
    d = ece_difference(over, right, conf, right)
    assert d.difference == pytest.approx(reliability(over, right).ece - reliability(conf, right).ece)
    assert 0 < d.low < d.difference < d.high                                   # beyond chance
    same = ece_difference(conf, right, conf, right)
    assert same.difference == same.low == same.high == 0.0                     # paired: no spread at all
    # An unrelated calibrated model: the interval covers 0.
    right2 = rng.uniform(size=conf.size) < conf
    other = ece_difference(conf, right, conf, right2)
    assert other.low < 0 < other.high
    with pytest.raises(ValueError, match="same images"):
        ece_difference(conf, right, conf[:10], right[:10])


def test_fit_temperature_script_refits_from_its_own_json_and_compares_the_forms_on_held_out_halves(
        tmp_path, monkeypatch, capsys):
    import sys

    from cli_helpers import load_script
    from clip_benchmark_diffusion.options import ScoringOptions

    rng = np.random.default_rng(2)
    n, g, t0, k0 = 1500, 10, 0.003, 0.6
    gap = np.abs(0.006 * rng.standard_normal((n, g)))
    target = _labels_drawn_from(gap, t0, k0, rng)
    top1 = gap.argmin(1)
    src = tmp_path / "temperature_diffusion_tiny.json"
    src.write_text(json.dumps({"model": "diffusion_tiny", "scoring": ScoringOptions().to_dict(), "per_image": {
        "target": target.tolist(), "gap": gap.tolist(), "samples": np.full((n, g), 50).tolist(),
        "top1": top1.tolist()}}))
    out = tmp_path / "refit.json"
    script = load_script("fit_temperature")
    monkeypatch.setattr(sys, "argv", ["fit_temperature.py", "--model", "diffusion_tiny", "--refit", str(src),
                                      "--out", str(out)])
    script.main()
    printed = capsys.readouterr().out
    assert "temperature_power 0.6" in printed and "held-out half NLL" in printed
    data = json.loads(out.read_text())
    assert data["temperature_power"] == pytest.approx(k0, rel=0.15)
    cv = data["cross_validated"]
    assert cv["temperature + power"]["nll"] < cv["temperature"]["nll"]     # the data were made with k = 0.6
    # the wrong model's JSON is refused in one line
    monkeypatch.setattr(sys, "argv", ["fit_temperature.py", "--model", "diffusion_tiny_flow", "--refit", str(src)])
    with pytest.raises(SystemExit, match="holds diffusion_tiny, not diffusion_tiny_flow"):
        script.main()
