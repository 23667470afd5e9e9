"""Scores of (image, text) pairs that are comparable across images and across texts.

A denoising error says how well a text explains an image only relative to other errors of the same
image on the same (t, noise) samples: some images are easier to denoise than others (Krojer et al.,
Diffusion-ITM). So every image of a call is put on ONE set of samples, seeded from
``options.seed`` alone (not from the image), each pair's error is the mean over those samples, and
each image's error is normalised by its own empty-prompt error on the same samples
(``options.caption_normalisation``, as for Winoground). Then a score ranks texts for an image and
images for a text alike, which is what retrieval in both directions needs.

Each pair error is computed once: with a score store attached, it is kept under the run key (model,
noise levels, scoring options), the image's digest and the text's tokens, so retrieval's two
directions, a rerun and a larger shortlist reuse it. Where an image's missing pairs come from is
decided as for classified images, by ``results.fetch_or_score``: the store, another command sharing it
(leases), another torchrun rank (every rank returns all scores), or scoring here.
"""
from __future__ import annotations

import hashlib
import time
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from clip_benchmark_diffusion.adapter.caption_selection import UNCONDITIONAL_PROMPT, normalise_pair_errors
from clip_benchmark_diffusion.adapter.conditioning import stack_rows
from clip_benchmark_diffusion.adapter.protocols import ScoreRequest
from clip_benchmark_diffusion.errors import UserError, stderr_note
from clip_benchmark_diffusion.options import ScoringOptions
from clip_benchmark_diffusion.scoring.engine import Candidates, ScoringEngine
from clip_benchmark_diffusion.scoring.noise import image_seed
from clip_benchmark_diffusion.results.keys import image_digest, run_key, tensor_digest, weights_fingerprint

if TYPE_CHECKING:
    from clip_benchmark_diffusion.adapter.model import DiffusionClassifier

IMAGES_PER_ENGINE_CALL = 32   # bounds the engine's (images x texts x samples) error table
_FINGERPRINTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()   # model -> its weights' digest


@dataclass
class PairErrors:
    """Raw errors of one :func:`pair_errors` call."""

    errors: torch.Tensor          # (N, M) float64 mean error per pair; NaN where not asked for
    unconditional: torch.Tensor   # (N,) each image's empty-prompt error; NaN for images with no pair asked
    calls: torch.Tensor           # (N, M + 1) int64 denoiser calls each pair cost when scored (stored ones too)
    run_calls: int = 0            # denoiser calls this process ran in this call
    reused_pairs: int = 0         # pairs (empty prompt included) read from the score store
    scored_pairs: int = 0         # pairs (empty prompt included) scored in this call, by any rank
    seconds: float = 0.0          # wall time of this call on this process


def pair_options(options: ScoringOptions) -> ScoringOptions:
    """Every pair on every one of the ``max_sample_count`` samples (no elimination: a pair's error must
    not depend on which other pairs it was scored with), and no shortlist (not part of a pair's error)."""
    return options.replace(strategy="full", n_samples=(options.max_sample_count,), shortlist_model="",
                           shortlist_pretrained="")


def shared_seed(seed: int) -> int:
    """The one noise seed of every image's samples: from the scoring seed alone."""
    return image_seed("pair-scores", seed)


def score_pairs(model: "DiffusionClassifier", images: torch.Tensor, texts: list[str],
                pairs: torch.Tensor | None = None) -> torch.Tensor:
    """(N, M) float64 scores of ``images`` (N, C, H, W, the model's input range) against ``texts``:
    higher is better, comparable across all images and texts of the model's options; ``-inf`` where
    ``pairs`` (N, M) bool says not to score."""
    return normalised_scores(pair_errors(model, images, texts, pairs), model.options.caption_normalisation)


def normalised_scores(found: PairErrors, how: str) -> torch.Tensor:
    """(N, M) scores from raw errors: minus the normalised error, ``-inf`` where not scored."""
    err = normalise_pair_errors(found.errors[None], found.unconditional[None], how)[0]
    return (-err).nan_to_num(nan=float("-inf"))


