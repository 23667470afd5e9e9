"""Image-caption selection (Winoground, SugarCrepe) through clip_benchmark's real metric code."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from cli_helpers import quick_options
from clip_benchmark_diffusion.scoring.outcome import ImageResult, Outcome
from tiny_models import load_tiny_classifier


def _expected(pair: torch.Tensor) -> dict[str, float]:
    """The metrics straight from the diffusion errors (lower error = better match)."""
    img_ok, txt_ok, both = [], [], []
    for e in pair:                                             # (nim, nt) per instance
        k = min(e.shape)
        gt = torch.arange(k)
        t = bool((e.argmin(1)[:k] == gt).all())                # each image picks its caption
        i = bool((e.argmin(0)[:k] == gt).all())                # each caption picks its image
        img_ok.append(i), txt_ok.append(t), both.append(i and t)
    mean = lambda xs: sum(xs) / len(xs)
    return {"image_acc": mean(img_ok), "text_acc": mean(txt_ok), "acc": mean(both)}


def _winoground_like(transform):
    g = torch.Generator().manual_seed(0)
    pix = (torch.rand(6, 2, 20, 20, 3, generator=g) * 255).to(torch.uint8).numpy()
    images = torch.stack([torch.stack([transform(Image.fromarray(p)) for p in inst]) for inst in pix])  # (6, 2, C, H, W)
    texts = [[f"a photo of thing {i}", f"a drawing of thing {i}"] for i in range(6)]
    return [(images[:4], texts[:4]), (images[4:], texts[4:])]  # Winoground-like: 2 images x 2 captions


def test_caption_selection_is_exact(tiny_sd, tmp_path):
    """The raw form (``caption_normalisation=none``): clip_benchmark's metrics are the errors' own verdicts."""
    opts = quick_options(tmp_path, min_samples=2, max_samples=4, p_value=2e-3, batch_size=64,
                         caption_normalisation="none")
    model, transform, tokenizer = load_tiny_classifier(tiny_sd, opts)
    from clip_benchmark.metrics import image_caption_selection as ics

    model.eval()
    metrics = ics.evaluate(model, _winoground_like(transform), tokenizer, "cpu", amp=True)
    pair = torch.cat(model.pair_errors)                       # (6, 2, 2)
    assert pair.shape == (6, 2, 2)
    assert metrics == _expected(pair)
    assert model.record.calls == [2 * 4] * 12                 # each image x its instance's 2 captions x 4 samples
    # the closing line reports the calls the result records (it said 0)
    assert model.store_report().endswith(f"0 of 12 images from the score store (store off); {12 * 2 * 4} denoiser "
                                         "calls run on rank 0")
    assert model.unconditional_errors == []


@pytest.mark.parametrize("how", ["difference", "ratio"])
def test_winoground_errors_are_normalised_by_the_unconditional_error(tiny_sd, tmp_path, how):
    """The images of an instance share their (t, noise) samples, each is also scored with the empty
    prompt, and clip_benchmark's three scores follow the normalised errors."""
    opts = quick_options(tmp_path, min_samples=2, max_samples=4, p_value=2e-3, batch_size=64,
                         caption_normalisation=how)
    model, transform, tokenizer = load_tiny_classifier(tiny_sd, opts)
    from clip_benchmark.metrics import image_caption_selection as ics

    metrics = ics.evaluate(model, _winoground_like(transform), tokenizer, "cpu", amp=True)
    pair, uncond = torch.cat(model.pair_errors), torch.cat(model.unconditional_errors)    # (6, 2, 2), (6, 2)
    normalised = pair - uncond[..., None] if how == "difference" else pair / uncond[..., None]
    assert metrics == pytest.approx(_expected(normalised))
    assert model.record.calls == [3 * 4] * 12                 # 2 captions + the empty prompt, 4 samples each
    seeds = [r.seed for r in model.record.results]
    assert seeds[0::2] == seeds[1::2] and len(set(seeds[0::2])) == 6   # shared within an instance only
    meta = model.result_metadata("open_clip")
    assert meta["caption_selection"]["normalisation"] == how and meta["scoring"]["caption_normalisation"] == how
    assert "" not in [model.prompts.texts[i] for i in model.prompts.last_ids.tolist()]


