"""Classes that differ only as strings reach the model as the same tokens: refused before any image.

``zero`` / ``Zero`` (the CLIP tokenizer lower-cases), ``number zero`` / ``number  zero`` (runs of
spaces), two words a T5 vocabulary maps to ``<unk>``: every class score would be identical and the
tie decided by class order, silently."""
from __future__ import annotations

import shutil

import pytest

from cli_helpers import assert_clean_failure, quick_options
from clip_benchmark_diffusion.adapter.prompt_checks import check_distinct_tokens, check_prompts_for_model
from clip_benchmark_diffusion.errors import UserError
from tiny_families import clip_tokenizer, word_tokenizer
from wds_data import DIGIT_NAMES, DIGIT_TEMPLATES, write_digits_wds

CLIP = ("tokenizer", clip_tokenizer(), 16)
T5 = ("tokenizer_2", word_tokenizer(), 32)


@pytest.mark.parametrize("classes, templates", [
    (["zero", "Zero"], DIGIT_TEMPLATES),
    (["number zero", "number  zero"], ["a photo of {c}."]),
    (["one", "two", "ONE"], {"one": ["a one"], "two": ["a two"], "ONE": ["a ONE"]}),   # per-class prompts
])
def test_classes_clip_cannot_tell_apart_are_refused(classes, templates):
    with pytest.raises(UserError, match=f"classes {classes[0]!r} and {classes[-1]!r} reach the model as identical "
                                        "tokens under tokenizer "):
        check_distinct_tokens(classes, templates, [CLIP])


def test_words_outside_a_t5_vocabulary_are_the_same_unk():
    with pytest.raises(UserError, match="classes 'zebra' and 'yak' reach the model as identical tokens under "
                                        "tokenizer_2"):
        check_distinct_tokens(["zebra", "yak"], DIGIT_TEMPLATES, [T5])
    check_distinct_tokens(["zebra", "yak"], DIGIT_TEMPLATES, [CLIP, T5])   # CLIP tells them apart: scores differ
    check_distinct_tokens(["zero", "Zero"], DIGIT_TEMPLATES, [CLIP, T5])  # the word-level T5 keeps case
    with pytest.raises(UserError, match="classes 'zebra' and 'Zebra' .* under tokenizer and tokenizer_2"):
        check_distinct_tokens(["zebra", "Zebra"], DIGIT_TEMPLATES, [CLIP, T5])


def test_distinct_classes_pass_and_the_length_note_still_comes():
    check_distinct_tokens(DIGIT_NAMES, DIGIT_TEMPLATES, [CLIP])
    check_distinct_tokens(["zero", "one"], ["{c}"], [])                 # class-conditional: nothing to compare
    long = ["{c} " + "word " * 20]
    note = check_prompts_for_model(DIGIT_NAMES, long, [CLIP])
    assert note and "10 of 10 prompts exceed the token limit of tokenizer" in note


def test_the_stock_command_stops_before_any_image(tiny_sd, tmp_path, inproc):
    wds = write_digits_wds(tmp_path / "data" / "digits", per_class=1)
    lines = (wds / "classnames.txt").read_text().splitlines()
    lines[1] = "Zero"
    (wds / "classnames.txt").write_text("\n".join(lines) + "\n")
    opts = quick_options(tmp_path)
    proc = inproc("--pretrained_model", f"diffusion_sd2@{opts},{tiny_sd}", "--dataset", "wds/digits",
                  "--dataset_root", str(wds), "--output", "digits_{model}.json", cwd=tmp_path)
    assert proc.returncode == 2
    assert_clean_failure(proc, "classes 'zero' and 'Zero' reach the model as identical tokens under tokenizer",
                         cwd=tmp_path)
    assert not list(tmp_path.rglob("*.sqlite"))                         # no image was scored