@torch.no_grad()
def pair_errors(model: "DiffusionClassifier", images: torch.Tensor, texts: list[str],
                pairs: torch.Tensor | None = None) -> PairErrors:
    """Raw errors of the asked pairs, and the empty-prompt error of every image with a pair asked."""
    start = time.perf_counter()
    loaded, options = model.model, pair_options(model.options)
    if not loaded.family.text_conditioned:
        raise UserError(f"the {loaded.family.name} family is class-conditional: it cannot score free-text "
                        "captions (image-text retrieval needs a text-conditioned model)")
    n, m = len(images), len(texts)
    wanted = torch.ones(n, m, dtype=torch.bool) if pairs is None else pairs.cpu().bool()
    if wanted.shape != (n, m):
        raise ValueError(f"pairs must be ({n}, {m}), got {tuple(wanted.shape)}")
    wanted = torch.cat([wanted, wanted.any(1, keepdim=True)], 1)             # (N, M+1): + the empty prompt
    all_texts = list(texts) + [UNCONDITIONAL_PROMPT]
    with torch.autocast(model.device_.type, enabled=False):
        images = images.to(model.device_, torch.float32)
        prefix = _run_prefix(model, options)
        text_ids = [_text_id(loaded, t, options) for t in all_texts]
        keys = [[f"{prefix}/{image_digest(img)}/{tid}" for tid in text_ids] for img in images]
        todo = [(i, j) for i, j in wanted.nonzero().tolist()]
        found = model.results.store.get_many([keys[i][j] for i, j in todo]) if model.results.store is not None else {}
        missing = torch.zeros_like(wanted)
        for i, j in todo:
            missing[i, j] = keys[i][j] not in found
        rows = [i for i in range(n) if missing[i].any()]
        payloads, run_calls, here = _score_missing(model, options, images, all_texts, keys, missing, rows, prefix)
    errors = torch.full((n, m + 1), float("nan"), dtype=torch.float64)
    calls = torch.zeros(n, m + 1, dtype=torch.long)
    for i, j in todo:
        p = found.get(keys[i][j]) or payloads[i][keys[i][j]]
        errors[i, j], calls[i, j] = p["error"], p["calls"]
    # scored in this call: by this process (alone on a store, rows another command scored are read back)
    # or, under torchrun, by any rank
    scored = int(missing.sum()) if model.results.world.is_distributed else int(missing[here].sum())
    return PairErrors(errors=errors[:, :m], unconditional=errors[:, m], calls=calls, run_calls=run_calls,
                      reused_pairs=len(todo) - scored, scored_pairs=scored, seconds=time.perf_counter() - start)


def _score_missing(model: "DiffusionClassifier", options: ScoringOptions, images: torch.Tensor, texts: list[str],
                   keys: list[list[str]], missing: torch.Tensor, rows: list[int],
                   prefix: str) -> tuple[dict[int, dict[str, dict]], int, list[int]]:
    """{image: {pair key: payload}} for the ``missing`` pairs of images ``rows``; the calls run here; the
    rows scored here. ``results.fetch_or_score`` decides where each row comes from, as for classified
    images: the store (another command sharing it leased and scored the row), another torchrun rank, or
    scoring here. A row is keyed by its image and the pairs it lacks; each pair is also stored on its
    own, so that other rows (the other retrieval direction, a larger shortlist) reuse it."""
    engine = ScoringEngine(lambda x, lv, c: model.model.denoise(x, lv, c, options), model.grid,
                           model.model.objective, options, model.device_, note=stderr_note)
    seed, cache, here = shared_seed(options.seed), {}, []
    row_keys = [_row_key(prefix, [keys[i][j] for j in missing[i].nonzero().flatten().tolist()]) for i in rows]

    def score(request: ScoreRequest) -> None:
        for pos in range(0, len(request.indices), IMAGES_PER_ENGINE_CALL):
            part = request.indices[pos: pos + IMAGES_PER_ENGINE_CALL]
            chunk = [rows[r] for r in part]
            cols = missing[chunk].any(0).nonzero().flatten().tolist()
            new = [j for j in cols if j not in cache]
            if new:
                cond = model.model.encode_prompts([texts[j] for j in new], options)
                cache.update({j: {k: v[r] for k, v in cond.items()} for r, j in enumerate(new)})
            cands = Candidates(cond=stack_rows([cache[j] for j in cols]), members=torch.arange(len(cols))[:, None])
            allowed = missing[chunk][:, cols]                                            # (B, G)

            def done(b: int, result) -> None:
                i, row = chunk[b], {}
                for g, j in enumerate(cols):
                    if allowed[b, g]:
                        row[keys[i][j]] = {"error": float(result.outcome.mean_error[g]),
                                           "calls": options.max_sample_count}
                        if model.results.store is not None:
                            model.results.store.put(keys[i][j], row[keys[i][j]])
                here.append(i)
                request.save(part[b], {"pairs": row})

            engine.score(model.model.encode_images(images[chunk]), [seed] * len(chunk), cands, on_done=done,
                         allowed=allowed)

    if not rows:
        return {}, 0, []
    fetched = model.results.fetch_or_score(row_keys, score)
    model.account.record.scored_calls += engine.stats.denoiser_calls
    return ({rows[r]: p["pairs"] for r, p in fetched.payloads.items()}, engine.stats.denoiser_calls, here)


def _row_key(prefix: str, pair_keys: list[str]) -> str:
    """One image's missing pairs, as one result of ``fetch_or_score`` (leased and stored as a unit)."""
    return f"{prefix}/row/" + hashlib.blake2b("\n".join(pair_keys).encode(), digest_size=16).hexdigest()


def _run_prefix(model: "DiffusionClassifier", options: ScoringOptions) -> str:
    """What decides a pair's error besides the image and the text: weights, noise levels, options."""
    if model not in _FINGERPRINTS:
        _FINGERPRINTS[model] = weights_fingerprint(model.model.fingerprint_modules())
    grid = torch.stack([model.grid.a, model.grid.b, model.grid.model_time])
    fingerprint = f"{model.model.family.name}:{model.model.objective}:{_FINGERPRINTS[model]}:{tensor_digest(grid)}"
    return "pairs-" + run_key(fingerprint, options.fingerprint_dict(), [["(image, text) pair errors, shared noise"]])


def _text_id(loaded, text: str, options: ScoringOptions) -> str:
    """The text and what the model's tokenizers make of it (a changed tokenizer is a different pair)."""
    tokens = loaded.conditioning_fingerprint([text], options)
    return hashlib.blake2b(f"{text}\x00{tokens}".encode(), digest_size=16).hexdigest()
