"""Every refusal and bad input: one line on stderr, no traceback, no result file, before compute.

One runs the real console script in a subprocess; the rest call the same patched
``clip_benchmark.cli.main`` in-process, which is what the console script runs, to keep the suite fast.
"""
from __future__ import annotations

import json
import shutil

import pytest

from cli_helpers import assert_clean_failure, clip_benchmark_eval, quick_options


@pytest.fixture(scope="module")
def unconditional(tmp_path_factory):
    """A real diffusers folder that is not text-to-image: an unconditional DDPM pipeline."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    unet = UNet2DModel(block_out_channels=(4, 8), norm_num_groups=2, sample_size=8, layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    folder = tmp_path_factory.mktemp("ddpm") / "model"
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def corrupted(tiny_sd, tmp_path_factory):
    folder = tmp_path_factory.mktemp("corrupt") / "model"
    shutil.copytree(tiny_sd, folder)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 3])
    return folder


def _eval(model, pretrained, wds, cwd, *extra, env=None, runner=clip_benchmark_eval):
    return runner("--model", model, "--pretrained", str(pretrained), "--dataset", "wds/digits",
                  "--dataset_root", str(wds), *extra, cwd=cwd, env=env)


def test_unknown_model_name_suggests_close_names(tiny_sd, digits_wds, tmp_path):
    assert_clean_failure(_eval("diffusion_sd22", tiny_sd, digits_wds, tmp_path), "unknown diffusion model",
                   "did you mean diffusion_sd2", cwd=tmp_path)


def test_unknown_name_under_model_type_diffusion(tiny_sd, digits_wds, tmp_path, inproc):
    assert_clean_failure(_eval("ViT-B-32", tiny_sd, digits_wds, tmp_path, "--model_type", "diffusion", runner=inproc),
                   "unknown diffusion model 'ViT-B-32'", cwd=tmp_path)


def test_missing_pretrained_folder(digits_wds, tmp_path, inproc):
    assert_clean_failure(_eval("diffusion_sd2", tmp_path / "nope", digits_wds, tmp_path, runner=inproc), "does not exist", cwd=tmp_path)


def test_folder_that_is_not_diffusers(digits_wds, tmp_path, inproc):
    (tmp_path / "empty").mkdir()
    assert_clean_failure(_eval("diffusion_sd2", tmp_path / "empty", digits_wds, tmp_path, runner=inproc), "no model_index.json",
                         cwd=tmp_path)


def test_pipeline_that_is_not_text_to_image(unconditional, digits_wds, tmp_path, inproc):
    assert_clean_failure(_eval("diffusion_sd2", unconditional, digits_wds, tmp_path, runner=inproc),
                   "not a text-to-image diffusion model", "DDPMPipeline", cwd=tmp_path)


def test_corrupted_weights(corrupted, digits_wds, tmp_path, inproc):
    assert_clean_failure(_eval("diffusion_sd2", corrupted, digits_wds, tmp_path, runner=inproc), "could not load the weights", cwd=tmp_path)


def test_unknown_weights_tag(digits_wds, tmp_path, inproc):
    assert_clean_failure(_eval("diffusion_sd2", "sd9", digits_wds, tmp_path, runner=inproc), "neither a known weights tag", cwd=tmp_path)


@pytest.mark.parametrize("task", ["linear_probe", "captioning"])
def test_unsupported_tasks_stop_before_compute(tiny_sd, digits_wds, tmp_path, task, inproc):
    assert_clean_failure(_eval("diffusion_sd2", tiny_sd, digits_wds, tmp_path, "--task", task, runner=inproc),
                   f"task {task} is not supported by diffusion models", cwd=tmp_path)


def test_multilabel_wds_is_refused_before_compute(tiny_sd, digits_wds, tmp_path, inproc):
    """clip_benchmark's mAP ranks each class's logits across images; ours are ranks within an image."""
    folder = tmp_path / "multi"
    shutil.copytree(digits_wds, folder)
    (folder / "dataset_type.txt").write_text("multilabel\n")
    assert_clean_failure(_eval("diffusion_sd2", tiny_sd, folder, tmp_path, runner=inproc),
                         "multi-label datasets (wds/digits: its dataset_type.txt says multilabel) are not supported",
                         cwd=tmp_path)


def test_voc2007_multilabel_is_refused_before_compute(tiny_sd, tmp_path, inproc):
    proc = inproc("--model", "diffusion_sd2", "--pretrained", str(tiny_sd), "--dataset", "voc2007_multilabel",
                  "--dataset_root", str(tmp_path / "voc"), cwd=tmp_path)
    assert_clean_failure(proc, "multi-label datasets (voc2007_multilabel) are not supported", cwd=tmp_path)
    assert not (tmp_path / "voc").exists()   # refused before clip_benchmark downloads anything


def test_load_clfs_is_refused(tiny_sd, digits_wds, tmp_path, inproc):
    assert_clean_failure(_eval("diffusion_sd2", tiny_sd, digits_wds, tmp_path, "--load_clfs", "clf.pt", runner=inproc),
                   "--load_clfs is not supported", cwd=tmp_path)


def test_more_classes_than_slots(tiny_sd, digits_wds, tmp_path, inproc):
    opts = quick_options(tmp_path, max_classes=5)
    assert_clean_failure(_eval(f"diffusion_sd2@{opts}", tiny_sd, digits_wds, tmp_path, runner=inproc),
                         "more than 5 classes", cwd=tmp_path)


def test_a_conditioning_table_larger_than_the_host_is_refused_with_what_to_change(tiny_sd, digits_wds, tmp_path,
                                                                                 inproc, monkeypatch):
    """At ImageNet scale a T5 family's one-row-per-prompt table outgrows the host (218 GB for a real SD3):
    the stock command stops before any image is scored, in one line naming the ensemble that fits."""
    from clip_benchmark_diffusion.scoring import batching

    monkeypatch.setattr(batching, "host_free_bytes", lambda: 1000)
    opts = quick_options(tmp_path, template_ensemble="error_mean")
    line = assert_clean_failure(_eval(f"diffusion_sd2@{opts}", tiny_sd, digits_wds, tmp_path, runner=inproc),
                                "the conditioning table needs", "this machine has 0.0 GB available",
                                "use template_ensemble=embedding_mean (one row per class) or fewer templates",
                                cwd=tmp_path)
    assert "rows of 0.00 MB" in line


def test_bad_scoring_options(tiny_sd, digits_wds, tmp_path, inproc):
    assert_clean_failure(_eval("diffusion_sd2@turbo", tiny_sd, digits_wds, tmp_path, runner=inproc), "unknown scoring preset 'turbo'",
                         cwd=tmp_path)
    (tmp_path / "bad.json").write_text(json.dumps({"strategy": "fastest"}))
    assert_clean_failure(_eval(f"diffusion_sd2@{tmp_path / 'bad.json'}", tiny_sd, digits_wds, tmp_path, runner=inproc),
                   "strategy='fastest' is not one of full, staged, ttest", cwd=tmp_path)
    assert_clean_failure(_eval("diffusion_sd2", tiny_sd, digits_wds, tmp_path,
                         env={"CLIP_BENCHMARK_DIFFUSION_OPTIONS": "batchsize=3"}, runner=inproc), "unknown scoring option 'batchsize'",
                         cwd=tmp_path)
    assert_clean_failure(_eval("diffusion_sd2@anytime", tiny_sd, digits_wds, tmp_path,
                         env={"CLIP_BENCHMARK_DIFFUSION_OPTIONS": "alpha=1.5"}, runner=inproc), "0 < alpha < 1",
                         cwd=tmp_path)


def test_a_bad_second_model_stops_the_command_before_the_first_runs(tiny_sd, digits_wds, tmp_path, inproc):
    proc = inproc("--pretrained_model", f"diffusion_sd2,{tiny_sd}", "diffusion_sd5,x",
                  "--dataset", "wds/digits", "--dataset_root", str(digits_wds), cwd=tmp_path)
    assert_clean_failure(proc, "unknown diffusion model 'diffusion_sd5'", cwd=tmp_path)
    assert "Running" not in proc.stdout


def _templated_wds(tmp_path, templates: str):
    from wds_data import write_digits_wds

    folder = write_digits_wds(tmp_path / "wds", per_class=1)
    (folder / "zeroshot_classification_templates.txt").write_text(templates)
    return folder


def test_empty_template_file(tiny_sd, tmp_path, inproc):
    wds = _templated_wds(tmp_path, "")
    assert_clean_failure(_eval("diffusion_sd2", tiny_sd, wds, tmp_path, runner=inproc), "template list is empty",
                   cwd=tmp_path)


def test_template_without_placeholder(tiny_sd, tmp_path, inproc):
    wds = _templated_wds(tmp_path, "a photo of a {c}.\na photo of something\n")
    assert_clean_failure(_eval("diffusion_sd2", tiny_sd, wds, tmp_path, runner=inproc),
                   "template 'a photo of something' has no {c} placeholder", cwd=tmp_path)


def test_cupl_file_missing_a_class(tiny_sd, digits_wds, tmp_path, inproc):
    from wds_data import DIGIT_NAMES

    prompts = {"digits": {name: [f"a {name}"] for name in DIGIT_NAMES[:-1]}}
    (tmp_path / "cupl.json").write_text(json.dumps(prompts))
    assert_clean_failure(_eval("diffusion_sd2", tiny_sd, digits_wds, tmp_path, "--custom_template_file",
                         str(tmp_path / "cupl.json"), runner=inproc), "no prompts for 'nine'", cwd=tmp_path)


class _OddImages:
    """Real digits delivered as grayscale, RGBA, 1x1 and large RGB images."""

    classes = ["zero", "one"]
    templates = ["a photo of the number {c}."]

    def __init__(self, bomb: bool = False) -> None:
        from PIL import Image

        base = Image.new("L", (8, 8), 0)
        self.items = [(base.convert("L"), 0), (base.convert("RGBA"), 1), (Image.new("RGB", (1, 1), (9, 9, 9)), 0),
                      (Image.new("RGB", (3000, 2000), (200, 10, 10)), 1)]
        if bomb:
            self.items.append((Image.new("1", (15000, 13000)), 0))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def _odd_wds(tmp_path, bomb: bool):
    from wds_data import write_wds

    return write_wds(_OddImages(bomb), tmp_path / "odd")


def test_grayscale_rgba_tiny_and_large_images_are_scored(tiny_sd, tmp_path, inproc):
    opts = quick_options(tmp_path, strategy="full", n_samples=[1])
    proc = inproc("--model", f"diffusion_sd2@{opts}", "--pretrained", str(tiny_sd), "--dataset", "wds/odd",
                  "--dataset_root", str(_odd_wds(tmp_path, bomb=False)), "--output", "out.json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((tmp_path / "out.json").read_text())["metrics"]["denoiser_calls_per_image"] == 2


def test_decompression_bomb_is_one_line(tiny_sd, tmp_path, inproc):
    opts = quick_options(tmp_path, strategy="full", n_samples=[1])
    proc = inproc("--model", f"diffusion_sd2@{opts}", "--pretrained", str(tiny_sd), "--dataset", "wds/odd",
                  "--dataset_root", str(_odd_wds(tmp_path, bomb=True)), "--output", "out.json", cwd=tmp_path)
    assert_clean_failure(proc, "too large to decode safely")
    assert not (tmp_path / "out.json").exists() and not list(tmp_path.glob(".*partial"))
