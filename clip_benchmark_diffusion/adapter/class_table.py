"""The class table: the task's classes as the engine scores them.

Holds the prompt table (shared with the tokenizer clip_benchmark is handed), the text encoders'
states per prompt (``TextTable``), the classes' prompt groups, the candidate table built from them,
and the store keys of the task's images: the run key (model, noise levels, conditioning, options,
prompts) and each image's digest.
"""
from __future__ import annotations

import torch

from clip_benchmark_diffusion.adapter.prompts import PromptTable, PromptTokenizer
from clip_benchmark_diffusion.adapter.text_table import TextTable
from clip_benchmark_diffusion.errors import UserError
from clip_benchmark_diffusion.families.model import LoadedModel
from clip_benchmark_diffusion.options import ScoringOptions
from clip_benchmark_diffusion.results.keys import (class_conditioning_fingerprint, image_digest, image_key,
                                                   model_fingerprint, task_run_key)
from clip_benchmark_diffusion.scoring import batching
from clip_benchmark_diffusion.scoring.engine import Candidates, Conditioning
from clip_benchmark_diffusion.scoring.timesteps import NoiseGrid


class ClassTable:
    """Prompts, text cache, candidate table and run key of the current task, for ``model`` under ``options``."""

    def __init__(self, model: LoadedModel, options: ScoringOptions) -> None:
        self.model, self.options = model, options
        self.prompts = PromptTable()
        self.tokenizer = PromptTokenizer(self.prompts)
        self.groups: list[torch.Tensor] = []          # per class, its prompt ids
        self.classnames: list[str] | None = None
        self.text = TextTable(model, self.prompts)   # the text states, and the table made of them
        self.streamed = False   # the candidate table in pinned CPU memory, its rows moved per batch
        self._candidates: Candidates | None = None
        self._run_key: str | None = None
        self._model_fingerprint: str | None = None

    def __len__(self) -> int:
        return len(self.groups)

    def set_options(self, options: ScoringOptions) -> None:
        self.options = options
        self.invalidate()

    def reset(self, classnames: list[str] | None) -> None:
        """A new task: no classes yet (``classnames`` are those of a classification task, if known)."""
        self.groups, self.classnames = [], list(classnames) if classnames is not None else None
        self.invalidate()

    def add(self, prompt_ids: torch.Tensor) -> int:
        """One more class with these prompts; returns its index."""
        self.groups.append(prompt_ids.detach().cpu().long())
        self.invalidate()
        return len(self.groups) - 1

    def invalidate(self) -> None:
        """Build the candidate table and run key again when next asked (the text states stay cached)."""
        self._candidates, self._run_key = None, None

    def class_prompts(self) -> list[list[str]]:
        """Each class's prompts, in class order."""
        return [[self.prompts.texts[i] for i in grp.tolist()] for grp in self.groups]

    def conditioning(self, prompt_ids: list[int]) -> Conditioning:
        """The stacked text states of ``prompt_ids`` (the candidate table's rows, the others encoded now)."""
        return self.text.conditioning(prompt_ids, self.options)

    def candidates(self) -> Candidates:
        """The engine's candidate table: one conditioning per class, or per prompt with its members."""
        if self._candidates is None:
            if self.model.family.text_conditioned:
                self._candidates, self.streamed = self.text.candidates(self.groups, self.options, self.model.device)
            else:
                table = self._class_table()
                cond, self.streamed = batching.place_table(table.cond, self.model.device)
                self._candidates = Candidates(cond=cond, members=table.members)
        return self._candidates

    def table_bytes(self) -> int:
        """The candidate table's size (0 before it is built)."""
        return batching.table_bytes(self._candidates.cond) if self._candidates is not None else 0

    def image_keys(self, images: torch.Tensor, grid: NoiseGrid) -> tuple[list[str], list[str]]:
        """Each image's digest (which also seeds its noise) and store key in this task."""
        digests = [image_digest(img) for img in images]
        run = self.run_key(grid)
        return digests, [image_key(run, d) for d in digests]

    def run_key(self, grid: NoiseGrid) -> str:
        """What decides scores besides the image: weights, noise levels, options and the conditioning
        itself (so a changed tokenizer, max length or text encoder is a different run)."""
        if self._model_fingerprint is None:
            levels = torch.stack([grid.a, grid.b, grid.model_time])
            self._model_fingerprint = model_fingerprint(self.model.family.name, self.model.objective,
                                                        self.model.fingerprint_modules(), levels)
        if self._run_key is None:
            prompts = self.class_prompts()
            if self.model.family.text_conditioned:
                cond = self.model.conditioning_fingerprint(sorted({t for grp in prompts for t in grp}), self.options)
            else:
                cond = class_conditioning_fingerprint(self.candidates().cond)
            self._run_key = task_run_key(self._model_fingerprint, cond, self.options.fingerprint_dict(), prompts)
        return self._run_key

    # -- internals ---------------------------------------------------------------------------
    def _class_table(self) -> Candidates:
        """Class-conditional families: one conditioning per class, from the class names."""
        if self.classnames is None or len(self.classnames) != len(self.groups):
            raise UserError(f"the {self.model.family.name} family is class-conditional and serves zero-shot "
                            "classification only (class names are mapped to its label ids)")
        return Candidates(cond=self.model.encode_classes(self.classnames),
                          members=torch.arange(len(self.groups))[:, None])
