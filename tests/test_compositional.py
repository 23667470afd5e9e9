"""``clip_benchmark_diffusion demo --compositional`` (issue 11).

The first test is plumbing with tiny random models: a random open_clip model of the real shape
(28x56 images, 32 tokens) and the square tiny SD of the other tests (with 32 tokens), so it runs in
seconds. It checks the wiring: two stock commands, per-item predictions for classification and
caption selection, and a table whose figures are clip_benchmark's own. The trained pair itself
(the CLIP half, session 10; the diffusion half, 28x56 latents, session 11) is pinned through the
stock command on small probe slices in the tests after it.
"""
from __future__ import annotations

import json
import re

import pytest

from cli_helpers import console, quick_options
from clip_benchmark_diffusion.calibration import reliability
from clip_benchmark_diffusion_demo import CLIP_PAIRS_NAME, CLIP_PAIRS_WEIGHTS, DIFFUSION_PAIRS_DIR
from clip_benchmark_diffusion_demo.pairs import PROBES


@pytest.fixture(scope="module")
def tiny_sd_32(tmp_path_factory):
    """The tiny SD with a 32-token text side: the pair captions are longer than 16 tokens."""
    from tiny_models import save_tiny_sd

    return save_tiny_sd(tmp_path_factory.mktemp("tiny_sd_32") / "model", context_length=32)


