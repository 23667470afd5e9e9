"""benchmark_configs/: every file loads through the stock-CLI path and its call count is right."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from analytic_denoiser import images, run
from clip_benchmark_diffusion.registry import parse_model_spec
from clip_benchmark_diffusion.scoring.strategies import staged_calls

ROOT = Path(__file__).parent.parent
CONFIGS = sorted((ROOT / "benchmark_configs" / "li2023").glob("*.json"))


@pytest.mark.parametrize("path", [p for p in CONFIGS if p.name != "templates.json"], ids=lambda p: p.stem)
def test_li2023_configs(path, monkeypatch):
    monkeypatch.chdir(ROOT)
    cfg = json.loads(path.read_text())
    [line] = (path.parent / f"models_{path.stem}.txt").read_text().splitlines()
    model, pretrained = line.split(",")
    assert pretrained == "stabilityai/stable-diffusion-2-base"
    opts = parse_model_spec(model).options
    assert opts.strategy == "staged" and list(opts.n_samples) == cfg["scoring"]["n_samples"]
    expected = staged_calls(cfg["_num_classes"], opts.n_samples, opts.to_keep)
    assert cfg["_expected_calls_per_image"] == expected
    if cfg["_num_classes"] <= 102:   # count for real with the engine and an analytic denoiser
        torch.manual_seed(0)
        protos = torch.randn(cfg["_num_classes"], 2, 4, 4)
        res, _ = run(opts.replace(batch_size=4096), protos, images(protos, [0]))
        assert res[0].denoiser_calls == expected


def test_templates_cover_every_dataset():
    templates = json.loads((ROOT / "benchmark_configs" / "li2023" / "templates.json").read_text())
    datasets = (ROOT / "benchmark_configs" / "li2023" / "datasets.txt").read_text().split()
    assert sorted(templates) == sorted(datasets)
    assert all("{c}" in t for ts in templates.values() for t in ts)


def test_fast_config(monkeypatch):
    monkeypatch.chdir(ROOT)
    [line] = (ROOT / "benchmark_configs" / "models_fast.txt").read_text().splitlines()
    assert parse_model_spec(line.split(",")[0]).options.strategy == "ttest"
