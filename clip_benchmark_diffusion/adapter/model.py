"""A diffusion classifier behind the ``encode_text`` / ``encode_image`` interface of CLIP.

The dot-product trick: in zero-shot classification clip_benchmark calls
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
import hashlib
import itertools
from dataclasses import dataclass, field

import torch
from torch import nn

from clip_benchmark_diffusion.claims import Claims, score_shared
from clip_benchmark_diffusion.adapter.caption_selection import CAPTION_SELECTION, RANK_BASE, CaptionSelectionMixin
from clip_benchmark_diffusion.adapter import shortlist as sl
from clip_benchmark_diffusion.adapter.conditioning import mean_rows, stack_rows
from clip_benchmark_diffusion.adapter.prompt_checks import check_prompts_for_model
from clip_benchmark_diffusion.adapter.prompts import PromptTable, PromptTokenizer
from clip_benchmark_diffusion.checkpoints import StoreCheckpoints
from clip_benchmark_diffusion.errors import UserError, stderr_note
from clip_benchmark_diffusion.families.model import LoadedModel
from clip_benchmark_diffusion.options import ScoringOptions
from clip_benchmark_diffusion.progress import Progress, progress_bar
from clip_benchmark_diffusion.registry import ModelSpec
from clip_benchmark_diffusion import distributed as dist_util
from clip_benchmark_diffusion.scoring import batching
from clip_benchmark_diffusion.scoring.engine import (Candidates, Conditioning, EngineStats, ImageResult, Levels,
                                                     ScoringEngine)
from clip_benchmark_diffusion.scoring.noise import image_seed
from clip_benchmark_diffusion.store import (ScoreStore, image_digest, image_key, run_key, tensor_digest,
                                            weights_fingerprint)

CLASSIFICATION = "zeroshot_classification"
_BATCH_IDS = itertools.count()  # same sequence on every rank: every rank scores every batch


@dataclass
class RunRecord:
    """What one evaluation cost, for the result JSON."""

    calls: list[int] = field(default_factory=list)
    results: list[ImageResult] = field(default_factory=list)
    reused: int = 0          # images whose result came from the score store
    scored_images: int = 0   # images this process scored itself
    scored_calls: int = 0    # denoiser calls this process actually ran
    shortlists: list[torch.Tensor] = field(default_factory=list)   # hybrid: (B, G) masks, per batch

    def add(self, results: list[ImageResult]) -> None:
        self.results.extend(results)
        self.calls.extend(r.denoiser_calls for r in results)

    def confidences(self, temperature: float, power: float = 1.0) -> list[float | None]:
        """Per image, the probability of its top-1 class (``Outcome.top1_probability``)."""
        return [r.outcome.top1_probability(temperature, power) for r in self.results]


class DiffusionClassifier(CaptionSelectionMixin, nn.Module):
    """``nn.Module`` so that clip_benchmark's ``model.eval()`` and ``.to(device)`` work."""

    is_diffusion_classifier = True  # how the integration recognises us without importing torch code

    def __init__(self, loaded: LoadedModel, spec: ModelSpec, weights: str, device: str | torch.device) -> None:
        super().__init__()
        self.spec, self.options, self.weights = spec, spec.options, weights
        self.world = dist_util.world_from_env()
        self.device_ = dist_util.local_device(self.world, device)
        if self.device_.type == "cuda":
            torch.cuda.set_device(self.device_)  # so clip_benchmark's "cuda" means this rank's GPU
        dist_util.init_process_group_if_needed(self.world, self.device_)
        self.claimer = dist_util.WorkClaimer() if self.world.is_distributed else None
        self.store: ScoreStore | None = None
        self._claims: Claims | None = None
        # A plain attribute, not a submodule: clip_benchmark must not move the offloaded text encoders.
        self.__dict__["model"] = loaded.place(self.device_)
        self.dtype = loaded.dtype
        self.prompts = PromptTable()
        self.tokenizer = PromptTokenizer(self.prompts)
        self.task: str | None = None
        self.record = RunRecord()
        self._groups: list[torch.Tensor] = []
        self._classnames: list[str] | None = None
        self._text_cache: dict[int, Conditioning] = {}
        self._bar: Progress | None = None
        self._model_fingerprint: str | None = None
        self.set_options(spec.options)  # the engine, and no candidate table or run key yet

    def set_options(self, options: ScoringOptions) -> None:
        """Score with other options from now on (same weights; for benchmarks and sweeps)."""
        self.options = options
        self.spec = dataclasses.replace(self.spec, options=options)
        self._candidates: Candidates | None = None
        self._streamed = False   # the conditioning table in pinned CPU memory, rows moved per batch
        self._run_key: str | None = None
        self._shortlister: sl.Shortlister | None = None
        self._class_emb: torch.Tensor | None = None
        self.grid = self.model.grid(options.max_sample_count, options)
        self.model.use_fast_path(options)   # compiled, channels-last: refused or applied before any image
        self.engine = self._make_engine(options)

    def _make_engine(self, options: ScoringOptions) -> ScoringEngine:
        return ScoringEngine(self._denoise, self.grid, self.model.objective, options, self.device_,
                             progress=self._on_progress, nonfinite_error=self._nonfinite_error, note=stderr_note)

    def _nonfinite_error(self, what: str) -> UserError:
        """One line for a denoiser batch with NaN or inf in it, naming what the user can change."""
        dtype = str(self.dtype).replace("torch.", "")
        guidance = self.model.metadata(self.options).get("guidance")
        used = f" at guidance={guidance:g}" if guidance is not None else ""
        fix = ("float16 overflows easily (T5, FLUX, large activations): score with dtype=float32 or bfloat16 "
               "(CLIP_BENCHMARK_DIFFUSION_OPTIONS=dtype=float32)" if self.dtype == torch.float16 else
               "the checkpoint is diverged or damaged: check the weights"
               + (", or score at a smaller guidance" if guidance is not None else ""))
        return UserError(f"the denoiser of {self.spec.recipe.name} ({self.weights}) returned {what} in {dtype}{used}, "
                         f"so no class can be scored; {fix}")

    # -- the clip_benchmark interface --------------------------------------------------------
    def begin_task(self, task: str, expected_images: int | None = None, classnames: list[str] | None = None,
                   templates: list[str] | dict[str, list[str]] | None = None) -> None:
        """Called by the integration before each task: forget the previous classes, and check, before
        any image is scored, that the prompts can tell the classes apart (``classnames`` and
        ``templates`` are those of a zero-shot classification task)."""
        self.task = task
        self._groups, self._candidates, self._run_key, self._class_emb = [], None, None, None
        self._classnames = list(classnames) if classnames is not None else None
        if classnames is not None and not self.model.family.text_conditioned:
            self.model.encode_classes(self._classnames)       # unmappable classes: one line, now
        elif classnames is not None and templates is not None:
            note = check_prompts_for_model(classnames, templates, self.model.token_limits(self.options))
            if note:
                stderr_note(note)
        self._structure: tuple[int, int, int] | None = None
        self.pair_errors: list[torch.Tensor] = []            # caption selection: raw (B, nim, nt) per batch
        self.unconditional_errors: list[torch.Tensor] = []   # ... and (B, nim) empty-prompt errors
        self.record = RunRecord()
        self._load_shortlister()  # weights that do not fit the shortlist model: one line before any image
        self._bar = progress_bar(expected_images, "diffusion scoring")

    def encode_text(self, prompt_ids: torch.Tensor) -> torch.Tensor:
        """One call = one class: every prompt of it gets the class's one-hot row."""
        if self.task == CAPTION_SELECTION:
            return self._caption_text_rows(prompt_ids)
        if self.task not in (None, CLASSIFICATION):
            raise UserError(f"task {self.task} is not supported by diffusion models")
        g = len(self._groups)
        if g >= self.options.max_classes:
            raise UserError(f"more than {self.options.max_classes} classes; raise the capacity with the "
                            "scoring option max_classes (e.g. CLIP_BENCHMARK_DIFFUSION_OPTIONS=max_classes=22000)")
        self._groups.append(prompt_ids.detach().cpu().long())
        self._candidates, self._run_key, self._class_emb = None, None, None
        out = torch.zeros(len(prompt_ids), self.options.max_classes, device=prompt_ids.device)
        out[:, g] = 1.0
        return out

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Score each image against every class seen by ``encode_text``; (B, max_classes) float32.

        Images already in the score store cost nothing; under torchrun the batch's images are
        claimed dynamically by the ranks and the results gathered, so every rank returns all.
        """
        if self.task == CAPTION_SELECTION:
            return self._caption_image_rows(images)
        if not self._groups:
            raise UserError("encode_image was called before any class prompts were encoded; "
                            "diffusion models only serve zero-shot classification")
        with torch.autocast(self.device_.type, enabled=False):
            cands = self._candidate_table()
            images = images.to(self.device_, torch.float32)
            digests = [image_digest(img) for img in images]
            keys = [image_key(self._key(), d) for d in digests]
            shortlist = self._shortlist(images)   # every rank, whole batch: cheap and identical
            score = lambda idx: self._score_subset(images, idx, digests, keys, cands, shortlist)  # noqa: E731
            if self.store is not None and not self.world.is_distributed:
                payloads = self._score_shared(keys, score)
            else:
                chunk = max(1, len(images) // (4 * self.world.world_size))
                payloads = dist_util.score_batch_distributed(next(_BATCH_IDS), len(images), score, self.world,
                                                             self.claimer, chunk)
        results = [ImageResult.from_payload(payloads[i]) for i in range(len(images))]
        self.record.add(results)
        if self._bar is not None:
            self._bar.update(len(results))
        out = torch.zeros(len(images), self.options.max_classes, device=self.device_)
        ranks = torch.stack([r.outcome.rank for r in results]).to(self.device_)      # (B, G)
        out[:, : ranks.shape[1]] = RANK_BASE ** ranks.float()
        return out

    def attach_store(self, store: ScoreStore | None) -> None:
        """Persist every image's result in ``store`` and reuse what it already holds."""
        self.store = store
        self._claims = Claims(store.path) if store is not None else None

    def _score_shared(self, keys: list[str], score) -> dict[int, dict]:
        """One process on a store: lease the missing images first, so that identical commands sharing
        the store split them (torchrun ranks split batches among themselves instead)."""
        scored, reused = self.record.scored_images, self.record.reused
        payloads = score_shared(keys, self.store, self._claims, score)
        # images read back here were stored earlier or by another process sharing the store
        self.record.reused = reused + len(keys) - (self.record.scored_images - scored)
        return payloads

    def _load_shortlister(self) -> None:
        """Hybrid: the open_clip shortlister, loaded once (the next options' may differ)."""
        o = self.options
        if o.shortlist_model and self._shortlister is None:
            self._shortlister = sl.Shortlister(sl.ShortlistSpec(o.shortlist_model, o.shortlist_pretrained,
                                                                o.shortlist_k), self.device_)

    def _shortlist(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Hybrid: the shortlister's (B, G) scores and top-k mask for the batch; None when pure diffusion."""
        o = self.options
        if not o.shortlist_model:
            return None
        self._load_shortlister()
        if self._class_emb is None:
            self._class_emb = self._shortlister.class_embeddings(
                [[self.prompts.texts[i] for i in grp.tolist()] for grp in self._groups])
        scores = self._shortlister.scores(images, self._class_emb).cpu()
        mask = sl.shortlist_mask(scores, o.shortlist_k)
        self.record.shortlists.append(mask)
        return scores, mask

    def shortlist_recall(self, target: torch.Tensor) -> float | None:
        """Hybrid: the share of this task's images whose true class made the shortlist."""
        if not self.record.shortlists:
            return None
        return sl.recall_at_k(torch.cat(self.record.shortlists), target.cpu())

    def _score_subset(self, images: torch.Tensor, idx: list[int], digests: list[str], keys: list[str],
                      cands: Candidates, shortlist: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[int, dict]:
        """Payloads for images ``idx`` of the batch: from the store, else scored (and stored at once)."""
        cached = self.store.get_many([keys[i] for i in idx]) if self.store is not None else {}
        out = {i: cached[keys[i]] for i in idx if keys[i] in cached}
        todo = [i for i in idx if i not in out]
        self.record.reused += len(out)
        self.record.scored_images += len(todo)
        if todo:
            def done(j: int, result: ImageResult) -> None:
                if shortlist is not None:  # the shortlist in diffusion order, then the rest in CLIP's
                    i = todo[j]
                    result.outcome.rank = sl.merge_ranks(result.outcome.rank[None], shortlist[1][i:i + 1],
                                                         shortlist[0][i:i + 1])[0]
                out[todo[j]] = result.to_payload()
                if self.store is not None:
                    self.store.put(keys[todo[j]], out[todo[j]])

            seeds = [image_seed(digests[i], self.options.seed) for i in todo]
            before = self.engine.stats.denoiser_calls
            saved = StoreCheckpoints(self.store, [keys[i] for i in todo]) if self.store is not None else None
            allowed = shortlist[1][todo] if shortlist is not None else None
            self.engine.score(self._latents(images[todo]), seeds, cands, on_done=done, allowed=allowed,
                              checkpoints=saved)
            self.record.scored_calls += self.engine.stats.denoiser_calls - before
        return out

    def _key(self) -> str:
        """What decides scores besides the image: weights, noise levels, options and the conditioning
        itself (so a changed tokenizer, max length or text encoder is a different run)."""
        if self._model_fingerprint is None:
            grid = torch.stack([self.grid.a, self.grid.b, self.grid.model_time])
            self._model_fingerprint = (f"{self.model.family.name}:{self.model.objective}:"
                                       f"{weights_fingerprint(self.model.fingerprint_modules())}:{tensor_digest(grid)}")
        if self._run_key is None:
            prompts = [[self.prompts.texts[i] for i in grp.tolist()] for grp in self._groups]
            if self.model.family.text_conditioned:
                texts = sorted({t for grp in prompts for t in grp})
                cond = self.model.conditioning_fingerprint(texts, self.options)
            else:
                cond = ":".join(f"{k}={tensor_digest(v)}" for k, v in sorted(self._candidate_table().cond.items()))
            self._run_key = run_key(f"{self._model_fingerprint}|{cond}", self.options.fingerprint_dict(), prompts)
        return self._run_key

    # -- internals ---------------------------------------------------------------------------
    def _denoise(self, x_t: torch.Tensor, levels: Levels, cond: Conditioning) -> torch.Tensor:
        return self.model.denoise(x_t, levels, cond, self.options)

    def _latents(self, images: torch.Tensor) -> torch.Tensor:
        """The denoiser's clean input: VAE latents (shifted and scaled) or the pixels themselves."""
        return self.model.encode_images(images)

    def _encode_prompts(self, ids: list[int]) -> None:
        """Run the text encoders once for each prompt not seen before."""
        todo = [i for i in ids if i not in self._text_cache]
        for s in range(0, len(todo), batching.ENCODE_CHUNK):   # rows kept on the CPU: an 80k-prompt table
            part = todo[s: s + batching.ENCODE_CHUNK]          # goes to the device only if it fits
            cond = {k: v.cpu() for k, v in self.model.encode_prompts([self.prompts.texts[i] for i in part],
                                                                     self.options).items()}
            for j, i in enumerate(part):
                self._text_cache[i] = {k: v[j] for k, v in cond.items()}

    def _candidate_table(self) -> Candidates:
        if self._candidates is None:
            if not self.model.family.text_conditioned:
                self._candidates = self._class_table()
                return self._candidates
            self._encode_prompts(sorted({i for grp in self._groups for i in grp.tolist()}))
            if self.options.template_ensemble == "embedding_mean":
                cond = stack_rows([mean_rows([self._text_cache[i] for i in grp.tolist()]) for grp in self._groups])
                members = torch.arange(len(self._groups))[:, None]               # (G, 1)
            else:
                used = sorted(self._text_cache)
                row = {pid: r for r, pid in enumerate(used)}
                cond = stack_rows([self._text_cache[i] for i in used])            # each (P, ...)
                width = max(len(grp) for grp in self._groups)
                members = torch.full((len(self._groups), width), -1, dtype=torch.long)
                for g, grp in enumerate(self._groups):
                    uniq = list(dict.fromkeys(grp.tolist()))
                    members[g, : len(uniq)] = torch.tensor([row[i] for i in uniq])
            cond, self._streamed = batching.place_table(cond, self.device_)
            self._candidates = Candidates(cond=cond, members=members)
        return self._candidates

    def _class_table(self) -> Candidates:
        """Class-conditional families: one conditioning per class, from the class names."""
        if self._classnames is None or len(self._classnames) != len(self._groups):
            raise UserError(f"the {self.model.family.name} family is class-conditional and serves zero-shot "
                            "classification only (class names are mapped to its label ids)")
        return Candidates(cond=self.model.encode_classes(self._classnames),
                          members=torch.arange(len(self._groups))[:, None])

    def _on_progress(self, info: dict) -> None:
        """After each round of the engine. The bar counts images when their batch returns; at many
        classes one batch can run for half an hour before its first image is decided (100 classes x
        64 images on a CPU), so each round also gives the bar a chance to say it is alive
        (``update(0)``: a log line every ``LOG_EVERY_SECONDS``, a tqdm redraw) with the calls so far."""
        if self._bar is not None:
            self._bar.set_postfix(**heartbeat_postfix(self.engine.stats), cands_left=f"{info['candidates_left']:.1f}",
                                  refresh=False)
            self._bar.update(0)

    def classification_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """clip_benchmark's (N, G) logits, or with ``prior_correction=class_mean`` the negated errors
        minus each class's mean over this task's images (``prior_bias.class_mean_correction``)."""
        if self.options.prior_correction == "none":
            return logits
        from clip_benchmark_diffusion.prior_bias import class_mean_correction

        errors = torch.stack([r.outcome.mean_error for r in self.record.results]).double()   # (N, G)
        if errors.shape != logits.shape:
            raise RuntimeError(f"prior correction: {tuple(errors.shape)} errors for {tuple(logits.shape)} logits")
        corrected = -class_mean_correction(errors)
        self.corrected_changes = int((corrected.argmax(1) != logits.argmax(1).to(corrected.device)).sum())
        return corrected.float().to(logits.device)

    def prediction_histogram(self, logits: torch.Tensor, target: torch.Tensor) -> dict:
        from clip_benchmark_diffusion.prior_bias import prediction_histogram

        hist = prediction_histogram(logits.argmax(1), target, self._classnames, logits.shape[1])
        if self.options.prior_correction != "none":
            hist["prior_correction"] = {"method": self.options.prior_correction,
                                        "predictions_changed": getattr(self, "corrected_changes", 0)}
        return hist

    def cost_summary(self) -> dict[str, float]:
        """Denoiser calls per image (mean, max) and seconds per image, as recorded when each was scored.

        Taken from the per-image records (stored ones included), so a re-run of a finished
        evaluation writes the same numbers; engine efficiency lives in ``engine.stats``.
        """
        calls = self.record.calls or [0]
        seconds = [r.seconds for r in self.record.results] or [0.0]
        return {
            "denoiser_calls_per_image": sum(calls) / len(calls),
            "denoiser_calls_per_image_max": max(calls),
            "seconds_per_image": sum(seconds) / len(seconds),
        }

    def weights_digest(self) -> str:
        """A short content fingerprint of the loaded weights (names a weights folder in results)."""
        return weights_fingerprint(self.model.fingerprint_modules())[:16]

    def close_store(self) -> None:
        """The run is over (or stopped): leave the store's owners and close its connections, which folds
        the WAL back into the file, so no -wal or -shm file is left beside a finished store."""
        if self._claims is not None:
            self._claims.leave()
            self._claims.close()
        if self.store is not None:
            self.store.close()

    def store_report(self) -> str:
        """One line on what the score store saved in this process (the run is over: leave the store's owners)."""
        if self._claims is not None:
            self._claims.leave()
        where = f" ({self.store.path})" if self.store is not None else " (store off)"
        return (f"clip_benchmark_diffusion: {self.record.reused} of {len(self.record.results)} images from the score "
                f"store{where}; {self.record.scored_calls} denoiser calls run on rank {self.world.rank}")

    def result_metadata(self, model_type: str) -> dict:
        """The identity of this evaluation for the result JSON and leaderboards."""
        from clip_benchmark_diffusion import __version__

        out = {
            "recipe": self.spec.recipe.name,
            "option_source": self.spec.option_source,
            "weights": self.weights,
            "model_type": model_type,
            **self.model.metadata(self.options),
            "prediction_type": self.model.objective,
            "dtype": str(self.dtype).replace("torch.", ""),
            "noise_levels": {"weighting": self.options.weighting, **self.grid.describe()},
            "scoring": self.options.to_dict(),
            "hybrid": self.options.shortlist_label,   # None: pure diffusion
            "memory": {"peak_bytes": batching.peak_memory_bytes(self.device_),
                       "denoiser_batch": self.engine.batch_size, "conditioning_streamed": self._streamed},
            "package_version": __version__,
        }
        if self.task == CAPTION_SELECTION:
            out["caption_selection"] = self.caption_selection_metadata()
        return out


def heartbeat_postfix(stats: EngineStats) -> dict[str, str | int]:
    """The cost shown beside the progress: the calls run so far, and calls per image only once images
    are decided (their own calls: the calls of images still in flight are no per-image figure)."""
    cost: dict[str, str | int] = {"calls": stats.denoiser_calls}
    if stats.images:
        cost["calls_per_img"] = f"{stats.decided_calls / stats.images:.0f}"
    return cost


def pick_dtype(name: str, device: torch.device, cuda_default: str = "float16") -> torch.dtype:
    """The denoiser dtype: ``auto`` is the family's CUDA dtype on a GPU and float32 elsewhere."""
    if name == "auto":
        return getattr(torch, cuda_default) if device.type == "cuda" else torch.float32
    return getattr(torch, name)