class _EasyImageEngine:
    """Known answer: in every instance image 0 is easy to denoise (all its errors low) and image 1
    hard, while each image's own caption lowers its error below the other caption's:

    ======== ====== ====== =============
    image    cap 0  cap 1  empty prompt
    ======== ====== ====== =============
    0 (easy) 1.0    1.1    1.2
    1 (hard) 2.1    2.0    2.2
    ======== ====== ====== =============

    Raw errors: caption 1 picks the easy image 0 (1.1 < 2.0), so the image score fails; normalised
    by the empty prompt (differences -0.2/-0.1 and -0.1/-0.2) every caption picks its image."""

    table = torch.tensor([[1.0, 1.1, 1.2], [2.1, 2.0, 2.2]])

    def __init__(self) -> None:
        from clip_benchmark_diffusion.scoring.engine import EngineStats

        self.stats = EngineStats()

    def score(self, latents, seeds, cands, allowed=None):
        G = cands.num_classes
        self.stats.denoiser_calls += 4 * G * len(latents)
        out = []
        for j in range(len(latents)):
            inst, img = divmod(j, 2)
            err = torch.full((G,), 99.0)
            err[2 * inst: 2 * inst + 2] = self.table[img, :2]
            if G % 2:                                          # the empty prompt comes last
                err[-1] = self.table[img, 2]
            out.append(ImageResult(Outcome(rank=err.argsort().argsort(), mean_error=err,
                                           samples=torch.full((G,), 4)), denoiser_calls=4 * G, seed=seeds[j]))
        return out


@pytest.mark.parametrize("how, image_acc", [("none", 0.0), ("difference", 1.0), ("ratio", 1.0)])
def test_an_easy_image_no_longer_wins_every_caption(tiny_sd, tmp_path, how, image_acc):
    opts = quick_options(tmp_path, caption_normalisation=how)
    model, transform, tokenizer = load_tiny_classifier(tiny_sd, opts)
    from clip_benchmark.metrics import image_caption_selection as ics

    model.captions.engine = lambda: _EasyImageEngine()
    metrics = ics.evaluate(model, _winoground_like(transform), tokenizer, "cpu", amp=True)
    assert metrics == {"image_acc": image_acc, "text_acc": 1.0, "acc": image_acc}


def test_single_image_instances(tiny_sd, tmp_path):
    """SugarCrepe-like: one image, a positive and a negative caption, images given as (B, C, H, W)."""
    opts = quick_options(tmp_path, min_samples=2, max_samples=3, p_value=2e-3, batch_size=64)
    model, transform, tokenizer = load_tiny_classifier(tiny_sd, opts)
    from clip_benchmark.metrics import image_caption_selection as ics

    g = torch.Generator().manual_seed(1)
    pix = (torch.rand(5, 16, 16, 3, generator=g) * 255).to(torch.uint8).numpy()
    images = torch.stack([transform(Image.fromarray(p)) for p in pix])
    texts = [["a cat on a mat", "a mat on a cat"]] * 5
    metrics = ics.evaluate(model, [(images, texts)], tokenizer, "cpu", amp=True)
    assert metrics == _expected(torch.cat(model.pair_errors))


def test_stock_winoground_command_keeps_the_raw_errors_of_every_instance(tiny_sd, tmp_path, inproc):
    """``clip_benchmark eval --dataset winoground --dataset_root <local folder>``: the result says how
    errors were normalised, and the predictions keep each instance's raw pair and empty-prompt errors,
    from which clip_benchmark's own per-instance verdict is recomputed exactly."""
    import json

    import numpy as np

    folder = tmp_path / "wino"
    (folder / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines = []
    for i in range(5):
        for k in range(2):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / "images" / f"ex_{i}_img_{k}.png")
        lines.append(json.dumps({"id": i, "caption_0": f"a red thing {i}", "caption_1": f"a blue thing {i}",
                                 "image_0": f"ex_{i}_img_0", "image_1": f"ex_{i}_img_1"}))
    (folder / "examples.jsonl").write_text("\n".join(lines) + "\n")
    opts = quick_options(tmp_path, strategy="full", n_samples=[2], batch_size=64)
    proc = inproc("--model", f"diffusion_sd2@{opts}", "--pretrained", str(tiny_sd), "--dataset", "winoground",
                  "--dataset_root", str(folder), "--batch_size", "2", "--output", str(tmp_path / "r.json"),
                  cwd=tmp_path, env={"CLIP_BENCHMARK_DIFFUSION_DUMP_PREDICTIONS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["diffusion_classifier"]["caption_selection"]["normalisation"] == "difference"
    rows = [json.loads(x) for x in (tmp_path / "r.predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 5
    pair = torch.tensor([r["pair_errors"] for r in rows])                  # (5, 2, 2)
    uncond = torch.tensor([r["unconditional_errors"] for r in rows])       # (5, 2)
    expected = _expected(pair - uncond[..., None])
    assert [r["correct"] for r in rows] == [
        bool((e.argmin(1) == torch.arange(2)).all() and (e.argmin(0) == torch.arange(2)).all())
        for e in pair - uncond[..., None]]
    assert result["metrics"] == pytest.approx({**result["metrics"], **expected})
