"""A diffusion model as a scorer in Python (notebooks): ``load``, then ``classify`` or ``score``.

The scorer is the stock command's model, not a second classifier: :func:`load` resolves the model
and weights with ``registry.resolve`` and loads them with the loader clip_benchmark calls;
``classify`` drives that ``DiffusionClassifier`` through the calls clip_benchmark's zero-shot
classification makes (``begin_task``, one ``encode_text`` per class, ``encode_image`` per batch), so
the prompts, elimination strategies, score store and per-image outcomes are the command's own.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from clip_benchmark_diffusion.adapter.inputs import Images, image_batch
from clip_benchmark_diffusion.adapter.loader import load_diffusion_classifier
from clip_benchmark_diffusion.adapter.model import CLASSIFICATION, DiffusionClassifier
from clip_benchmark_diffusion.adapter.pair_scores import score_pairs
from clip_benchmark_diffusion.adapter.transform import tensor_transform
from clip_benchmark_diffusion.errors import UserError
from clip_benchmark_diffusion.integration.checks import check_prompts, check_shortlister
from clip_benchmark_diffusion.options import ScoringOptions
from clip_benchmark_diffusion.progress import progress_bar
from clip_benchmark_diffusion.registry import resolve
from clip_benchmark_diffusion.results.store import STORE_ENV, ScoreStore, default_store_path

# CLIP's usual prompt, for ``classify`` called without templates.
DEFAULT_TEMPLATES = ("a photo of a {c}.",)
# clip_benchmark's default --batch_size: images handed to the model at once (the engine packs its
# denoiser batches, the scoring option batch_size, from them).
IMAGE_BATCH = 64


@dataclass(frozen=True)
class Classification:
    """``classify``'s result for N images and G classes."""

    classnames: list[str]
    # (N, G) float64 class probabilities: softmax(-paired gap / temperature) where the recipe (or the
    # options) has a fitted temperature (``calibrated``), else the sampling posterior P(class is best);
    # each image's own, as in the predictions file (``prior_correction`` reorders ``ranking`` only)
    probabilities: torch.Tensor
    calibrated: bool
    ranking: torch.Tensor          # (N, G) class indices, best first (the stock command's top-k)
    predictions: list[str]         # (N,) the top-1 class names
    denoiser_calls: list[int]      # (N,) per image, as recorded when it was scored (stored images too)
    reused: int                    # images read from the score store instead of scored
    cost: dict[str, float]         # denoiser calls per image (mean, max) and seconds per image


