"""Prompts the model cannot read in full, or cannot tell apart: both are errors before any image.

Text encoders read a fixed number of tokens (CLIP 77, the demo models 16, T5 in SD3 256, ...);
the pipelines truncate silently. If the class name falls beyond that limit, every class gets the
same conditioning and the result is a tie decided by noise. That is the same mistake as a
template without ``{c}``, so it is refused before any image is scored; prompts cut only after
the class name are reported once, in one line.

Two classes whose names differ only as strings can also reach the model as the same tokens: the
CLIP tokenizer lower-cases (``zero`` / ``Zero``) and splits on runs of spaces (``number zero`` /
``number  zero``), and a T5 vocabulary maps unknown words to ``<unk>``. When every tokenizer of the
model gives two classes the same token ids and masks, their scores are identical and the tie is
decided by class order: refused too (:func:`check_distinct_tokens`).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from clip_benchmark_diffusion.errors import UserError


def class_prompts(classnames: Sequence[str], templates: Sequence[str] | Mapping[str, Sequence[str]]
                  ) -> list[list[tuple[str, str]]]:
    """Per class, ``(prompt, prompt up to the end of the class name)``; the second is "" when the
    class name cannot be located (a per-class prompt that does not contain it)."""
    out = []
    for c in classnames:
        rows = []
        if isinstance(templates, Mapping):
            for p in templates.get(c, []):
                rows.append((p, p[: p.index(c) + len(c)] if c in p else ""))
        else:
            for t in templates:
                rows.append((t.format(c=c), t.split("{c}", 1)[0].format(c=c) + c if "{c}" in t else ""))
        out.append(rows)
    return out


class _Tokens:
    """One tokenizer's view of texts, each tokenized once (the slow CLIP tokenizer takes ~0.5 ms a prompt)."""

    def __init__(self, name: str, tokenizer: Any, limit: int) -> None:
        self.name, self.tokenizer, self.limit = name, tokenizer, limit
        self._ids: dict[str, tuple[int, ...]] = {}

    def ids(self, text: str) -> tuple[int, ...]:
        """All of the text's token ids, specials included, without truncation."""
        if text not in self._ids:
            self._ids[text] = tuple(self.tokenizer(text, truncation=False)["input_ids"])
        return self._ids[text]

    def model_input(self, text: str) -> tuple:
        """What the text encoder reads: equal for two texts exactly when their padded ids and masks at
        ``limit`` are. Within the limit that is the untruncated ids (padding follows from the length);
        a longer text is tokenized as the pipelines do."""
        ids = self.ids(text)
        if len(ids) <= self.limit:
            return ids
        enc = self.tokenizer(text, padding="max_length", max_length=self.limit, truncation=True)
        return ("truncated", tuple(enc["input_ids"]), tuple(enc["attention_mask"]))


def check_prompts_for_model(classnames: Sequence[str], templates: Sequence[str] | Mapping[str, Sequence[str]],
                            limits: Sequence[tuple[str, Any, int]]) -> str | None:
    """Both checks of this module with one tokenization of each prompt; returns the note of
    :func:`check_prompt_lengths`."""
    tokens = [_Tokens(*limit) for limit in limits]
    note = check_prompt_lengths(classnames, templates, limits, tokens)
    check_distinct_tokens(classnames, templates, limits, tokens)
    return note


def check_distinct_tokens(classnames: Sequence[str], templates: Sequence[str] | Mapping[str, Sequence[str]],
                          limits: Sequence[tuple[str, Any, int]], tokens: Sequence[_Tokens] | None = None) -> None:
    """Raise :class:`UserError` when two classes' prompts reach the model as the same tokens under every
    tokenizer it uses (for each tokenizer, the same multiset of token sequences): no score can tell
    them apart. Classes with identical prompt strings are refused earlier (``check_distinct_prompts``)."""
    if not limits:
        return  # class-conditional: no text reaches the model
    tokens = list(tokens) if tokens is not None else [_Tokens(*limit) for limit in limits]
    owner: dict[tuple, int] = {}
    prompts = class_prompts(classnames, templates)
    for g, rows in enumerate(prompts):
        key = tuple(sorted(tuple(t.model_input(p) for t in tokens) for p, _ in rows))
        if not rows or key not in owner:
            owner.setdefault(key, g)
            continue
        first = owner[key]
        names = " and ".join(t.name for t in tokens)
        raise UserError(
            f"classes {classnames[first]!r} and {classnames[g]!r} reach the model as identical tokens under "
            f"{names} (e.g. {prompts[first][0][0]!r} and {rows[0][0]!r}: case, repeated spaces or words outside "
            "the vocabulary are lost), so it cannot tell them apart; rename one of them with words the "
            "tokenizer keeps")


def check_prompt_lengths(classnames: Sequence[str], templates: Sequence[str] | Mapping[str, Sequence[str]],
                         limits: Sequence[tuple[str, Any, int]], tokens: Sequence[_Tokens] | None = None
                         ) -> str | None:
    """Raise :class:`UserError` if a class name is cut off by any tokenizer's limit; return a note
    (or None) about prompts that are cut after the class name."""
    prompts = class_prompts(classnames, templates)
    long_prompts: dict[str, int] = {}
    for tok in tokens if tokens is not None else [_Tokens(*limit) for limit in limits]:
        name, limit = tok.name, tok.limit

        def n_tokens(text: str) -> int:
            return len(tok.ids(text))

        for c, rows in zip(classnames, prompts):
            for prompt, through_name in rows:
                if through_name and n_tokens(through_name) > limit:
                    raise UserError(
                        f"the prompt {prompt!r} has the class name {c!r} beyond the {limit} tokens {name} reads, "
                        "so it would be cut off and classes could not be told apart; shorten the template "
                        "or put {c} earlier")
                if n_tokens(prompt) > limit:
                    long_prompts[name] = long_prompts.get(name, 0) + 1
    if not long_prompts:
        return None
    total = sum(len(r) for r in prompts)
    parts = ", ".join(f"{n} of {total} prompts exceed the token limit of {name}" for name, n in long_prompts.items())
    return f"{parts} and are truncated after the class name (shorten the templates to score all of their words)"
