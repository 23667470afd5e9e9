"""The text side of the class table: each prompt's conditioning rows and the candidate table built
from them, one row per prompt (``error_mean``) or one mean row per class (``embedding_mean``).

Prompts are encoded ``batching.ENCODE_CHUNK`` at a time and kept on the CPU; each is encoded once
while the options keep the tokens the model reads (``max_sequence_length``).
"""
from __future__ import annotations

import torch

from clip_benchmark_diffusion.adapter.conditioning import mean_rows, stack_rows
from clip_benchmark_diffusion.adapter.prompts import PromptTable
from clip_benchmark_diffusion.families.model import LoadedModel
from clip_benchmark_diffusion.options import ScoringOptions
from clip_benchmark_diffusion.scoring import batching
from clip_benchmark_diffusion.scoring.engine import Candidates, Conditioning


class TextTable:
    """The text encoders' rows of ``prompts`` under ``model``, and the candidate tables made of them."""

    def __init__(self, model: LoadedModel, prompts: PromptTable) -> None:
        self.model, self.prompts = model, prompts
        self._cache: dict[int, Conditioning] = {}
        self._token_limits: list[int] | None = None   # what the cached rows were encoded with

    def conditioning(self, prompt_ids: list[int], options: ScoringOptions) -> Conditioning:
        """The stacked text states of ``prompt_ids`` (encoded now where not cached)."""
        self._encode(sorted(set(prompt_ids)), options)
        return stack_rows([self._cache[i] for i in prompt_ids])

    def candidates(self, groups: list[torch.Tensor], options: ScoringOptions) -> Candidates:
        """The classes ``groups`` (each its prompt ids) as the engine's candidate table."""
        self._encode(sorted({i for grp in groups for i in grp.tolist()}), options)
        if options.template_ensemble == "embedding_mean":
            cond = stack_rows([mean_rows([self._cache[i] for i in grp.tolist()]) for grp in groups])
            return Candidates(cond=cond, members=torch.arange(len(groups))[:, None])      # (G, 1)
        used = sorted(self._cache)
        row = {pid: r for r, pid in enumerate(used)}
        cond = stack_rows([self._cache[i] for i in used])                                 # each (P, ...)
        width = max(len(grp) for grp in groups)
        members = torch.full((len(groups), width), -1, dtype=torch.long)
        for g, grp in enumerate(groups):
            uniq = list(dict.fromkeys(grp.tolist()))
            members[g, : len(uniq)] = torch.tensor([row[i] for i in uniq])
        return Candidates(cond=cond, members=members)

    def _encode(self, ids: list[int], options: ScoringOptions) -> None:
        """Run the text encoders once for each prompt not seen before (under these token limits)."""
        limits = [limit for _, _, limit in self.model.token_limits(options)]
        if limits != self._token_limits:
            self._cache, self._token_limits = {}, limits
        todo = [i for i in ids if i not in self._cache]
        for s in range(0, len(todo), batching.ENCODE_CHUNK):   # rows kept on the CPU: an 80k-prompt table
            part = todo[s: s + batching.ENCODE_CHUNK]          # goes to the device only if it fits
            cond = {k: v.cpu() for k, v in self.model.encode_prompts([self.prompts.texts[i] for i in part],
                                                                     options).items()}
            for j, i in enumerate(part):
                self._cache[i] = {k: v[j] for k, v in cond.items()}
