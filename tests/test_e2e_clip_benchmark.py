"""End to end: the stock ``clip_benchmark eval`` console command in a subprocess."""
from __future__ import annotations

import json

from cli_helpers import clip_benchmark_eval, console, quick_options


def test_stock_command_evaluates_a_diffusion_model(tiny_sd, digits_wds, tmp_path):
    opts = quick_options(tmp_path)
    proc = clip_benchmark_eval(
        "--model", f"diffusion_sd2@{opts}", "--pretrained", str(tiny_sd),
        "--dataset", "wds/digits", "--dataset_root", str(digits_wds), "--batch_size", "8",
        "--output", str(tmp_path / "{dataset}_{pretrained}_{model}_{task}.json"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    outputs = list(tmp_path.glob("digits_*.json"))
    assert len(outputs) == 1, proc.stdout
    result = json.loads(outputs[0].read_text())
    # no machine paths in a result (leaderboard submissions): relative to the working directory, or the
    # folder's name and a fingerprint of the weights
    assert result["model"] == "diffusion_sd2@quick.json" and result["pretrained"].startswith(f"{tiny_sd.name}#")
    assert str(tmp_path) not in outputs[0].read_text() and str(tiny_sd) not in outputs[0].read_text()
    assert result["task"] == "zeroshot_classification"
    metrics = result["metrics"]
    assert 0 <= metrics["acc1"] <= metrics["acc5"] <= 1
    assert 0 <= metrics["mean_per_class_recall"] <= 1
    # t-test on 10 classes x 2 templates, 3..6 samples: at least 10*2*3 calls, at most 10*2*6.
    assert 60 <= metrics["denoiser_calls_per_image"] <= metrics["denoiser_calls_per_image_max"] <= 120
    assert metrics["seconds_per_image"] > 0
    meta = result["diffusion_classifier"]
    assert meta["recipe"] == "diffusion_sd2" and meta["model_type"] == "open_clip"
    assert meta["scoring"]["max_samples"] == 6 and meta["resolution"] == 16
    assert not list(tmp_path.glob(".*partial"))
    # the finished store is one file: its WAL folded back, no -wal or -shm left beside it
    assert (tmp_path / "clip_benchmark_diffusion_scores.sqlite").exists()
    assert not list(tmp_path.glob("*-wal")) and not list(tmp_path.glob("*-shm"))


def test_model_type_diffusion_and_hub_style_pretrained_name(tiny_sd, digits_wds, tmp_path):
    """``--model_type diffusion`` is accepted, and a '/' in --pretrained cannot break the output file."""
    link = tmp_path / "org" / "tiny-sd"
    link.parent.mkdir()
    link.symlink_to(tiny_sd)
    opts = quick_options(tmp_path, strategy="full", n_samples=[2])
    proc = clip_benchmark_eval(
        "--model_type", "diffusion", "--model", f"diffusion_sd2@{opts.name}", "--pretrained", "org/tiny-sd",
        "--dataset", "wds/digits", "--dataset_root", str(digits_wds), "--batch_size", "20", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "digits_org_tiny-sd_diffusion_sd2@quick.json_en_zeroshot_classification.json"
    result = json.loads(out.read_text())
    assert result["pretrained"] == "org/tiny-sd"
    assert result["metrics"]["denoiser_calls_per_image"] == 10 * 2 * 2
    assert result["diffusion_classifier"]["model_type"] == "diffusion"


def test_our_console_command_lists_models_and_runs_eval(tiny_sd, digits_wds, tmp_path):
    listed = console("clip_benchmark_diffusion", "list-models", cwd=tmp_path)
    assert listed.returncode == 0
    names = {m["name"]: m for m in json.loads(listed.stdout)}
    assert {"diffusion_sd2", "diffusion_sd2_768", "diffusion_sd15", "diffusion_tiny"} <= set(names)
    assert names["diffusion_sd2"]["default_weights"] == "stabilityai/stable-diffusion-2-base"
    assert names["diffusion_sd2_768"]["objective"] == "v_prediction"
    opts = quick_options(tmp_path, strategy="full", n_samples=[1])
    proc = console("clip_benchmark_diffusion", "eval", "--num_workers", "0", "--model", f"diffusion_sd2@{opts}",
                   "--pretrained", str(tiny_sd), "--dataset", "wds/digits", "--dataset_root", str(digits_wds),
                   "--output", str(tmp_path / "out.json"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "out.json").read_text())["metrics"]["denoiser_calls_per_image"] == 20


def test_results_land_in_an_output_folder_that_does_not_exist_yet(tiny_sd, digits_wds, tmp_path):
    """Stock clip_benchmark opens --output only after the compute, so a missing folder lost the run."""
    from clip_benchmark_diffusion_demo import CLIP_TINY_DIR, CLIP_TINY_NAME

    opts = quick_options(tmp_path, strategy="full", n_samples=[1])
    out = tmp_path / "new" / "folder"
    proc = clip_benchmark_eval(
        "--pretrained_model", f"{CLIP_TINY_NAME},{CLIP_TINY_DIR / 'open_clip_model.safetensors'}",
        f"diffusion_sd2@{opts.name},{tiny_sd}", "--dataset", "wds/digits", "--dataset_root", str(digits_wds),
        "--output", str(out / "{dataset}_{model}.json"), cwd=tmp_path,
        env={"CLIP_BENCHMARK_DIFFUSION_STORE": "off"})  # the store would create the folder for diffusion runs
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in out.glob("*.json")) == ["digits_ViT-Tiny-4-28.json", "digits_diffusion_sd2@quick.json.json"]
