"""A diffusion classifier behind the ``encode_text`` / ``encode_image`` interface of CLIP.

The dot-product trick (DESIGN.md §3): in zero-shot classification clip_benchmark calls
``encode_text`` once per class with all of that class's prompts, averages and renormalises the
rows, and stacks the classes into a classifier. We return the one-hot row ``e_g`` for every prompt
of the g-th call, so class g's classifier column is exactly ``e_g`` whatever its number of
prompts. ``encode_image`` runs the diffusion scorer against all classes and puts a value for
class g in slot g; clip_benchmark's logits are then those values (scaled by one positive number
per image), so its top-1, top-5 and per-class recall follow the diffusion scores exactly.

The values are ``RANK_BASE ** rank`` rather than raw scores: clip_benchmark computes the logits
under autocast (bfloat16 on CPU, 8 significant bits), which would merge close raw scores into
ties, while neighbouring ranks stay 5% apart and survive any half-precision rounding.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from clip_benchmark_diffusion.adapter.prompts import PromptTable, PromptTokenizer
from clip_benchmark_diffusion.errors import UserError
from clip_benchmark_diffusion.options import ScoringOptions
from clip_benchmark_diffusion.pipeline import Components
from clip_benchmark_diffusion.registry import ModelSpec
from clip_benchmark_diffusion.scoring.engine import Candidates, ImageResult, ScoringEngine
from clip_benchmark_diffusion.scoring.noise import image_seed

RANK_BASE = 0.95
CLASSIFICATION = "zeroshot_classification"


@dataclass
class RunRecord:
    """What one evaluation cost, for the result JSON."""

    calls: list[int] = field(default_factory=list)
    results: list[ImageResult] = field(default_factory=list)


class DiffusionClassifier(nn.Module):
    """``nn.Module`` so that clip_benchmark's ``model.eval()`` and ``.to(device)`` work."""

    is_diffusion_classifier = True  # how the integration recognises us without importing torch code

    def __init__(self, components: Components, spec: ModelSpec, weights: str, device: str | torch.device) -> None:
        super().__init__()
        self.spec, self.options, self.weights = spec, spec.options, weights
        self.device_ = torch.device(device)
        self.dtype = _pick_dtype(self.options.dtype, self.device_)
        self.unet = components.unet.to(self.device_).eval()
        if self.device_.type == "cuda":
            self.unet.to(memory_format=torch.channels_last)
        self.vae = components.vae.to(self.device_).eval() if components.vae is not None else None
        self.text_encoder = components.text_encoder.to(self.device_).eval()
        self.text_tokenizer = components.tokenizer
        self.components = components
        self.prompts = PromptTable()
        self.tokenizer = PromptTokenizer(self.prompts)
        self.engine = ScoringEngine(self._denoise, components.schedule, self.options, self.device_,
                                    progress=self._on_progress)
        self.task: str | None = None
        self.record = RunRecord()
        self._groups: list[torch.Tensor] = []
        self._text_cache: dict[int, torch.Tensor] = {}
        self._candidates: Candidates | None = None
        self._bar: tqdm | None = None

    def set_options(self, options: ScoringOptions) -> None:
        """Score with other options from now on (same weights; for benchmarks and sweeps)."""
        self.options = options
        self.spec = dataclasses.replace(self.spec, options=options)
        self._candidates = None
        self.engine = ScoringEngine(self._denoise, self.components.schedule, options, self.device_,
                                    progress=self._on_progress)

    # -- the clip_benchmark interface --------------------------------------------------------
    def begin_task(self, task: str, expected_images: int | None = None) -> None:
        """Called by the integration before each task: forget the previous classes."""
        self.task = task
        self._groups, self._candidates = [], None
        self.record = RunRecord()
        self._bar = tqdm(total=expected_images, desc="diffusion scoring", unit="img", leave=False)

    def encode_text(self, prompt_ids: torch.Tensor) -> torch.Tensor:
        """One call = one class: every prompt of it gets the class's one-hot row."""
        if self.task not in (None, CLASSIFICATION):
            raise UserError(f"task {self.task} is not supported by diffusion models")
        g = len(self._groups)
        if g >= self.options.max_classes:
            raise UserError(f"more than {self.options.max_classes} classes; raise the capacity with the "
                            "scoring option max_classes (e.g. CLIP_BENCHMARK_DIFFUSION_OPTIONS=max_classes=22000)")
        self._groups.append(prompt_ids.detach().cpu().long())
        self._candidates = None
        out = torch.zeros(len(prompt_ids), self.options.max_classes, device=prompt_ids.device)
        out[:, g] = 1.0
        return out

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Score each image against every class seen by ``encode_text``; (B, max_classes) float32."""
        if not self._groups:
            raise UserError("encode_image was called before any class prompts were encoded; "
                            "diffusion models only serve zero-shot classification")
        with torch.autocast(self.device_.type, enabled=False):
            cands = self._candidate_table()
            images = images.to(self.device_, torch.float32)
            seeds = [image_seed(img, self.options.seed) for img in images]
            results = self.engine.score(self._latents(images), seeds, cands)
        self.record.results.extend(results)
        self.record.calls.extend(r.denoiser_calls for r in results)
        if self._bar is not None:
            self._bar.update(len(results))
        out = torch.zeros(len(images), self.options.max_classes, device=self.device_)
        ranks = torch.stack([r.outcome.rank for r in results]).to(self.device_)      # (B, G)
        out[:, : ranks.shape[1]] = RANK_BASE ** ranks.float()
        return out

    # -- internals ---------------------------------------------------------------------------
    def _denoise(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        x_t = x_t.to(self.dtype)
        if self.device_.type == "cuda":
            x_t = x_t.contiguous(memory_format=torch.channels_last)
        return self.unet(x_t, t, encoder_hidden_states=cond).sample

    def _latents(self, images: torch.Tensor) -> torch.Tensor:
        """VAE posterior mean times the model's scaling factor; the images themselves in pixel space."""
        if self.vae is None:
            return images
        return self.vae.encode(images).latent_dist.mean * self.components.latent_scale

    def _encode_prompts(self, ids: list[int]) -> None:
        """Run the text encoder once for each prompt not seen before."""
        todo = [i for i in ids if i not in self._text_cache]
        if not todo:
            return
        tok = self.text_tokenizer([self.prompts.texts[i] for i in todo], padding="max_length",
                                  max_length=self.text_tokenizer.model_max_length, truncation=True,
                                  return_tensors="pt")
        mask = None
        if getattr(self.text_encoder.config, "use_attention_mask", False):
            mask = tok.attention_mask.to(self.device_)
        hidden = self.text_encoder(tok.input_ids.to(self.device_), attention_mask=mask)[0]  # (n, L, D)
        self._text_cache.update(zip(todo, hidden))

    def _candidate_table(self) -> Candidates:
        if self._candidates is None:
            self._encode_prompts(sorted({i for grp in self._groups for i in grp.tolist()}))
            if self.options.template_ensemble == "embedding_mean":
                cond = torch.stack([torch.stack([self._text_cache[i] for i in grp.tolist()]).mean(0)
                                    for grp in self._groups])                     # (G, L, D)
                members = torch.arange(len(self._groups))[:, None]               # (G, 1)
            else:
                used = sorted(self._text_cache)
                row = {pid: r for r, pid in enumerate(used)}
                cond = torch.stack([self._text_cache[i] for i in used])           # (P, L, D)
                width = max(len(grp) for grp in self._groups)
                members = torch.full((len(self._groups), width), -1, dtype=torch.long)
                for g, grp in enumerate(self._groups):
                    uniq = list(dict.fromkeys(grp.tolist()))
                    members[g, : len(uniq)] = torch.tensor([row[i] for i in uniq])
            self._candidates = Candidates(cond=cond, members=members)
        return self._candidates

    def _on_progress(self, info: dict) -> None:
        if self._bar is not None:
            calls = self.engine.stats.denoiser_calls
            done = max(self.engine.stats.images, 1)
            self._bar.set_postfix(calls_per_img=f"{calls / done:.0f}",
                                  cands_left=f"{info['candidates_left']:.1f}", refresh=False)

    def cost_summary(self) -> dict[str, float]:
        """Denoiser calls per image (mean, max), seconds per image and engine efficiency."""
        calls = self.record.calls or [0]
        stats = self.engine.stats.as_dict()
        return {
            "denoiser_calls_per_image": sum(calls) / len(calls),
            "denoiser_calls_per_image_max": max(calls),
            "seconds_per_image": stats["seconds_per_image"],
            "mean_denoiser_batch": stats["mean_denoiser_batch"],
            "share_outside_denoiser": stats["share_outside_denoiser"],
        }


    def result_metadata(self, model_type: str) -> dict:
        """The identity of this evaluation for the result JSON and leaderboards."""
        from clip_benchmark_diffusion import __version__

        return {
            "recipe": self.spec.recipe.name,
            "option_source": self.spec.option_source,
            "weights": self.weights,
            "model_type": model_type,
            "prediction_type": self.components.schedule.prediction_type,
            "resolution": self.components.resolution,
            "scoring": self.options.to_dict(),
            "package_version": __version__,
        }


def _pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)
