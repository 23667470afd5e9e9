"""(image, text) pair scores on shared (t, noise) samples: against a direct computation, independent of
the mask and the batch, and each pair scored once with a score store."""
from __future__ import annotations

import torch

from cli_helpers import quick_options
from clip_benchmark_diffusion.adapter.pair_scores import pair_errors, score_pairs, shared_seed
from clip_benchmark_diffusion.scoring import math as smath
from clip_benchmark_diffusion.scoring.engine import Levels
from clip_benchmark_diffusion.scoring.noise import NoiseBank
from clip_benchmark_diffusion.store import ScoreStore
from tiny_models import load_tiny_classifier

TEXTS = ["a photo of a cat", "a drawing of a dog", "a red bag"]


def _images(n: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 3, 16, 16, generator=g) * 2 - 1


def _model(tiny_sd, tmp_path, **fields):
    opts = quick_options(tmp_path, max_samples=4, batch_size=64, resolution=16, **fields)
    model, _, _ = load_tiny_classifier(tiny_sd, opts)
    return model.eval()


@torch.no_grad()
def _direct_error(model, image: torch.Tensor, text: str) -> float:
    """The mean weighted error over the shared samples, one denoiser call per sample: no engine."""
    o, loaded = model.options, model.model
    x0 = loaded.encode_images(image[None])[0]
    n = o.max_sample_count
    eps = NoiseBank(shared_seed(o.seed), tuple(x0.shape), "cpu").get(torch.arange(n))
    weight, scale = smath.sample_weighting(model.grid, o.weighting, loaded.objective)
    cond = loaded.encode_prompts([text], o)
    total = 0.0
    for k in range(n):
        a, b, t = (v[k:k + 1].float() for v in (model.grid.a, model.grid.b, model.grid.model_time))
        eps_hat = loaded.denoise(smath.add_noise(x0[None].float(), eps[k:k + 1], a, b), Levels(a=a, b=b, model_time=t),
                                 cond, o)
        s = scale[k:k + 1] if scale is not None else None
        total += float(smath.sample_error(eps[k:k + 1], eps_hat, o.loss, s)[0] * weight[k])
    return total / n


def test_scores_are_the_unconditionally_normalised_errors_of_a_direct_computation(tiny_sd, tmp_path):
    model = _model(tiny_sd, tmp_path)
    images = _images()
    scores = score_pairs(model, images, TEXTS)
    assert scores.shape == (3, 3) and scores.dtype == torch.float64
    expected = torch.tensor([[-(_direct_error(model, img, t) - _direct_error(model, img, "")) for t in TEXTS]
                             for img in images], dtype=torch.float64)
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-6)
    assert model.record.scored_calls == 3 * (3 + 1) * 4          # 3 images x (3 texts + empty prompt) x 4 samples


def test_a_pairs_score_does_not_depend_on_the_mask_or_the_other_images(tiny_sd, tmp_path):
    model = _model(tiny_sd, tmp_path)
    images = _images()
    full = score_pairs(model, images, TEXTS)
    mask = torch.tensor([[True, False, False], [False, False, True], [False, False, False]])
    part = score_pairs(model, images, TEXTS, mask)
    assert torch.isneginf(part[~mask]).all()
    torch.testing.assert_close(part[mask], full[mask], rtol=0, atol=0)
    order = torch.tensor([2, 0, 1])
    torch.testing.assert_close(score_pairs(model, images[order], TEXTS[::-1]), full[order].flip(1), rtol=0, atol=0)
    # Comparable across images: the scores are not a per-image ranking, they differ between images.
    assert len({round(float(v), 9) for v in full[:, 0]}) == 3


def test_the_store_scores_each_pair_once(tiny_sd, tmp_path):
    model = _model(tiny_sd, tmp_path)
    model.attach_store(ScoreStore(tmp_path / "pairs.sqlite"))
    images = _images()
    mask = torch.tensor([[True, True, False], [False, True, False], [False, False, False]])
    first = pair_errors(model, images, TEXTS, mask)
    assert (first.scored_pairs, first.reused_pairs, first.run_calls) == (3 + 2, 0, (3 + 2) * 4)
    again = pair_errors(model, images, TEXTS, mask)
    assert (again.scored_pairs, again.reused_pairs, again.run_calls) == (0, 5, 0)
    torch.testing.assert_close(again.errors, first.errors, rtol=0, atol=0, equal_nan=True)
    assert again.calls[:, :3][mask].tolist() == [4, 4, 4]          # the cost recorded when each was scored
    # A wider mask scores only the new pairs: image 2's texts and its empty prompt.
    wider = pair_errors(model, images, TEXTS, mask | torch.tensor([False, False, True])[:, None])
    assert (wider.scored_pairs, wider.reused_pairs) == (3 + 1, 5)
    model.close_store()
