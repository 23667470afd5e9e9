"""Zero-shot retrieval as a labelled hybrid: a CLIP shortlist, reranked by the diffusion model.

Scoring every text against every image is out of reach (Flickr30k test: 1k images x 5k captions x
~50 samples), so this does what the retrieval literature does for cross-encoders (BLIP's ITC top-k
then ITM rerank; Diffusion-ITM reranks CLIP's top 10): the shortlister (an open_clip model, the
``shortlist_*`` options) scores all pairs; each query's top ``shortlist_k`` in both directions (the
k texts of each image, the k images of each text) go to the diffusion model, which scores each such
pair once on shared (t, noise) samples with errors normalised by the image's empty-prompt error
(:mod:`~clip_benchmark_diffusion.adapter.pair_scores`), so its scores compare across images and texts.

Each query's ranking is its top k in the diffusion model's order, then the rest in the shortlister's
(so recall@k at k = ``shortlist_k`` is the shortlister's, and recall@1 is at most that). The two
directions' rankings cannot always be one matrix's rows and columns, so each direction gets its
matrix (the pairs in that direction's shortlists above the rest, as float64 global ranks, which
autocast leaves alone), and clip_benchmark's own retrieval ``evaluate`` reads each through a
stand-in model whose embeddings' dot products are the matrix's values.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch

from clip_benchmark_diffusion.adapter.pair_scores import normalised_scores, pair_errors
from clip_benchmark_diffusion.adapter.shortlist import Shortlister
from clip_benchmark_diffusion.errors import UserError

if TYPE_CHECKING:
    from clip_benchmark_diffusion.adapter.model import DiffusionClassifier

RETRIEVAL = "zeroshot_retrieval"


@dataclass(frozen=True)
class RetrievalData:
    """What the dataloader held: images in the model's input range and each image's captions."""

    images: torch.Tensor          # (N, C, H, W) float32, on CPU
    texts: list[str]              # (M,) every caption, image by image
    text_image: torch.Tensor      # (M,) the index of each caption's image
    batches: list[list[list[str]]]  # the captions of each batch, as the dataloader gave them


@dataclass(frozen=True)
class Rerank:
    """The hybrid's (M texts, N images) matrices and what they cost."""

    clip: torch.Tensor            # (M, N) shortlister cosine similarities
    image_shortlist: torch.Tensor  # (M, N) bool: each text's top-k images
    text_shortlist: torch.Tensor   # (M, N) bool: each image's top-k texts
    diffusion: torch.Tensor       # (M, N) float64 normalised diffusion scores, -inf where not scored
    image_values: torch.Tensor    # (M, N) float64 image retrieval's ranking (rows), higher is better
    text_values: torch.Tensor     # (M, N) float64 text retrieval's ranking (columns), higher is better
    calls: torch.Tensor           # (N, M + 1) denoiser calls each scored pair cost (last column: empty prompt)
    run_calls: int                # denoiser calls this process ran (0 when everything came from the store)
    reused_pairs: int
    scored_pairs: int

    @property
    def scored(self) -> torch.Tensor:
        return self.image_shortlist | self.text_shortlist


def read_batches(dataloader: Any) -> RetrievalData:
    """Every (images, captions) batch of clip_benchmark's retrieval dataloader, kept in order."""
    images, texts, owner, batches = [], [], [], []
    start = 0
    for batch_images, batch_texts in dataloader:
        images.append(batch_images.detach().cpu().float())
        batch_texts = [list(t) for t in batch_texts]
        batches.append(batch_texts)
        for i, captions in enumerate(batch_texts):
            texts.extend(captions)
            owner.extend([start + i] * len(captions))
        start += len(batch_images)
    if not images:
        raise UserError("the retrieval dataset is empty: no image to retrieve")
    return RetrievalData(torch.cat(images), texts, torch.tensor(owner), batches)


def top_k_mask(scores: torch.Tensor, k: int, dim: int) -> torch.Tensor:
    """Bool mask of the top ``k`` entries of ``scores`` along ``dim`` (all of them when k is larger)."""
    k = min(k, scores.shape[dim])
    top = scores.topk(k, dim=dim).indices
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(dim, top, True)


def merged_values(scored: torch.Tensor, diffusion: torch.Tensor, clip: torch.Tensor) -> torch.Tensor:
    """(M, N) float64 values in (0, 1]: the ``scored`` pairs in the diffusion model's order above all the
    others in the shortlister's. They are global ranks, so every row and every column is ordered as
    these keys say, without ties, and float64 keeps ranks of 10^9 pairs apart."""
    key = torch.where(scored, diffusion.double(), clip.double())
    tier = scored.double()
    # lexicographic (tier, key) descending: sort by key, then stably by tier
    order = torch.argsort(key.flatten(), descending=True, stable=True)
    order = order[torch.argsort(tier.flatten()[order], descending=True, stable=True)]
    total = key.numel()
    rank = torch.empty(total, dtype=torch.float64)
    rank[order] = torch.arange(total, dtype=torch.float64)
    return ((total - rank) / total).view_as(key)


