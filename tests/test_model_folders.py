"""Odd or broken model folders, one row each: a broken one is one line (exit 2, no result, before any
image is scored); an odd but valid one scores. Adding a case is adding a row."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import pytest

from cli_helpers import assert_clean_failure, quick_options
from clip_benchmark_diffusion_demo import DIFFUSION_TINY_DIR


def _json(path: Path, edit: Callable[[dict], object]) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _pixel_space(folder: Path) -> None:
    """Drop the VAE: the 4-channel latent UNet becomes a '4-channel pixel-space model'."""
    shutil.rmtree(folder / "vae")
    _json(folder / "model_index.json", lambda d: d.update(vae=[None, None]))


# (id, spoil(folder) -> None, needle); the folder is a copy of the tiny SD model with a VAE, or of the
# shipped diffusion_tiny when the row's id ends in "(demo)" (its tokenizer is a tokenizer.json)
BROKEN: list[tuple[str, Callable[[Path], object], str]] = [
    ("tokenizer.json missing (demo)", lambda f: (f / "tokenizer" / "tokenizer.json").unlink(),
     "tokenizer files are missing or do not belong to this model"),
    ("model_index.json is a list", lambda f: (f / "model_index.json").write_text("[1, 2]"), "must hold a JSON object"),
    ("truncated text_encoder safetensors", lambda f: _truncate(f / "text_encoder" / "model.safetensors"),
     "could not load the weights"),
    ("scheduler prediction_type sample", lambda f: _json(f / "scheduler" / "scheduler_config.json",
                                                          lambda d: d.update(prediction_type="sample")),
     "predicts 'sample'"),
    ("a 4-channel pixel-space model", _pixel_space, "takes 4-channel images"),
]


def _folder(name: str, tiny_sd: Path, tmp_path: Path) -> Path:
    source = DIFFUSION_TINY_DIR if name.endswith("(demo)") else tiny_sd
    return Path(shutil.copytree(source, tmp_path / "model"))


@pytest.mark.parametrize("spoil, needle", [c[1:] for c in BROKEN], ids=[c[0] for c in BROKEN])
def test_a_broken_model_folder_is_one_line(spoil, needle, tiny_sd, digits_wds, tmp_path, inproc, request):
    folder = _folder(request.node.callspec.id, tiny_sd, tmp_path)
    spoil(folder)
    proc = inproc("--model", f"diffusion_sd2@{quick_options(tmp_path)}", "--pretrained", str(folder),
                  "--dataset", "wds/digits", "--dataset_root", str(digits_wds),
                  "--output", "digits_{model}.json", cwd=tmp_path)
    assert_clean_failure(proc, needle, cwd=tmp_path)
    assert proc.returncode == 2


def test_a_tokenizer_without_model_max_length_scores_like_the_original(tiny_sd, digits_wds, tmp_path, inproc):
    """transformers reports ~1e30 for an unset model_max_length; the encoder's 16 positions are used."""
    runs = {}
    for name in ("original", "unset"):
        folder = Path(shutil.copytree(tiny_sd, tmp_path / name))
        if name == "unset":
            _json(folder / "tokenizer" / "tokenizer_config.json", lambda d: d.pop("model_max_length"))
        proc = inproc("--model", f"diffusion_sd2@{quick_options(tmp_path, strategy='full', n_samples=[2])}",
                      "--pretrained", str(folder), "--dataset", "wds/digits", "--dataset_root", str(digits_wds),
                      "--output", str(tmp_path / f"{name}.json"), cwd=tmp_path,
                      env={"CLIP_BENCHMARK_DIFFUSION_STORE": "off"})
        assert proc.returncode == 0, proc.stderr[-2000:]
        runs[name] = json.loads((tmp_path / f"{name}.json").read_text())["metrics"]
    runs["unset"].pop("seconds_per_image"), runs["original"].pop("seconds_per_image")
    assert runs["unset"] == runs["original"]


@pytest.mark.parametrize("pretrained, env, needle", [
    ("models/nothere", {}, "does not exist"),                      # ./models exists: a folder, not a Hub id
    ("someorg/not-cached", {"HF_HUB_OFFLINE": "1"}, "not in the cache while offline"),
], ids=["missing relative folder", "Hub id not cached offline"])
def test_weights_that_cannot_be_found_are_one_line_before_loading(pretrained, env, needle, digits_wds, tmp_path,
                                                                   inproc):
    (tmp_path / "models").mkdir()
    proc = inproc("--model", "diffusion_sd2", "--pretrained", pretrained, "--dataset", "wds/digits",
                  "--dataset_root", str(digits_wds), cwd=tmp_path, env=env)
    assert_clean_failure(proc, needle, cwd=tmp_path)
    assert "Running" not in proc.stdout


def test_the_store_key_changes_with_the_tokenizer_not_only_the_weights(tiny_sd, tmp_path):
    """Same weights, a tokenizer that reads fewer tokens: a different run key, so a repaired (or
    broken) tokenizer never reads back the other folder's scores."""
    from tiny_models import load_tiny_classifier

    short = Path(shutil.copytree(tiny_sd, tmp_path / "short"))
    _json(short / "tokenizer" / "tokenizer_config.json", lambda d: d.update(model_max_length=6))
    keys = []
    for folder in (tiny_sd, short):
        model, _, tokenizer = load_tiny_classifier(folder, quick_options(tmp_path))
        model.begin_task("zeroshot_classification")
        for c in ("zero", "one"):
            model.encode_text(tokenizer([f"a photo of the number {c}."]))
        keys.append(model.run_key())
    assert keys[0] != keys[1]
