"""Prompt ids instead of token ids: the tokenizer half of the dot-product trick.

clip_benchmark calls ``tokenizer(list_of_prompts).to(device)`` and hands the result to
``model.encode_text``. Our tokenizer stores each distinct prompt once in a table owned by the
model and returns the prompts' integer ids; the model encodes each prompt with the real text
encoder at most once.
"""
from __future__ import annotations

import torch


class PromptTable:
    """Distinct prompt strings, numbered in order of first appearance."""

    def __init__(self) -> None:
        self.texts: list[str] = []
        self._ids: dict[str, int] = {}
        self.last_ids = torch.empty(0, dtype=torch.long)  # the most recent tokenizer call

    def add(self, texts: list[str]) -> torch.Tensor:
        ids = []
        for text in texts:
            if text not in self._ids:
                self._ids[text] = len(self.texts)
                self.texts.append(text)
            ids.append(self._ids[text])
        self.last_ids = torch.tensor(ids, dtype=torch.long)
        return self.last_ids

    def __len__(self) -> int:
        return len(self.texts)


class PromptTokenizer:
    """The tokenizer clip_benchmark receives: ``list[str] -> LongTensor`` of prompt ids."""

    def __init__(self, table: PromptTable) -> None:
        self.table = table

    def __call__(self, texts: str | list[str]) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        return self.table.add(list(texts))