class DiffusionScorer:
    """A loaded diffusion model that classifies images and scores image-text pairs (:func:`load`)."""

    def __init__(self, model: DiffusionClassifier, transform: Any) -> None:
        self.model, self.transform = model, transform
        loaded = model.model
        self.tensor_transform = tensor_transform(loaded.resolution(model.options), loaded.image_channels)

    @property
    def options(self) -> ScoringOptions:
        """The resolved ``ScoringOptions`` (recipe, ``@source``, environment, then ``load``'s keywords)."""
        return self.model.options

    def preprocess(self, images: Images) -> torch.Tensor:
        """(N, C, H, W) model input in [-1, 1], as the stock command's transform makes it."""
        return image_batch(images, self.transform, self.tensor_transform)

    def classify(self, images: Images, classnames: Sequence[str],
                 templates: Sequence[str] | Mapping[str, Sequence[str]] | None = None, *,
                 batch_size: int = IMAGE_BATCH, progress: bool = False) -> Classification:
        """Zero-shot classification of ``images`` (PIL images, [0, 1] tensors or paths) among ``classnames``,
        with ``templates`` (``{c}`` formats, or per-class prompt lists; default ``a photo of a {c}.``), as
        ``clip_benchmark eval`` classifies: the same prompts, strategy and per-image outcomes."""
        classnames, templates = _prompt_lists(classnames, templates)
        check_prompts(classnames, templates, "the class list", diffusion=True)   # the command's lines
        if batch_size < 1:
            raise UserError(f"batch_size must be positive, got {batch_size}")
        pixels = self.preprocess(images)                                       # every image read first
        m = self.model
        m.begin_task(CLASSIFICATION, expected_images=len(pixels), classnames=classnames, templates=templates,
                     progress=False)
        bar = progress_bar(len(pixels), "diffusion scoring") if progress else None
        with torch.no_grad():
            for name in classnames:  # clip_benchmark's zero_shot_classifier: one encode_text per class
                texts = templates[name] if isinstance(templates, dict) else [t.format(c=name) for t in templates]
                m.encode_text(m.tokenizer(list(texts)).to(m.device_))
            rows = []
            for batch in pixels.split(batch_size):
                rows.append(m.encode_image(batch)[:, : len(classnames)].cpu())
                if bar is not None:
                    bar.update(len(batch))
        if bar is not None:
            bar.close()
        logits = m.classification_logits(torch.cat(rows))          # the prior correction, when asked
        ranking = logits.argsort(dim=1, descending=True, stable=True).cpu()
        t, power = m.options.temperature, m.options.temperature_power
        probs = [r.outcome.probabilities(t, power) for r in m.record.results]
        probabilities = torch.stack([p if p is not None else torch.full((len(classnames),), float("nan"))
                                     for p in probs]).double()
        return Classification(classnames=classnames, probabilities=probabilities, calibrated=t > 0,
                              ranking=ranking, predictions=[classnames[int(i)] for i in ranking[:, 0]],
                              denoiser_calls=list(m.record.calls), reused=m.record.reused, cost=m.cost_summary())

    def score(self, images: Images, texts: Sequence[str], *, batch_size: int = IMAGE_BATCH,
              progress: bool = False) -> torch.Tensor:
        """(N, M) float64 scores of ``images`` against ``texts``, higher is better (caption selection,
        reranking): minus each pair's mean error on samples shared by every image, normalised by the
        image's empty-prompt error (``caption_normalisation``); every pair on every sample
        (``adapter.pair_scores``). One image's texts compare directly; across images the scores compare
        far less well (docs/usage.md has the measurement)."""
        if isinstance(texts, str) or not isinstance(texts, Sequence) or not texts:
            raise UserError("texts must be a non-empty list of strings, e.g. ['a photo of a cat.', 'a dog.']")
        bad = [i for i, t in enumerate(texts) if not isinstance(t, str) or not t.strip()]
        if bad:
            raise UserError(f"text {bad[0]} is {texts[bad[0]]!r}; every text must be a non-empty string")
        if batch_size < 1:
            raise UserError(f"batch_size must be positive, got {batch_size}")
        pixels = self.preprocess(images)                                       # every image read first
        bar = progress_bar(len(pixels), "diffusion pair scoring") if progress else None
        rows = []
        for batch in pixels.split(batch_size):  # a pair's score does not depend on the others of its call
            rows.append(score_pairs(self.model, batch, list(texts)))
            if bar is not None:
                bar.update(len(batch))
        if bar is not None:
            bar.close()
        return torch.cat(rows)

    def close(self) -> None:
        """Close the score store (if any): its WAL folds back into the one file."""
        self.model.close_store()

    def __enter__(self) -> "DiffusionScorer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def load(model: str, pretrained: str | None = None, *, device: str | torch.device | None = None,
         cache_dir: str | None = None, store: str | os.PathLike[str] | None = None,
         **options: Any) -> DiffusionScorer:
    """Load a diffusion model as a scorer, as ``clip_benchmark eval --model MODEL --pretrained PRETRAINED``
    does: ``model`` is a recipe (with an optional ``@preset`` or ``@options.json``), ``pretrained`` the
    weights (None: the recipe's default), ``options`` any scoring options (``max_samples=20``), applied
    after ``CLIP_BENCHMARK_DIFFUSION_OPTIONS``. ``device``: CUDA when there is one; the dtype follows the
    ``dtype`` option. ``store``: a score-store file or folder (``CLIP_BENCHMARK_DIFFUSION_STORE``'s rules;
    ``"off"``); None uses that variable when it is set, else no store. Mistakes raise ``UserError``."""
    resolved = resolve(model, pretrained, cache_dir, options)
    check_shortlister(resolved.spec.options)   # a hybrid's CLIP names, before the diffusion model loads
    path = store_path(store)
    if path is not None:
        ScoreStore.check(path)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    classifier, transform, _ = load_diffusion_classifier(model, pretrained, cache_dir, device, resolved)
    if path is not None:
        classifier.attach_store(ScoreStore(path))
    return DiffusionScorer(classifier, transform)


def store_path(store: str | os.PathLike[str] | None) -> Path | None:
    """The score store ``load(store=...)`` opens: ``CLIP_BENCHMARK_DIFFUSION_STORE``'s rules applied to
    ``store`` (a file, a folder, ``off``), or to the variable itself when ``store`` is None; None: no store."""
    if store is None:
        return default_store_path("") if os.environ.get(STORE_ENV, "").strip() else None
    return default_store_path("", {STORE_ENV: os.fspath(store)})


def _prompt_lists(classnames: Sequence[str], templates: Sequence[str] | Mapping[str, Sequence[str]] | None):
    """``classnames`` and ``templates`` as the lists (or dict of lists) clip_benchmark hands the model."""
    if isinstance(classnames, str) or not isinstance(classnames, Sequence):
        raise UserError(f"classnames must be a list of class names, not {type(classnames).__name__}")
    if templates is None:
        templates = DEFAULT_TEMPLATES
    if isinstance(templates, str):
        raise UserError("templates must be a list of formats such as ['a photo of a {c}.'], not one string")
    if isinstance(templates, Mapping):
        return list(classnames), {k: list(v) for k, v in templates.items()}
    return list(classnames), list(templates)
