"""Prompts the model cannot read in full: a class name cut off by truncation is an error.

Text encoders read a fixed number of tokens (CLIP 77, the demo models 16, T5 in SD3 256, ...);
the pipelines truncate silently. If the class name falls beyond that limit, every class gets the
same conditioning and the result is a tie decided by noise. That is the same mistake as a
template without ``{c}``, so it is refused before any image is scored; prompts cut only after
the class name are reported once, in one line.
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


def _length(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text, truncation=False)["input_ids"])


def check_prompt_lengths(classnames: Sequence[str], templates: Sequence[str] | Mapping[str, Sequence[str]],
                         limits: Sequence[tuple[str, Any, int]]) -> str | None:
    """Raise :class:`UserError` if a class name is cut off by any tokenizer's limit; return a note
    (or None) about prompts that are cut after the class name."""
    prompts = class_prompts(classnames, templates)
    long_prompts: dict[str, int] = {}
    for name, tokenizer, limit in limits:
        cache: dict[str, int] = {}

        def n_tokens(text: str) -> int:
            if text not in cache:
                cache[text] = _length(tokenizer, text)
            return cache[text]

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
