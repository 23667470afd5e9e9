"""Image-caption selection (Winoground, SugarCrepe) for the diffusion classifier, exactly.

clip_benchmark tokenizes a batch's texts, then encodes its images, then its texts, and per
instance compares ``images_emb @ texts_emb.T`` along both axes. Text j of an instance gets the
one-hot row e_j; image a gets ``0.95 ** (joint rank of its pair errors within the instance)`` in
slots 0..nt-1, plus a padding slot that gives every image vector the same norm, so the
normalisation clip_benchmark applies cannot reorder scores across images.
"""
from __future__ import annotations

import torch

from clip_benchmark_diffusion.adapter.conditioning import stack_rows
from clip_benchmark_diffusion.errors import UserError
from clip_benchmark_diffusion.scoring.engine import Candidates, ScoringEngine
from clip_benchmark_diffusion.scoring.noise import image_seed
from clip_benchmark_diffusion.store import image_digest

CAPTION_SELECTION = "image_caption_selection"
RANK_BASE = 0.95  # logits are RANK_BASE ** rank: neighbouring ranks stay 5% apart in half precision


class CaptionSelectionMixin:
    """Mixed into :class:`~clip_benchmark_diffusion.adapter.model.DiffusionClassifier`."""

    def set_batch_structure(self, instances: int, images_per_instance: int, texts_per_instance: int) -> None:
        """The shape of the batch about to be encoded (announced by the integration)."""
        self._structure = (instances, images_per_instance, texts_per_instance)

    def _caption_text_rows(self, prompt_ids: torch.Tensor) -> torch.Tensor:
        _, _, nt = self._require_structure()
        out = torch.zeros(len(prompt_ids), self.options.max_classes, device=prompt_ids.device)
        out[torch.arange(len(prompt_ids)), torch.arange(len(prompt_ids)) % nt] = 1.0
        return out

    @torch.no_grad()
    def _caption_image_rows(self, images: torch.Tensor) -> torch.Tensor:
        B, nim, nt = self._require_structure()
        ids = self.prompts.last_ids
        if len(ids) != B * nt or len(images) != B * nim:
            raise RuntimeError(f"caption selection batch mismatch: {len(images)} images, {len(ids)} texts, "
                               f"structure {(B, nim, nt)}")
        with torch.autocast(self.device_.type, enabled=False):
            self._encode_prompts(sorted(set(ids.tolist())))
            cands = Candidates(cond=stack_rows([self._text_cache[i] for i in ids.tolist()]),
                               members=torch.arange(B * nt)[:, None])
            allowed = (torch.arange(B * nim) // nim)[:, None] == (torch.arange(B * nt) // nt)[None, :]
            images = images.to(self.device_, torch.float32)
            seeds = [image_seed(image_digest(img), self.options.seed) for img in images]
            engine = self._pair_engine()
            results = engine.score(self._latents(images), seeds, cands, allowed=allowed)
        # counted like classification's, so the closing line reports the calls the JSON records
        self.record.scored_images += len(images)
        self.record.scored_calls += engine.stats.denoiser_calls
        err = torch.stack([r.outcome.mean_error for r in results]).view(B, nim, B, nt)
        pair = torch.stack([err[b, :, b, :] for b in range(B)])                        # (B, nim, nt)
        self.pair_errors.append(pair)
        self.record.add(results)
        rank = torch.argsort(torch.argsort(pair.reshape(B, nim * nt), dim=1), dim=1)
        values = (RANK_BASE ** rank.float()).view(B * nim, nt)
        out = torch.zeros(B * nim, self.options.max_classes)
        out[:, :nt] = values
        out[:, -1] = (nt - values.pow(2).sum(1)).clamp(min=0).sqrt()
        return out.to(self.device_)

    def _require_structure(self) -> tuple[int, int, int]:
        if self._structure is None:
            raise RuntimeError("image_caption_selection batches must be announced with set_batch_structure")
        if self._structure[2] + 1 > self.options.max_classes:
            raise UserError(f"more than {self.options.max_classes - 1} captions per instance; raise max_classes")
        return self._structure

    def _pair_engine(self) -> ScoringEngine:
        """Every (image, caption) pair on every sample: comparisons across images need full scores."""
        options = self.options.replace(strategy="full", n_samples=(self.options.max_sample_count,))
        return ScoringEngine(self._denoise, self.grid, self.model.objective, options, self.device_,
                             nonfinite_error=self._nonfinite_error)
