"""Image-caption selection (Winoground, SugarCrepe) for the diffusion classifier, exactly.

clip_benchmark tokenizes a batch's texts, then encodes its images, then its texts, and per
instance compares ``images_emb @ texts_emb.T`` along both axes. Text j of an instance gets the
one-hot row e_j; image a gets ``0.95 ** (joint rank of its pair errors within the instance)`` in
slots 0..nt-1, plus a padding slot that gives every image vector the same norm, so the
normalisation clip_benchmark applies cannot reorder scores across images.

Winoground's image score asks, for each caption, which of two *images* fits it better. Raw
denoising errors of different images are not comparable (some images are simply easier to
denoise: Krojer et al., Diffusion-ITM), so with several images per instance every image of the
instance is scored on the same (t, noise) samples, also with the empty prompt, and each pair
error is normalised by that image's unconditional error (``options.caption_normalisation``).
"""
from __future__ import annotations

import torch

from clip_benchmark_diffusion.adapter.class_table import ClassTable
from clip_benchmark_diffusion.adapter.run_account import RunAccount
from clip_benchmark_diffusion.errors import UserError, stderr_note
from clip_benchmark_diffusion.families.model import LoadedModel
from clip_benchmark_diffusion.options import ScoringOptions
from clip_benchmark_diffusion.results.keys import image_digest
from clip_benchmark_diffusion.scoring.engine import Candidates, Conditioning, Levels, ScoringEngine
from clip_benchmark_diffusion.scoring.noise import image_seed
from clip_benchmark_diffusion.scoring.timesteps import NoiseGrid

CAPTION_SELECTION = "image_caption_selection"
RANK_BASE = 0.95  # logits are RANK_BASE ** rank: neighbouring ranks stay 5% apart in half precision
UNCONDITIONAL_PROMPT = ""  # the empty prompt, as classifier-free guidance trains it


def normalise_pair_errors(pair: torch.Tensor, uncond: torch.Tensor | None, how: str) -> torch.Tensor:
    """(B, nim, nt) pair errors made comparable across an instance's images.

    ``uncond`` (B, nim) is each image's empty-prompt error on the same samples (None with one
    image per instance, where no normalisation can change an image's ranking of its captions).
    """
    if uncond is None or how == "none":
        return pair
    if how == "difference":
        return pair - uncond[:, :, None]
    if how == "ratio":
        return pair / uncond[:, :, None].clamp(min=torch.finfo(pair.dtype).tiny)
    raise ValueError(f"unknown caption normalisation {how!r}")


def instance_seeds(digests: list[str], nim: int, seed: int) -> list[int]:
    """One noise seed per instance, shared by its images, so that they are scored on the same
    (t, noise) samples and their errors differ only by the image. One image per instance keeps
    the image's own seed (the SugarCrepe scores of earlier versions stay the same)."""
    if nim == 1:
        return [image_seed(d, seed) for d in digests]
    out = []
    for b in range(0, len(digests), nim):
        shared = image_seed("+".join(digests[b:b + nim]), seed)
        out.extend([shared] * nim)
    return out


