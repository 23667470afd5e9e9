"""Issue 24 part 3: the predicted-class histogram, the one-line warning, and the opt-in correction."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from cli_helpers import quick_options
from clip_benchmark_diffusion.prior_bias import bias_warning, class_mean_correction, prediction_histogram

NAMES = [f"class {k}" for k in range(10)]


def test_histogram_counts_share_and_entropy():
    pred = torch.tensor([3] * 71 + list(range(10)) * 2 + [0] * 9)
    target = torch.arange(100) % 10
    hist = prediction_histogram(pred, target, NAMES, 10)
    assert hist["images"] == 100 and sum(hist["counts"]) == 100 and hist["counts"][3] == 73
    assert (hist["top_class"], hist["top_class_name"], hist["top_share"]) == (3, "class 3", 0.73)
    assert hist["expected_share"] == pytest.approx(0.1)
    assert 0 < hist["entropy_bits"] < hist["max_entropy_bits"] == pytest.approx(3.3219, abs=1e-4)
    uniform = prediction_histogram(torch.arange(100) % 10, target, NAMES, 10)
    assert uniform["entropy_bits"] == pytest.approx(uniform["max_entropy_bits"])


def test_warning_names_the_class_only_when_it_takes_over_three_times_its_share():
    target = torch.arange(100) % 10
    line = bias_warning(prediction_histogram(torch.tensor([3] * 31 + [4] * 69), target, NAMES, 10))
    assert line is not None and "'class 4' takes 69% of the 100 predictions" in line and "prior_correction=class_mean" in line
    assert "\n" not in line
    assert bias_warning(prediction_histogram(target, target, NAMES, 10)) is None   # every image right
    assert bias_warning(prediction_histogram(torch.tensor([4] * 29 + [5] * 71)[:49], target[:49], NAMES, 10)) is None  # < 50 images
    common = torch.where(torch.arange(100) < 40, 4, torch.arange(100) % 10)   # class 4 is 40% of the labels
    assert bias_warning(prediction_histogram(torch.tensor([4] * 71 + [0] * 29), common, NAMES, 10)) is None
    assert bias_warning(prediction_histogram(torch.tensor([4] * 69 + [0] * 31), common * 0, NAMES, 10)) is not None  # no label 4


def test_class_mean_correction_removes_a_constant_class_offset():
    """Known answer: images of class g have error 1 under g and 2 elsewhere, plus an offset of -1.5
    on class 0 for every image (an easy prompt). Raw argmin sends everything to class 0; the
    correction recovers every label."""
    labels = torch.arange(40) % 4
    errors = 2.0 - torch.nn.functional.one_hot(labels, 4).double()
    errors[:, 0] -= 1.5
    assert (errors.argmin(1) == 0).all()
    assert (class_mean_correction(errors).argmin(1) == labels).all()
    with pytest.raises(ValueError):
        class_mean_correction(torch.tensor([[1.0, float("nan")]]))


class _AlwaysClassZero(nn.Module):
    """A stand-in diffusion classifier whose image vector always puts class 0 first."""

    is_diffusion_classifier = True

    def __init__(self):
        super().__init__()
        from clip_benchmark_diffusion.distributed import world_from_env

        self.rank, self._classnames = world_from_env().rank, NAMES

    def encode_image(self, images):
        out = torch.zeros(len(images), 10)
        out[:, 0] = 1.0
        out[:, 1:] = 0.5
        return out

    def classification_logits(self, logits):
        return logits

    def prediction_histogram(self, logits, target):
        return prediction_histogram(logits.argmax(1), target, self._classnames, logits.shape[1])

    def shortlist_recall(self, target):
        return None


def test_the_warning_reaches_stderr_through_clip_benchmarks_classification(capsys):
    from clip_benchmark_diffusion.integration.clip_benchmark import ensure_installed

    ensure_installed()
    from clip_benchmark.metrics import zeroshot_classification as zc

    loader = [(torch.zeros(30, 3, 4, 4), torch.arange(30) % 10), (torch.zeros(30, 3, 4, 4), torch.arange(30) % 10)]
    logits, _ = zc.run_classification(_AlwaysClassZero(), torch.eye(10), loader, "cpu", amp=False)
    err = capsys.readouterr().err.strip().splitlines()
    assert [line for line in err if "warning" in line] == [
        line for line in err if line.startswith("clip_benchmark_diffusion: warning: class 'class 0' takes 100% of the 60")]
    assert len([line for line in err if "warning" in line]) == 1
    capsys.readouterr()
    zc.run_classification(_AlwaysClassZero(), torch.eye(10), loader[:1], "cpu", amp=False)   # 30 images: too few
    assert "warning" not in capsys.readouterr().err


def test_result_holds_the_histogram_and_the_correction_reuses_stored_scores(tiny_sd, digits_wds, tmp_path, inproc):
    opts = quick_options(tmp_path, strategy="full", n_samples=[2], batch_size=64)
    common = ["--pretrained", str(tiny_sd), "--dataset", "wds/digits", "--dataset_root", str(digits_wds),
              "--batch_size", "10"]
    env = {"CLIP_BENCHMARK_DIFFUSION_DUMP_PREDICTIONS": "1"}
    proc = inproc("--model", f"diffusion_sd2@{opts}", *common, "--output", str(tmp_path / "raw.json"), cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    raw = json.loads((tmp_path / "raw.json").read_text())
    hist = raw["diffusion_classifier"]["predicted_classes"]
    top1 = [json.loads(line)["top5"][0] for line in (tmp_path / "raw.predictions.jsonl").read_text().splitlines()]
    assert hist["counts"] == [top1.count(k) for k in range(10)] and hist["images"] == 20
    assert "prior_correction" not in hist and raw["diffusion_classifier"]["scoring"]["prior_correction"] == "none"

    env["CLIP_BENCHMARK_DIFFUSION_OPTIONS"] = "prior_correction=class_mean"
    proc = inproc("--model", f"diffusion_sd2@{opts}", *common, "--output", str(tmp_path / "corrected.json"),
                  cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    corrected = json.loads((tmp_path / "corrected.json").read_text())
    assert corrected["diffusion_classifier"]["scoring"]["prior_correction"] == "class_mean"
    changed = corrected["diffusion_classifier"]["predicted_classes"]["prior_correction"]
    top1_c = [json.loads(line)["top5"][0] for line in (tmp_path / "corrected.predictions.jsonl").read_text().splitlines()]
    assert changed == {"method": "class_mean", "predictions_changed": sum(a != b for a, b in zip(top1, top1_c))}
    assert corrected["metrics"]["acc1"] == pytest.approx(sum(
        p == json.loads(line)["target"] for p, line in
        zip(top1_c, (tmp_path / "corrected.predictions.jsonl").read_text().splitlines())) / 20)
    assert "20 of 20 images from the score store" in proc.stderr   # the correction needs no new scoring


def test_options_refuse_a_correction_that_cannot_be_computed():
    from clip_benchmark_diffusion.errors import UserError
    from clip_benchmark_diffusion.options import ScoringOptions

    base = ScoringOptions()
    assert base.prior_correction == "none" and base.caption_normalisation == "difference"
    with pytest.raises(UserError, match="add strategy=full"):   # anytime elimination: means over unequal samples
        base.replace(prior_correction="class_mean")
    full = base.replace(strategy="full")
    assert full.replace(prior_correction="class_mean").prior_correction == "class_mean"
    with pytest.raises(UserError, match="prior_correction needs every class scored"):
        full.replace(prior_correction="class_mean", shortlist_model="ViT-B-32", shortlist_pretrained="openai")
    with pytest.raises(UserError, match="prior_correction"):
        base.replace(prior_correction="median")
    with pytest.raises(UserError, match="caption_normalisation"):
        base.replace(caption_normalisation="softmax")
    # post-processing only: stored scores stay valid whichever is chosen
    assert full.replace(prior_correction="class_mean", caption_normalisation="none").fingerprint_dict() \
        == full.fingerprint_dict()
