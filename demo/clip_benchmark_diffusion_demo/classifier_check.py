"""The progress check both demo diffusion trainers share: zero-shot accuracy as a diffusion classifier.

Each image gets the same (noise level, noise) samples under every class (paired), every class's
prompts are scored at those samples, and the class with the lowest mean error wins. What a
"sample" and an "error" are (DDPM epsilon error, flow velocity error) is the caller's
``row_errors``; the pairing, the prompt schedule and the accuracy bookkeeping live here.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch

from clip_benchmark_diffusion_demo.captions import CLASSNAMES, EVAL_TEMPLATES, TRAIN_EVAL_TEMPLATE, captions_for

# (image rows, class rows, level rows, prompt rows) -> per-row error, all (n,)
RowErrors = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

CHECK_TEMPLATES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("heldout", EVAL_TEMPLATES),
    ("train_template", (TRAIN_EVAL_TEMPLATE,)),
)


def caption_texts(templates: tuple[str, ...]) -> list[str]:
    """Every (class, template) caption, class-major: C * P strings."""
    return [text for label in range(len(CLASSNAMES)) for text in captions_for(label, templates)]


def caption_ids(tokenizer, templates: tuple[str, ...]) -> torch.Tensor:
    """Token ids of every (class, template) caption: (C, P, L)."""
    ids = tokenizer(caption_texts(templates), padding="max_length", truncation=True, return_tensors="pt").input_ids
    return ids.view(len(CLASSNAMES), len(templates), -1)


@torch.no_grad()
def paired_class_errors(
    n_images: int, n_classes: int, n_levels: int, n_prompts: int,
    round_robin: bool, row_errors: RowErrors, chunk: int = 1000,
) -> torch.Tensor:
    """Mean error of every image under every class: (B, C); lower is better.

    Every class sees the same levels (and whatever noise ``row_errors`` attaches to them).
    round_robin: use prompt k % P at level k (P times cheaper) instead of every prompt at every k.
    """
    if round_robin:
        pairs = [(k, k % n_prompts) for k in range(n_levels)]
    else:
        pairs = [(k, p) for k in range(n_levels) for p in range(n_prompts)]
    kk, pp = torch.tensor(pairs).T  # (J,), (J,)
    bi, ci, ji = (g.reshape(-1) for g in torch.meshgrid(
        torch.arange(n_images), torch.arange(n_classes), torch.arange(len(pairs)), indexing="ij"))
    err = torch.empty(len(bi))
    for s in range(0, len(bi), chunk):
        b, c, j = bi[s:s + chunk], ci[s:s + chunk], ji[s:s + chunk]
        err[s:s + chunk] = row_errors(b, c, kk[j], pp[j])
    return err.view(n_images, n_classes, len(pairs)).mean(-1)


def template_accuracies(
    class_errors_for: Callable[[tuple[str, ...]], torch.Tensor], labels: torch.Tensor,
    names: tuple[str, ...] = ("heldout", "train_template"),
) -> dict[str, float]:
    """Top-1 accuracy under each named template set of ``CHECK_TEMPLATES``.

    class_errors_for(templates) -> (B, C) errors of the images whose labels are ``labels``.
    """
    out = {}
    for name, templates in CHECK_TEMPLATES:
        if name in names:
            out[name] = (class_errors_for(templates).argmin(1) == labels).float().mean().item()
    return out


@contextlib.contextmanager
def eval_mode(*modules: torch.nn.Module) -> Iterator[None]:
    """Put ``modules`` in eval mode for the block, then restore each one's previous mode."""
    was = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        yield
    finally:
        for m, training in zip(modules, was):
            m.train(training)


@contextlib.contextmanager
def ema_weights(ema, params: list[torch.nn.Parameter]) -> Iterator[None]:
    """Swap the EMA weights (a diffusers ``EMAModel``) into ``params`` for the block."""
    ema.store(params)
    ema.copy_to(params)
    try:
        yield
    finally:
        ema.restore(params)
