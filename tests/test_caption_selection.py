"""Image-caption selection (Winoground, SugarCrepe) through clip_benchmark's real metric code."""
from __future__ import annotations

import torch
from PIL import Image

from cli_helpers import quick_options
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


def test_caption_selection_is_exact(tiny_sd, tmp_path):
    opts = quick_options(tmp_path, min_samples=2, max_samples=4, p_value=2e-3, batch_size=64)
    model, transform, tokenizer = load_tiny_classifier(tiny_sd, opts)
    from clip_benchmark.metrics import image_caption_selection as ics

    model.eval()
    g = torch.Generator().manual_seed(0)
    pix = (torch.rand(6, 2, 20, 20, 3, generator=g) * 255).to(torch.uint8).numpy()
    images = torch.stack([torch.stack([transform(Image.fromarray(p)) for p in inst]) for inst in pix])  # (6, 2, C, H, W)
    texts = [[f"a photo of thing {i}", f"a drawing of thing {i}"] for i in range(6)]
    loader = [(images[:4], texts[:4]), (images[4:], texts[4:])]  # Winoground-like: 2 images x 2 captions
    metrics = ics.evaluate(model, loader, tokenizer, "cpu", amp=True)
    pair = torch.cat(model.pair_errors)                       # (6, 2, 2)
    assert pair.shape == (6, 2, 2)
    assert metrics == _expected(pair)
    assert model.record.calls == [2 * 4] * 12                 # each image x its instance's 2 captions x 4 samples
    # the closing line reports the calls the result records (it said 0)
    assert model.store_report().endswith(f"0 of 12 images from the score store (store off); {12 * 2 * 4} denoiser "
                                         "calls run on rank 0")


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
