"""A CLIP shortlist for a diffusion classifier (a *hybrid*): CLIP ranks every class, the diffusion
model decides among CLIP's top k, and the other classes keep CLIP's order below them.

The final top-1 can only be right when the true class is in the shortlist, so accuracy is at most
CLIP's recall@k; the run records the shortlister, k and that recall. The scoring options
``shortlist_model``, ``shortlist_pretrained`` and ``shortlist_k`` switch it on.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from clip_benchmark_diffusion.errors import UserError
from clip_benchmark_diffusion.options import ScoringOptions


@dataclass(frozen=True)
class ShortlistSpec:
    """Which open_clip model shortlists, and how many classes it passes on."""

    model: str          # open_clip architecture name, e.g. "ViT-B-32"
    pretrained: str     # open_clip weights tag or file, e.g. "laion2b_s34b_b79k"
    k: int              # classes the diffusion model scores per image

    def __post_init__(self) -> None:
        if self.k < 1:
            raise UserError(f"shortlist_k must be at least 1, got {self.k}")

    @property
    def label(self) -> str:
        """How a hybrid is named in results: impossible to mistake for a pure diffusion row."""
        return f"hybrid:{self.model}/{self.pretrained}@top{self.k}"   # = ScoringOptions.shortlist_label


class Shortlister:
    """An open_clip model that scores images against class prompts, CLIP-style."""

    def __init__(self, spec: ShortlistSpec, device: torch.device | str = "cpu") -> None:
        import open_clip

        from clip_benchmark_diffusion.plugins import register_open_clip_configs

        register_open_clip_configs()  # plugins' CLIP architectures are not in open_clip's list
        self.spec, self.device = spec, torch.device(device)
        try:
            self.model = open_clip.create_model(spec.model, pretrained=spec.pretrained, device=self.device).eval()
        except Exception as exc:  # noqa: BLE001 - weights of another architecture fail an assert in open_clip
            first = " ".join(str(exc).split())[:300] or type(exc).__name__
            raise UserError(f"cannot load the shortlist model {spec.model!r} with weights {spec.pretrained!r} "
                            f"({type(exc).__name__}: {first}); give weights of that architecture "
                            "(open_clip.list_pretrained() lists the tags)") from None
        self.tokenizer = open_clip.get_tokenizer(spec.model)
        cfg = self.model.visual.preprocess_cfg
        size = cfg["size"]  # an int, or (H, W): a tuple from open_clip's own configs, a list from a JSON one
        self.size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        self.mean = torch.tensor(cfg["mean"], device=self.device)[:, None, None]
        self.std = torch.tensor(cfg["std"], device=self.device)[:, None, None]

    @torch.no_grad()
    def class_embeddings(self, prompts: list[list[str]]) -> torch.Tensor:
        """(G, E): per class, the renormalised mean of its normalised prompt embeddings (as clip_benchmark)."""
        rows = []
        for texts in prompts:
            emb = F.normalize(self.model.encode_text(self.tokenizer(texts).to(self.device)).float(), dim=-1)
            rows.append(F.normalize(emb.mean(0), dim=-1))
        return torch.stack(rows)

    @torch.no_grad()
    def text_embeddings(self, texts: list[str], batch_size: int = 256) -> torch.Tensor:
        """(T, E) normalised embeddings of single texts (retrieval's captions), in batches."""
        rows = [self.model.encode_text(self.tokenizer(texts[b:b + batch_size]).to(self.device)).float()
                for b in range(0, len(texts), batch_size)]
        return F.normalize(torch.cat(rows), dim=-1)

    @torch.no_grad()
    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """(B, E) for images (B, C, H, W) in the diffusion model's [-1, 1] input range.

        The diffusion transform has already resized and centre-cropped; this maps back to [0, 1],
        to RGB, to CLIP's input size and normalisation (a resize of a resize, not CLIP's own
        transform of the original file: close, not identical, to CLIP alone).
        """
        x = (images.to(self.device, torch.float32) + 1) / 2
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if tuple(x.shape[-2:]) != tuple(self.size):
            x = F.interpolate(x, size=self.size, mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        return F.normalize(self.model.encode_image((x - self.mean) / self.std).float(), dim=-1)

    def scores(self, images: torch.Tensor, class_emb: torch.Tensor) -> torch.Tensor:
        """(B, G) cosine similarities: higher is more likely."""
        return self.image_embeddings(images) @ class_emb.T


def shortlist_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """(B, G) bool: each image's top-``k`` classes by shortlister score (all when k >= G)."""
    top = scores.topk(min(k, scores.shape[1]), dim=1).indices
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, top, True)


def merge_ranks(diffusion_rank: torch.Tensor, allowed: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """(B, G) final ranks: the shortlist in the diffusion model's order, then the rest in CLIP's.

    ``diffusion_rank`` ranks the allowed classes among themselves first (the engine puts unscored
    classes last); only their relative order is used.
    """
    clip_rank = (-scores).argsort(dim=1).argsort(dim=1)                                       # (B, G)
    key = torch.where(allowed, diffusion_rank, scores.shape[1] + clip_rank)   # distinct keys: no ties
    return key.argsort(dim=1).argsort(dim=1)


def recall_at_k(allowed: torch.Tensor, target: torch.Tensor) -> float:
    """Share of images whose true class made the shortlist: the hybrid's ceiling on top-1."""
    return float(allowed[torch.arange(len(target)), target].float().mean())


class TaskShortlist:
    """Hybrid: the classifier's shortlist step. Loads the open_clip shortlister once (again after the
    options change: the next ones may name another), embeds the task's classes once, and keeps each
    batch's mask for the task's recall@k."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.shortlister: Shortlister | None = None
        self.class_emb: torch.Tensor | None = None
        self.masks: list[torch.Tensor] = []      # (B, G) per batch of this task

    def reset(self) -> None:
        """Other options: the shortlister is loaded again when next needed."""
        self.shortlister, self.class_emb = None, None

    def begin(self, options: ScoringOptions) -> None:
        """A new task; weights that do not fit the shortlist model are refused now, before any image."""
        self.class_emb, self.masks = None, []
        self.load(options)

    def classes_changed(self) -> None:
        """A class was added: embed the classes again at the next batch."""
        self.class_emb = None

    def load(self, options: ScoringOptions) -> Shortlister | None:
        """The open_clip shortlister of ``options`` (loaded once); None when pure diffusion."""
        if options.shortlist_model and self.shortlister is None:
            self.shortlister = Shortlister(ShortlistSpec(options.shortlist_model, options.shortlist_pretrained,
                                                         options.shortlist_k), self.device)
        return self.shortlister if options.shortlist_model else None

    def __call__(self, images: torch.Tensor, class_prompts: list[list[str]],
                 options: ScoringOptions) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The shortlister's (B, G) scores and top-k mask for the batch; None when pure diffusion."""
        if not options.shortlist_model:
            return None
        self.load(options)
        if self.class_emb is None:
            self.class_emb = self.shortlister.class_embeddings(class_prompts)
        scores = self.shortlister.scores(images, self.class_emb).cpu()
        mask = shortlist_mask(scores, options.shortlist_k)
        self.masks.append(mask)
        return scores, mask

    def recall(self, target: torch.Tensor) -> float | None:
        """The share of this task's images whose true class made the shortlist; None without a shortlist."""
        if not self.masks:
            return None
        return recall_at_k(torch.cat(self.masks), target.cpu())

