"""A retrieval run of a diffusion model: the hybrid rerank (``adapter/retrieval.py``) through
clip_benchmark's own ``zeroshot_retrieval.evaluate``, with the hybrid's ceilings, its cost and how it
scored recorded for the result file."""
from __future__ import annotations

import time
from types import ModuleType
from typing import Any, Callable

from clip_benchmark_diffusion.adapter import retrieval as rt
from clip_benchmark_diffusion.errors import UserError
from clip_benchmark_diffusion.integration.lifecycle import current_run
from clip_benchmark_diffusion.integration.refusals import RETRIEVAL_NEEDS_SHORTLIST

SCORES = {"difference": "pair error minus the image's empty-prompt error",
          "ratio": "pair error divided by the image's empty-prompt error",
          "none": "raw pair error"}


def evaluate_retrieval(metric_module: ModuleType, original: Callable[..., dict], call: dict[str, Any]) -> dict:
    """clip_benchmark's retrieval metrics of the reranked rankings, plus the shortlister's recall@k in both
    directions (the ceiling) and the denoiser calls per query."""
    model = call["model"]
    options = model.options
    if not options.shortlist_model:  # the plan and the patch refuse it earlier; API callers of this function too
        raise UserError(RETRIEVAL_NEEDS_SHORTLIST)
    start = time.perf_counter()
    metrics, result, data = rt.evaluate_hybrid(original, model, call["dataloader"], call["device"], call["amp"],
                                               list(call["recall_k_list"]))
    metrics.update(rt.shortlist_metrics(metric_module.recall_at_k, result, data, options.shortlist_k))
    metrics.update(rt.cost_metrics(result, data))
    seconds = time.perf_counter() - start
    state = current_run()
    if state is not None:
        state.retrieval = {
            "method": "shortlist then rerank (a hybrid, not full diffusion retrieval)",
            "shortlist": options.shortlist_label, "k": options.shortlist_k,
            "ranking": ("each query's shortlister top k (each image's k texts, each text's k images) in the "
                        "diffusion model's order, then the rest in the shortlister's"),
            "noise": "one set of (t, noise) samples shared by every image and text (seeded from the scoring seed)",
            "samples_per_pair": options.max_sample_count,
            "normalisation": options.caption_normalisation,
            "score": SCORES[options.caption_normalisation],
            "images": len(data.images), "texts": len(data.texts),
            "scored_pairs": int(result.scored.sum()),
            "denoiser_calls_run": result.run_calls,
            "wall_seconds": seconds,
        }
        where = f" ({model.results.store.path})" if model.results.store is not None else " (store off)"
        total = result.reused_pairs + result.scored_pairs
        state.retrieval_report = (f"clip_benchmark_diffusion: {result.reused_pairs} of {total} (image, text) pairs "
                                  f"from the score store{where}; {result.run_calls} denoiser calls run on rank "
                                  f"{model.rank}")
    return metrics
