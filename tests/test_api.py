"""The Python scorer (``clip_benchmark_diffusion.load``): the stock command's model behind ``classify`` and
``score``, on the embedded diffusion_tiny model (offline, CPU, seconds)."""
from __future__ import annotations

import io
import json
import re
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image
from torchvision.transforms.functional import to_tensor

import clip_benchmark_diffusion as cbd
from cli_helpers import clip_benchmark_eval
from clip_benchmark_diffusion.errors import UserError
from clip_benchmark_diffusion.options import OPTIONS_ENV
from clip_benchmark_diffusion.predictions import PREDICTIONS_ENV, read_run
from clip_benchmark_diffusion.results.store import STORE_ENV

README = Path(__file__).resolve().parents[1] / "README.md"
QUICK = {"max_samples": 12}   # diffusion_tiny's own scoring, capped at 12 samples per class


def wds_samples(root: Path) -> tuple[list[Image.Image], list[int], list[str], list[str]]:
    """A webdataset folder's images (in the order clip_benchmark reads them), labels, classes, templates."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(root / "test" / "0.tar") as tar:
        for member in tar:
            key, _, ext = member.name.rpartition(".")
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    images = [Image.open(io.BytesIO(s["png"])) for s in samples.values()]
    labels = [int(s["cls"]) for s in samples.values()]
    classes = (root / "classnames.txt").read_text().splitlines()
    templates = (root / "zeroshot_classification_templates.txt").read_text().splitlines()
    return images, labels, classes, templates


@pytest.fixture(scope="module")
def fashion(tmp_path_factory) -> Path:
    from clip_benchmark_diffusion_demo.run import subset_dataset

    return subset_dataset(6, tmp_path_factory.mktemp("fashion") / "fashion")


@pytest.fixture(scope="module")
def scorer():
    with cbd.load("diffusion_tiny", store="off", **QUICK) as loaded:
        yield loaded


def test_the_scorer_and_the_stock_command_give_identical_predictions(scorer, fashion, tmp_path, inproc):
    """The command's own ``main`` in this process (what the console script runs; the subprocess is below)."""
    check_identical_predictions(inproc, scorer, fashion, tmp_path)


@pytest.mark.slow
def test_the_scorer_and_the_console_command_give_identical_predictions(scorer, fashion, tmp_path):
    """The same through the ``clip_benchmark`` console script in a subprocess (27 s of it start-up here)."""
    check_identical_predictions(clip_benchmark_eval, scorer, fashion, tmp_path)


