"""The Hugging Face tokenizer rebuilt from open_clip's BPE file must give open_clip's ids."""

from __future__ import annotations

import open_clip
import pytest

from clip_benchmark_diffusion.tokenizers import clip_bpe_tokenizer

TEXTS = [
    "a photo of a T-shirt.",
    "a blurry photo of an ankle boot",
    "Hello, world!! It's   an odd-looking, well-worn (sneaker)?",
    "café naïve résumé 2024 #42",
    "UPPER lower MiXeD",
    "",
    # Longer than any context length used here, to exercise truncation.
    "a very long caption " * 20 + "that keeps going and going, with punctuation; and numbers 1234567890.",
]


@pytest.fixture(scope="module")
def tokenizer_77():
    return clip_bpe_tokenizer()


def _non_padding(ids: list[int], eos: int) -> list[int]:
    """Everything up to and including the first end-of-text id."""
    return ids[: ids.index(eos) + 1]


def test_special_tokens_and_size(tokenizer_77) -> None:
    assert len(tokenizer_77) == 49408
    assert tokenizer_77.bos_token_id == 49406
    assert tokenizer_77.eos_token_id == 49407
    assert tokenizer_77.pad_token_id == 49407
    assert tokenizer_77.model_max_length == 77


@pytest.mark.parametrize("text", TEXTS)
def test_ids_match_simple_tokenizer_encode(tokenizer_77, text: str) -> None:
    simple = open_clip.tokenizer.SimpleTokenizer()
    ours = tokenizer_77(text, add_special_tokens=False).input_ids
    assert ours == simple.encode(text)


@pytest.mark.parametrize("context_length", [16, 77])
def test_ids_match_open_clip_tokenize(context_length: int) -> None:
    tokenizer = clip_bpe_tokenizer(context_length)
    ours = tokenizer(TEXTS, padding="max_length", truncation=True, return_tensors="pt").input_ids
    theirs = open_clip.tokenize(TEXTS, context_length=context_length)
    assert ours.shape == theirs.shape == (len(TEXTS), context_length)
    for row_ours, row_theirs in zip(ours.tolist(), theirs.tolist()):
        kept = _non_padding(row_theirs, 49407)
        assert row_ours[: len(kept)] == kept
        # open_clip pads with 0; ours pads with <|endoftext|>.
        assert all(i == 49407 for i in row_ours[len(kept) :])


def test_long_text_is_truncated_with_end_token() -> None:
    ids = clip_bpe_tokenizer(16)(TEXTS[-1], truncation=True).input_ids
    assert len(ids) == 16
    assert ids[0] == 49406 and ids[-1] == 49407
    assert ids == open_clip.tokenize([TEXTS[-1]], context_length=16)[0].tolist()