class CaptionSelection:
    """The image_caption_selection task of the classifier: its text and image rows, and its raw errors.

    Reads the prompts and their text states from ``classes``, adds its results and calls to
    ``account``, and scores with the ``model`` on ``device``; ``configure`` hands it the classifier's
    options and noise grid.
    """

    def __init__(self, model: LoadedModel, classes: ClassTable, account: RunAccount, device: torch.device) -> None:
        self.model, self.classes, self.account, self.device = model, classes, account, device
        self.options: ScoringOptions | None = None
        self.grid: NoiseGrid | None = None
        self.begin()

    def configure(self, options: ScoringOptions, grid: NoiseGrid) -> None:
        self.options, self.grid = options, grid

    def begin(self) -> None:
        """A new task: no batch announced, no errors kept."""
        self.structure: tuple[int, int, int] | None = None
        self.pair_errors: list[torch.Tensor] = []            # raw (B, nim, nt) per batch
        self.unconditional_errors: list[torch.Tensor] = []   # ... and (B, nim) empty-prompt errors

    def set_batch_structure(self, instances: int, images_per_instance: int, texts_per_instance: int) -> None:
        """The shape of the batch about to be encoded (announced by the integration)."""
        self.structure = (instances, images_per_instance, texts_per_instance)

    def text_rows(self, prompt_ids: torch.Tensor) -> torch.Tensor:
        _, _, nt = self._require_structure()
        out = torch.zeros(len(prompt_ids), self.options.max_classes, device=prompt_ids.device)
        out[torch.arange(len(prompt_ids)), torch.arange(len(prompt_ids)) % nt] = 1.0
        return out

    @torch.no_grad()
    def image_rows(self, images: torch.Tensor) -> torch.Tensor:
        B, nim, nt = self._require_structure()
        prompts = self.classes.prompts
        ids = prompts.last_ids
        if len(ids) != B * nt or len(images) != B * nim:
            raise RuntimeError(f"caption selection batch mismatch: {len(images)} images, {len(ids)} texts, "
                               f"structure {(B, nim, nt)}")
        how = self.options.caption_normalisation
        unconditional = nim > 1 and how != "none"   # one image: nothing to compare across
        with torch.autocast(self.device.type, enabled=False):
            prompt_ids = ids.tolist()
            if unconditional:
                prompt_ids = prompt_ids + prompts.add([UNCONDITIONAL_PROMPT]).tolist()
                prompts.last_ids = ids   # the empty prompt is ours, not one of the batch's texts
            cands = Candidates(cond=self.classes.conditioning(prompt_ids),
                               members=torch.arange(len(prompt_ids))[:, None])
            allowed = (torch.arange(B * nim) // nim)[:, None] == (torch.arange(B * nt) // nt)[None, :]
            if unconditional:
                allowed = torch.cat([allowed, torch.ones(B * nim, 1, dtype=torch.bool)], 1)
            images = images.to(self.device, torch.float32)
            seeds = instance_seeds([image_digest(img) for img in images], nim, self.options.seed)
            engine = self.engine()
            results = engine.score(self.model.encode_images(images), seeds, cands, allowed=allowed)
        # counted like classification's, so the closing line reports the calls the JSON records
        self.account.add(results, scored=len(images), calls=engine.stats.denoiser_calls)
        mean_error = torch.stack([r.outcome.mean_error for r in results])             # (B*nim, B*nt [+1])
        err = mean_error[:, : B * nt].reshape(B, nim, B, nt)
        pair = torch.stack([err[b, :, b, :] for b in range(B)])                        # (B, nim, nt)
        uncond = mean_error[:, -1].reshape(B, nim) if unconditional else None
        self.pair_errors.append(pair)
        if uncond is not None:
            self.unconditional_errors.append(uncond)
        scores = normalise_pair_errors(pair, uncond, how)
        rank = torch.argsort(torch.argsort(scores.reshape(B, nim * nt), dim=1), dim=1)
        values = (RANK_BASE ** rank.float()).view(B * nim, nt)
        out = torch.zeros(B * nim, self.options.max_classes)
        out[:, :nt] = values
        out[:, -1] = (nt - values.pow(2).sum(1)).clamp(min=0).sqrt()
        return out.to(self.device)

    def metadata(self) -> dict:
        """How the pair errors were made comparable, for the result JSON."""
        several = self.structure is not None and self.structure[1] > 1
        how = self.options.caption_normalisation
        return {
            "normalisation": how if several else "none (one image per instance: nothing to compare across)",
            "unconditional_prompt": UNCONDITIONAL_PROMPT if several and how != "none" else None,
            "noise": "shared by the images of an instance" if several else "per image",
            "score": {"difference": "pair error minus the image's unconditional error",
                      "ratio": "pair error divided by the image's unconditional error",
                      "none": "raw pair error"}[how] if several else "raw pair error",
        }

    def engine(self) -> ScoringEngine:
        """Every (image, caption) pair on every sample: comparisons across images need full scores."""
        options = self.options.replace(strategy="full", n_samples=(self.options.max_sample_count,))
        return ScoringEngine(self._denoise, self.grid, self.model.objective, options, self.device,
                             note=stderr_note,
                             nonfinite_error=lambda what: self.account.nonfinite_error(what, self.options))

    def _denoise(self, x_t: torch.Tensor, levels: Levels, cond: Conditioning) -> torch.Tensor:
        return self.model.denoise(x_t, levels, cond, self.options)

    def _require_structure(self) -> tuple[int, int, int]:
        if self.structure is None:
            raise RuntimeError("image_caption_selection batches must be announced with set_batch_structure")
        if self.structure[2] + 1 > self.options.max_classes:
            raise UserError(f"more than {self.options.max_classes - 1} captions per instance; raise max_classes")
        return self.structure