def rerank(model: "DiffusionClassifier", shortlister: Shortlister, data: RetrievalData, k: int,
           batch_size: int = 64) -> Rerank:
    """Shortlist in both directions, score the shortlisted pairs with the diffusion model, merge."""
    text_emb = shortlister.text_embeddings(data.texts)                                   # (M, E)
    image_emb = torch.cat([shortlister.image_embeddings(data.images[b:b + batch_size])
                           for b in range(0, len(data.images), batch_size)])           # (N, E)
    clip = (text_emb @ image_emb.T).cpu()                                              # (M, N)
    image_shortlist = top_k_mask(clip, k, dim=1)    # image retrieval: each text's k images
    text_shortlist = top_k_mask(clip, k, dim=0)     # text retrieval: each image's k texts
    scored = image_shortlist | text_shortlist
    found = pair_errors(model, data.images, data.texts, scored.T)
    diffusion = normalised_scores(found, model.options.caption_normalisation).T           # (M, N)
    return Rerank(clip=clip, image_shortlist=image_shortlist, text_shortlist=text_shortlist, diffusion=diffusion,
                  image_values=merged_values(image_shortlist, diffusion, clip),
                  text_values=merged_values(text_shortlist, diffusion, clip), calls=found.calls,
                  run_calls=found.run_calls, reused_pairs=found.reused_pairs, scored_pairs=found.scored_pairs)


class ReplayModel:
    """Stands in for the model in clip_benchmark's retrieval ``evaluate``: image b of the run embeds as
    the one-hot row e_b, text j as its row of ``values`` plus a padding slot that gives every text
    row the same norm, so ``texts_emb @ images_emb.T`` is ``values`` over one constant."""

    def __init__(self, values: torch.Tensor) -> None:
        m, n = values.shape
        pad = (n - values.pow(2).sum(1)).clamp(min=0).sqrt()
        self.text_rows = torch.cat([values, pad[:, None]], 1)                  # (M, N + 1) float64
        self.n, self.next_image, self.next_text = n, 0, 0

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        b = len(images)
        out = torch.zeros(b, self.n + 1, dtype=torch.float64)
        out[torch.arange(b), torch.arange(self.next_image, self.next_image + b)] = 1.0
        self.next_image += b
        return out.to(images.device)

    def encode_text(self, positions: torch.Tensor) -> torch.Tensor:
        return self.text_rows[positions.cpu()].to(positions.device)

    def tokenizer(self, texts: list[str]) -> torch.Tensor:
        """Texts arrive in the order the first pass read them: their positions are their ids."""
        ids = torch.arange(self.next_text, self.next_text + len(texts))
        self.next_text += len(texts)
        return ids


def replay_loader(data: RetrievalData) -> list[tuple[torch.Tensor, list[list[str]]]]:
    """The same batches without pixels: clip_benchmark's loop only counts the images."""
    return [(torch.zeros(len(texts), 1), texts) for texts in data.batches]


def evaluate_hybrid(original: Callable[..., dict], model: "DiffusionClassifier", dataloader: Any, device: Any,
                    amp: bool, recall_k_list: list[int]) -> tuple[dict, Rerank, RetrievalData]:
    """clip_benchmark's retrieval metrics of the reranked ranking (its own ``evaluate``, ``original``)."""
    shortlister = model.shortlist.load(model.options)
    if shortlister is None:
        raise RuntimeError("retrieval needs the shortlist options (the integration refuses a run without them)")
    data = read_batches(dataloader)
    result = rerank(model, shortlister, data, model.options.shortlist_k)
    by_direction = {}
    for direction, values in (("image_retrieval", result.image_values), ("text_retrieval", result.text_values)):
        replay = ReplayModel(values)
        by_direction[direction] = original(replay, replay_loader(data), replay.tokenizer, device, amp=amp,
                                           recall_k_list=recall_k_list)
    metrics = {name: by_direction[name.split("_recall@")[0]][name] for name in by_direction["image_retrieval"]}
    return metrics, result, data


def shortlist_metrics(original_recall: Callable[..., torch.Tensor], result: Rerank, data: RetrievalData,
                      k: int) -> dict[str, float]:
    """The hybrid's ceilings, with clip_benchmark's own ``recall_at_k``: the shortlister's recall@k in each
    direction (a query's match can only come first if it made the query's shortlist)."""
    positive = torch.zeros_like(result.clip, dtype=torch.bool)
    positive[torch.arange(len(data.texts)), data.text_image] = True
    out = {}
    for name, scores, pos in (("image_retrieval", result.clip, positive),
                              ("text_retrieval", result.clip.T, positive.T)):
        kk = min(k, scores.shape[1])
        out[f"shortlist_{name}_recall@{k}"] = float((original_recall(scores, pos, k=kk) > 0).float().mean())
    return out


def cost_metrics(result: Rerank, data: RetrievalData) -> dict[str, float]:
    """Denoiser calls per query (each image and each caption is a query), as recorded when each pair was
    scored (stored pairs included, so a rerun writes the same figure), and pairs per query (a pair in
    both directions' shortlists is scored once)."""
    queries = len(data.images) + len(data.texts)
    return {"denoiser_calls_per_query": float(result.calls.sum()) / queries,
            "diffusion_pairs_per_query": float(result.scored.sum()) / queries}
