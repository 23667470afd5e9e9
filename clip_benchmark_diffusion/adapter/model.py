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

The classifier is a facade, as a diffusers pipeline is: the loader builds its collaborators (class
table, caption selection, shortlist, run account, results) and it only registers them and calls
them in numbered steps.
"""
from __future__ import annotations

import torch
from torch import nn

from clip_benchmark_diffusion.adapter import shortlist as sl
from clip_benchmark_diffusion.adapter.caption_selection import CAPTION_SELECTION, RANK_BASE, CaptionSelection
from clip_benchmark_diffusion.adapter.class_table import ClassTable
from clip_benchmark_diffusion.adapter.prompt_checks import check_prompts_for_model
from clip_benchmark_diffusion.adapter.protocols import ResultSource, ScoreRequest
from clip_benchmark_diffusion.adapter.run_account import RunAccount, RunRecord
from clip_benchmark_diffusion.errors import UserError, stderr_note
from clip_benchmark_diffusion.families.model import LoadedModel
from clip_benchmark_diffusion.options import ScoringOptions
from clip_benchmark_diffusion.scoring.batching import peak_memory_bytes
from clip_benchmark_diffusion.scoring.engine import Candidates, Levels, Conditioning, ScoringEngine
from clip_benchmark_diffusion.scoring.noise import image_seed
from clip_benchmark_diffusion.scoring.outcome import ImageResult

CLASSIFICATION = "zeroshot_classification"
__all__ = ["CLASSIFICATION", "RANK_BASE", "DiffusionClassifier"]


class DiffusionClassifier(nn.Module):
    """``nn.Module`` so that clip_benchmark's ``model.eval()`` and ``.to(device)`` work."""

    is_diffusion_classifier = True  # how the integration recognises us without importing torch code

    def __init__(self, model: LoadedModel, options: ScoringOptions, *, device: torch.device, rank: int,
                 classes: ClassTable, captions: CaptionSelection, shortlist: sl.TaskShortlist,
                 account: RunAccount, results: ResultSource) -> None:
        super().__init__()
        # A plain attribute, not a submodule: clip_benchmark must not move the offloaded text encoders.
        self.__dict__["model"] = model
        self.device_, self.rank = device, rank
        self.classes, self.captions, self.shortlist, self.account, self.results = \
            classes, captions, shortlist, account, results
        self.prompts, self.tokenizer = classes.prompts, classes.tokenizer
        self.task: str | None = None
        self.set_options(options)

    def set_options(self, options: ScoringOptions) -> None:
        """Score with other options from now on (same weights; for benchmarks and sweeps)."""
        self.model.use_fast_path(options)   # compiled, channels-last, attention: refused or applied before any image
        self.options = options
        self.grid = self.model.grid(options.max_sample_count, options)
        self.engine = ScoringEngine(self._denoise, self.grid, self.model.objective, options, self.device_,
                                    progress=self._on_progress, note=stderr_note,
                                    nonfinite_error=lambda what: self.account.nonfinite_error(what, options))
        self.classes.set_options(options)
        self.captions.configure(options, self.grid)
        self.shortlist.reset()

    # -- the clip_benchmark interface --------------------------------------------------------
    def begin_task(self, task: str, expected_images: int | None = None, classnames: list[str] | None = None,
                   templates: list[str] | dict[str, list[str]] | None = None, progress: bool = True) -> None:
        """Called by the integration before each task: forget the previous classes, and check, before
        any image is scored, that the prompts can tell the classes apart (``classnames`` and
        ``templates`` are those of a zero-shot classification task). ``progress``: show the progress
        display (the Python scorer's is opt-in)."""
        self.task = task
        self.classes.reset(classnames)
        if classnames is not None and not self.model.family.text_conditioned:
            self.model.encode_classes(list(classnames))       # unmappable classes: one line, now
        elif classnames is not None and templates is not None:
            note = check_prompts_for_model(classnames, templates, self.model.token_limits(self.options))
            if note:
                stderr_note(note)
        self.captions.begin()
        self.shortlist.begin(self.options)  # weights that do not fit the shortlist model: one line before any image
        self.account.begin(expected_images, progress)

    def set_batch_structure(self, instances: int, images_per_instance: int, texts_per_instance: int) -> None:
        """Caption selection: the shape of the batch about to be encoded (announced by the integration)."""
        self.captions.set_batch_structure(instances, images_per_instance, texts_per_instance)

    def encode_text(self, prompt_ids: torch.Tensor) -> torch.Tensor:
        """One call = one class: every prompt of it gets the class's one-hot row."""
        if self.task == CAPTION_SELECTION:
            return self.captions.text_rows(prompt_ids)
        if self.task not in (None, CLASSIFICATION):
            raise UserError(f"task {self.task} is not supported by diffusion models")
        if len(self.classes) >= self.options.max_classes:
            raise UserError(f"more than {self.options.max_classes} classes; raise the capacity with the "
                            "scoring option max_classes (e.g. CLIP_BENCHMARK_DIFFUSION_OPTIONS=max_classes=22000)")
        g = self.classes.add(prompt_ids)
        self.shortlist.classes_changed()
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
            return self.captions.image_rows(images)
        if not len(self.classes):
            raise UserError("encode_image was called before any class prompts were encoded; "
                            "diffusion models only serve zero-shot classification")
        with torch.autocast(self.device_.type, enabled=False):
            # 1. the candidate table and each image's store key
            cands = self.classes.candidates()
            images = images.to(self.device_, torch.float32)
            digests, keys = self.classes.image_keys(images, self.grid)
            # 2. hybrid: the shortlist, on every rank for the whole batch (cheap and identical)
            shortlist = self.shortlist(images, self.classes.class_prompts(), self.options)
            # 3. each result from the store, another process or rank, or scored here
            calls = self.engine.stats.denoiser_calls
            fetched = self.results.fetch_or_score(
                keys, lambda request: self._score(request, images, digests, cands, shortlist))
        # 4. the account, and the rows clip_benchmark multiplies with the one-hot classifier
        results = [ImageResult.from_payload(fetched.payloads[i]) for i in range(len(images))]
        self.account.add(results, fetched.reused, fetched.scored, self.engine.stats.denoiser_calls - calls)
        self.account.advance(len(results))
        out = torch.zeros(len(images), self.options.max_classes, device=self.device_)
        ranks = torch.stack([r.outcome.rank for r in results]).to(self.device_)      # (B, G)
        out[:, : ranks.shape[1]] = RANK_BASE ** ranks.float()
        return out

    def _score(self, request: ScoreRequest, images: torch.Tensor, digests: list[str], cands: Candidates,
               shortlist: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        """Score the images ``request.indices`` of the batch, handing each to ``request.save`` once decided."""
        todo = request.indices

        def done(j: int, result: ImageResult) -> None:
            if shortlist is not None:  # the shortlist in diffusion order, then the rest in CLIP's
                i = todo[j]
                result.outcome.rank = sl.merge_ranks(result.outcome.rank[None], shortlist[1][i:i + 1],
                                                     shortlist[0][i:i + 1])[0]
            request.save(todo[j], result.to_payload())

        seeds = [image_seed(digests[i], self.options.seed) for i in todo]
        allowed = shortlist[1][todo] if shortlist is not None else None
        self.engine.score(self.model.encode_images(images[todo]), seeds, cands, on_done=done, allowed=allowed,
                          checkpoints=request.checkpoints)

    def _denoise(self, x_t: torch.Tensor, levels: Levels, cond: Conditioning) -> torch.Tensor:
        return self.model.denoise(x_t, levels, cond, self.options)

    def _on_progress(self, info: dict) -> None:
        self.account.heartbeat(self.engine.stats, info["candidates_left"])

    # -- what the integration reads (adapter.protocols.DiffusionRunModel) ------------------------
    @property
    def record(self) -> RunRecord:
        """The current task's per-image records (the run account's: tests and scripts read them)."""
        return self.account.record

    @property
    def pair_errors(self) -> list[torch.Tensor]:
        return self.captions.pair_errors

    @property
    def unconditional_errors(self) -> list[torch.Tensor]:
        return self.captions.unconditional_errors

    def attach_store(self, store: object) -> None:
        """Persist every image's result in ``store`` (a ``ScoreStore``) and reuse what it already holds."""
        self.results.attach(store)

    def run_key(self) -> str:
        """The store's key of the current task's scores (everything but the image)."""
        return self.classes.run_key(self.grid)

    def classification_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return self.account.classification_logits(logits, self.options)

    def prediction_histogram(self, logits: torch.Tensor, target: torch.Tensor) -> dict:
        return self.account.prediction_histogram(logits, target, self.classes.classnames, self.options)

    def shortlist_recall(self, target: torch.Tensor) -> float | None:
        """Hybrid: the share of this task's images whose true class made the shortlist."""
        return self.shortlist.recall(target)

    def image_calls(self) -> list[int]:
        """Per image of the task, the denoiser calls it took."""
        return self.account.record.calls

    def confidences(self) -> list[float | None]:
        """Per image of the task, the probability of its top-1 class at the options' temperature."""
        return self.account.record.confidences(self.options.temperature, self.options.temperature_power)

    def cost_summary(self) -> dict[str, float]:
        return self.account.cost_summary()

    def weights_digest(self) -> str:
        return self.account.weights_digest()

    def result_metadata(self, model_type: str) -> dict:
        """The identity of this evaluation for the result JSON and leaderboards."""
        out = self.account.metadata(self.options, self.grid, model_type)
        out["memory"] = {"peak_bytes": peak_memory_bytes(self.device_), "denoiser_batch": self.engine.batch_size,
                         "conditioning_streamed": self.classes.streamed,
                         "conditioning_bytes": self.classes.table_bytes()}
        if self.task == CAPTION_SELECTION:
            out["caption_selection"] = self.captions.metadata()
        return out

    def store_report(self) -> str:
        """One line on what the score store saved in this process (the run is over: leave the store's owners)."""
        self.results.leave()
        return self.account.store_line(self.results.store_path, self.rank)

    def close_store(self) -> None:
        """The run is over (or stopped): leave the store's owners and close its connections, which folds
        the WAL back into the file, so no -wal or -shm file is left beside a finished store."""
        self.results.close()