@pytest.fixture(scope="module")
def random_pairs_clip(tmp_path_factory):
    import open_clip
    import torch
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("random_pairs_clip")
    cfg = {"embed_dim": 16,
           "vision_cfg": {"image_size": [28, 56], "patch_size": 4, "width": 32, "head_width": 16, "layers": 1,
                          "mlp_ratio": 2.0},
           "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    (folder / "cfg.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(folder / "cfg.json")
    torch.manual_seed(0)
    model, _, _ = open_clip.create_model_and_transforms("cfg")
    local = {"model_cfg": cfg, "preprocess_cfg": dict(model.visual.preprocess_cfg)}
    (folder / "open_clip_config.json").write_text(json.dumps(local))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    return folder


def test_compositional_table_is_clip_benchmarks_own_figures(tiny_sd_32, random_pairs_clip, tmp_path):
    opts = quick_options(tmp_path, strategy="full", n_samples=[1], resolution=16, batch_size=256)
    proc = console("clip_benchmark_diffusion", "demo", "--compositional", "--images", "100", "--items", "12",
                   "--batch-size", "50", "--out", str(tmp_path / "run"),
                   "--diffusion-model", f"diffusion_sd2@{opts},{tiny_sd_32}",
                   "--clip-model", f"local-dir:{random_pairs_clip},", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ill-defined" not in proc.stderr  # scikit-learn's per-class warnings, filtered (random models predict few classes)
    results = tmp_path / "run" / "results"
    table = {}
    for line in proc.stdout.splitlines():
        m = re.match(r"(.+?)\s{2,}(\d+)\s+(\d+)\s+([\d.]+) \[.*?\]\s+([\d.]+) \[", line)
        if m:
            table[m.group(1).strip()] = (int(m.group(2)), float(m.group(4)), float(m.group(5)))
    assert len(table) == 6, proc.stdout
    assert (tmp_path / "run" / "compositional.png").stat().st_size > 0
    # The 100-class row's calibration, each model's ECE from its own per-image probabilities, and the diagram.
    ece = {m.group(1): float(m.group(2))
           for m in re.finditer(r"^(.+?): expected calibration error ([\d.]+) points", proc.stdout, re.M)}
    assert len(ece) == 2 and re.search(r"ECE [+-][\d.]+ points \(95% paired bootstrap CI", proc.stdout), proc.stdout
    assert (tmp_path / "run" / "compositional_reliability.png").stat().st_size > 0
    for path in results.glob("*.json"):
        result = json.loads(path.read_text())
        rows = [json.loads(x) for x in path.with_suffix(".predictions.jsonl").read_text().splitlines()]
        kind = 1 if "diffusion_classifier" in result else 2
        if result["dataset"] == "wds/fashion_pairs_100":
            n, value = 100, result["metrics"]["acc1"]
            label = "100 ordered pairs (top-1)"
            rel = reliability([r["confidence"] for r in rows], [r["top5"][0] == r["target"] for r in rows])
            assert ece[result["model"]] == pytest.approx(100 * rel.ece, abs=0.006)
        elif result["dataset"] == "winoground":   # the group score, from clip_benchmark's per-instance verdicts
            n, value, label = 12, result["metrics"]["acc"], "Winoground group (2 swaps)"
            assert sum(r["correct"] for r in rows) / n == pytest.approx(value)
            m = result["metrics"]
            line = f"text {100 * m['text_acc']:.1f} ["
            assert re.search(rf"^{re.escape(result['model'])}: {re.escape(line)}.*image {100 * m['image_acc']:.1f} \[",
                             proc.stdout, re.M), proc.stdout
            if kind == 1:
                assert result["diffusion_classifier"]["caption_selection"]["normalisation"] == "difference"
        else:
            probe = result["dataset"].split("/")[1]
            assert probe in PROBES
            n, value = 12, result["metrics"]["acc"]
            assert all(set(r) >= {"target", "top5", "correct"} for r in rows)
            assert sum(r["correct"] for r in rows) / n == pytest.approx(value)
            label = next(k for k in table if k.startswith({"swap_obj": "position", "swap_att": "colour swap",
                                                           "replace_obj": "replace garment",
                                                           "replace_att": "replace colour"}[probe]))
        assert len(rows) == n and table[label][0] == n
        assert table[label][kind] == pytest.approx(100 * value, abs=0.051)


@pytest.mark.skipif(not CLIP_PAIRS_WEIGHTS.is_file(), reason="the trained CLIP pair model is not shipped")
def test_the_shipped_pairs_clip_through_the_stock_command(tmp_path):
    # The trained ViT-Tiny-4-28x56 (session 10) by name through clip_benchmark itself, on the first 40
    # items of the two binding probes; pinned from that command (all 500 items: 85.4% and 96.2%).
    from cli_helpers import clip_benchmark_eval
    from clip_benchmark_diffusion_demo.compositional import probe_subset

    probes = probe_subset(40, tmp_path / "probes")
    proc = clip_benchmark_eval("--pretrained_model", f"{CLIP_PAIRS_NAME},{CLIP_PAIRS_WEIGHTS}",
                               "--dataset", "sugar_crepe/swap_obj", "sugar_crepe/swap_att", "--dataset_root", str(probes),
                               "--output", str(tmp_path / "{dataset}.json"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    acc = {p: json.loads((tmp_path / f"sugar_crepe_{p}.json").read_text())["metrics"]["acc"] for p in ("swap_obj", "swap_att")}
    # One item of slack, as for the demo's pins: on a fresh install in session 13 (transformers 5.25,
    # Pillow 13) swap_obj read 33 / 40, and so did the session-12 code, which had read 34 / 40 on its own
    # install (the code did not change; the dependencies did): most likely a near-tie between a caption and
    # its position swap, flipped by floating-point details.
    for probe, right in {"swap_obj": 34, "swap_att": 36}.items():
        assert abs(acc[probe] * 40 - right) <= 1 + 1e-6, (probe, acc[probe])


@pytest.mark.slow  # 70 s; the pair recipe's scores stay pinned by the probabilities test below, and the probes by the table test
@pytest.mark.skipif(not (DIFFUSION_PAIRS_DIR / "model_index.json").is_file(), reason="the diffusion pair is not shipped")
def test_the_shipped_pairs_diffusion_model_through_the_stock_command(tmp_path):
    # The trained 28x56 diffusion pair (4,200 steps) by its recipe name through clip_benchmark itself, at
    # its default scoring (every caption, 50 shared-noise samples), on the first 20 items of two probes.
    # Pinned from that command; all 500 items are in docs/compositional.md.
    from cli_helpers import clip_benchmark_eval
    from clip_benchmark_diffusion_demo.compositional import probe_subset

    probes = probe_subset(20, tmp_path / "probes")
    proc = clip_benchmark_eval("--pretrained_model", "diffusion_pairs,default",
                               "--dataset", "sugar_crepe/swap_att", "sugar_crepe/replace_obj", "--dataset_root", str(probes),
                               "--output", str(tmp_path / "{dataset}.json"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    acc = {p: json.loads((tmp_path / f"sugar_crepe_{p}.json").read_text())["metrics"]["acc"]
           for p in ("swap_att", "replace_obj")}
    assert acc == pytest.approx({"swap_att": 14 / 20, "replace_obj": 17 / 20})


@pytest.mark.skipif(not (DIFFUSION_PAIRS_DIR / "model_index.json").is_file(), reason="the diffusion pair is not shipped")
def test_the_shipped_pairs_diffusion_model_classifies_with_its_recipe_probabilities(tmp_path):
    # The 100-class task through the stock command on the first 2 shipped scenes, at the recipe's scoring:
    # pins the calls (the anytime boundary at 100 classes) and the top-1 probabilities, which come from the
    # temperature and power fitted on validation scenes (a 1% change of T moves them by more than the slack).
    from cli_helpers import clip_benchmark_eval
    from clip_benchmark_diffusion_demo.pairs_data import PAIRS_DATASET_DIR
    from clip_benchmark_diffusion_demo.run import subset_dataset

    data = subset_dataset(2, tmp_path / "data", source=PAIRS_DATASET_DIR)
    proc = clip_benchmark_eval("--pretrained_model", "diffusion_pairs,default", "--dataset", "wds/fashion_pairs_100",
                               "--dataset_root", str(data), "--output", str(tmp_path / "r.json"), cwd=tmp_path,
                               env={"CLIP_BENCHMARK_DIFFUSION_DUMP_PREDICTIONS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "r.predictions.jsonl").read_text().splitlines()]
    # (label, top-1, calls): both wrong, the label 4th in each top-5; the same as in the 200-scene run
    assert [(r["target"], r["top5"][0], r["denoiser_calls"]) for r in rows] == [(61, 13, 1580), (64, 48, 2182)]
    assert [r["confidence"] for r in rows] == pytest.approx([0.240096, 0.089450], abs=2e-5)


def test_the_command_refuses_in_one_line_when_a_pair_model_is_missing(tmp_path, monkeypatch):
    # A checkout without the shipped diffusion pair (e.g. one trimmed of its weights): one line naming
    # the training command, before any data is written. In-process, with the shipped folder hidden.
    from clip_benchmark_diffusion_demo import compositional
    from clip_benchmark_diffusion.errors import UserError

    monkeypatch.setattr(compositional, "DIFFUSION_PAIRS_DIR", tmp_path / "absent")
    with pytest.raises(UserError, match=r"diffusion_pairs model is not trained yet: run scripts/train_diffusion_tiny.py --data pairs"):
        compositional.main(out=str(tmp_path / "out"), images=10, items=10)
    assert not (tmp_path / "out").exists()