def check_identical_predictions(run_eval, scorer, fashion: Path, tmp_path: Path) -> None:
    (tmp_path / "quick.json").write_text(json.dumps(QUICK))
    proc = run_eval("--model", "diffusion_tiny@quick.json", "--dataset", "wds/fashion", "--dataset_root", str(fashion),
                    "--batch_size", "4", "--output", "result.json", cwd=tmp_path, env={PREDICTIONS_ENV: "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = read_run(tmp_path / "result.json")
    assert run.result["diffusion_classifier"]["scoring"]["max_samples"] == scorer.options.max_samples == 12

    images, labels, classes, templates = wds_samples(fashion)
    got = scorer.classify(images, classes, templates, batch_size=4)
    assert run.target == labels
    assert got.ranking[:, :5].tolist() == run.top5
    assert got.predictions == [classes[row[0]] for row in run.top5]
    assert got.denoiser_calls == run.denoiser_calls
    # the recipe's fitted temperature: calibrated, and the command's top-1 probability to the last bit
    assert got.calibrated and scorer.options.temperature == pytest.approx(1.93e-4)
    assert got.probabilities.gather(1, got.ranking[:, :1]).flatten().tolist() == run.confidence
    assert torch.allclose(got.probabilities.sum(1), torch.ones(6, dtype=torch.float64))
    acc1 = sum(p == classes[t] for p, t in zip(got.predictions, labels)) / len(labels)
    assert acc1 == run.result["metrics"]["acc1"]
    assert got.cost["denoiser_calls_per_image"] == run.result["metrics"]["denoiser_calls_per_image"]

    # the same store rules: a scorer on the command's store reads every image back and scores none
    with cbd.load("diffusion_tiny", store=tmp_path, **QUICK) as shared:
        again = shared.classify(images, classes, templates)
        assert again.reused == 6 and shared.model.record.scored_calls == 0
        assert again.ranking.tolist() == got.ranking.tolist() and again.denoiser_calls == got.denoiser_calls


def test_pil_images_tensors_and_paths_are_the_same_input(scorer, fashion, tmp_path):
    images, _, classes, templates = wds_samples(fashion)
    images = images[:3]
    paths = []
    for i, image in enumerate(images):
        paths.append(tmp_path / f"{i}.png")
        image.save(paths[-1])
    floats = torch.stack([to_tensor(im) for im in images])                       # (3, 1, 28, 28) in [0, 1]
    pixels = scorer.preprocess(images)
    assert pixels.shape == (3, 1, 28, 28) and pixels.min() >= -1 and pixels.max() <= 1
    for same in (floats, list(floats), (floats * 255).round().to(torch.uint8), [str(p) for p in paths], paths,
                 [images[0], floats[1], paths[2]]):
        assert torch.equal(scorer.preprocess(same), pixels)
    assert torch.equal(scorer.preprocess(images[0]), pixels[:1])                    # one image alone
    by_pil = scorer.classify(images, classes, templates)
    by_path = scorer.classify(paths, classes, templates)
    by_tensor = scorer.classify(floats, classes, templates)
    for other in (by_path, by_tensor):
        assert torch.equal(other.probabilities, by_pil.probabilities)
        assert other.predictions == by_pil.predictions and other.denoiser_calls == by_pil.denoiser_calls


def test_per_class_prompts_and_the_opt_in_progress_display(scorer, fashion, capsys):
    images, _, classes, templates = wds_samples(fashion)
    capsys.readouterr()
    as_list = scorer.classify(images[:3], classes, templates)
    assert capsys.readouterr().err == ""                                       # quiet unless asked
    per_class = {c: [t.format(c=c) for t in templates] for c in classes}       # CuPL's form, same prompts
    as_dict = scorer.classify(images[:3], classes, per_class, progress=True)
    assert torch.equal(as_dict.probabilities, as_list.probabilities) and as_dict.ranking.equal(as_list.ranking)
    assert "diffusion scoring: 3/3 img (100%)" in capsys.readouterr().err


def test_an_rgb_or_larger_image_is_converted_like_the_stock_command(scorer):
    rgb = Image.fromarray(torch.randint(0, 256, (40, 30, 3), generator=torch.Generator().manual_seed(0),
                                        dtype=torch.uint8).numpy())
    by_pil, by_tensor = scorer.preprocess(rgb), scorer.preprocess(to_tensor(rgb))
    assert by_pil.shape == by_tensor.shape == (1, 1, 28, 28)
    # PIL and torchvision resample differently; the same resize and crop leave them close, not equal
    assert 0 < float((by_pil - by_tensor).abs().mean()) < 0.05


def _last_line(proc) -> str:
    return proc.stderr.strip().splitlines()[-1]


def test_a_bad_model_or_option_is_the_commands_own_line(inproc, digits_wds, tmp_path):
    args = ("--dataset", "wds/digits", "--dataset_root", str(digits_wds), "--output", "out.json")
    with pytest.raises(UserError) as unknown:
        cbd.load("diffusion_tinny")
    assert _last_line(inproc("--model", "diffusion_tinny", *args, cwd=tmp_path)) == str(unknown.value)
    assert "did you mean diffusion_tiny" in str(unknown.value)
    with pytest.raises(UserError, match="unknown scoring option 'max_sample'"):
        cbd.load("diffusion_tiny", max_sample=5)
    with pytest.raises(UserError, match="should be like 50"):
        cbd.load("diffusion_tiny", max_samples="many")
    with pytest.raises(UserError) as option:
        cbd.load("diffusion_tiny", strategy="fastest")
    cli = inproc("--model", "diffusion_tiny", *args, cwd=tmp_path, env={OPTIONS_ENV: "strategy=fastest"})
    assert _last_line(cli) == str(option.value)
    assert str(option.value).startswith("clip_benchmark_diffusion: scoring option strategy='fastest' is not one of")


@pytest.mark.parametrize("call, line", [
    (lambda s, im: s.classify(im, []),
     "the class list is empty (an empty classnames.txt?); write one class name per line"),
    (lambda s, im: s.classify(im, ["bag", "bag"]), "the class list names 'bag' twice (lines 1 and 2)"),
    (lambda s, im: s.classify(im, "bag"), "classnames must be a list of class names, not str"),
    (lambda s, im: s.classify(im, ["bag", "coat"], ["a photo"]), "template 'a photo' has no {c} placeholder"),
    (lambda s, im: s.classify([], ["bag", "coat"]), "no images given"),
    (lambda s, im: s.classify(["no/such.png"], ["bag", "coat"]),
     "image 'no/such.png' cannot be read (No such file or directory)"),
    (lambda s, im: s.classify([README], ["bag", "coat"]), f"image '{README}' cannot be read (cannot identify"),
    (lambda s, im: s.classify(torch.full((1, 28, 28), 2.0), ["bag", "coat"]), "image 0 has values outside [0, 1]"),
    (lambda s, im: s.classify([3], ["bag", "coat"]), "image 0 is of type int; give PIL images, tensors or image paths"),
    (lambda s, im: s.classify(torch.zeros(5, 28, 28), ["bag", "coat"]), "image 0 is a tensor of shape (5, 28, 28)"),
    (lambda s, im: s.classify(torch.zeros(1, 28, 28, dtype=torch.long), ["bag", "coat"]),
     "image 0 is a torch.int64 tensor; give float values in [0, 1] or uint8"),
    (lambda s, im: s.score(im, []), "texts must be a non-empty list of strings"),
    (lambda s, im: s.score(im, ["a bag", ""]), "text 1 is ''; every text must be a non-empty string"),
])
def test_bad_input_is_one_line_before_any_compute(scorer, call, line):
    image = Image.new("L", (28, 28))
    calls = scorer.model.engine.stats.denoiser_calls
    with pytest.raises(UserError) as err:
        call(scorer, [image])
    assert str(err.value).startswith(f"clip_benchmark_diffusion: {line}") and "\n" not in str(err.value)
    assert scorer.model.engine.stats.denoiser_calls == calls


def test_the_store_follows_the_commands_rules(monkeypatch, tmp_path):
    from clip_benchmark_diffusion.api import store_path

    monkeypatch.delenv(STORE_ENV, raising=False)
    assert store_path(None) is None and store_path("off") is None
    assert store_path(tmp_path) == tmp_path / "clip_benchmark_diffusion_scores.sqlite"
    assert store_path(tmp_path / "mine.sqlite") == tmp_path / "mine.sqlite"
    monkeypatch.setenv(STORE_ENV, str(tmp_path / "env.sqlite"))
    assert store_path(None) == tmp_path / "env.sqlite"


def test_pair_scores_do_not_depend_on_the_image_batches(scorer, fashion):
    images, labels, classes, _ = wds_samples(fashion)
    images, labels = images[:4], labels[:4]
    texts = [f"a photo of a {c}." for c in classes]
    whole = scorer.score(images, texts)
    assert whole.shape == (4, 10) and whole.dtype == torch.float64 and torch.isfinite(whole).all()
    assert torch.equal(scorer.score(images, texts, batch_size=3), whole)
    # each image's best caption among the ten (pinned; the fourth image, a coat, reads as a shirt)
    assert [classes[i] for i in labels] == ["trouser", "pullover", "ankle boot", "coat"]
    assert [classes[i] for i in whole.argmax(1)] == ["trouser", "pullover", "ankle boot", "shirt"]


def _readme_python() -> str:
    section = README.read_text().split("\n## Python\n", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_python_example_runs(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(STORE_ENV, raising=False)
    monkeypatch.delenv(OPTIONS_ENV, raising=False)
    namespace: dict = {}
    exec(compile(_readme_python(), str(README), "exec"), namespace)
    result, scores, labels = namespace["result"], namespace["scores"], namespace["labels"]
    assert labels == ["trouser", "pullover", "ankle boot", "coat"]
    assert result.predictions == ["trouser", "pullover", "ankle boot", "shirt"]   # pinned: the coat is missed
    assert scores.shape == (4, 10)
    assert scores.argmax(1).tolist() == [1, 2, 9, 6]                              # the same four captions
    assert capsys.readouterr().out.strip()
    assert not list(tmp_path.iterdir())   # no store unless asked for
