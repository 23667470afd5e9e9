"""The text side of the candidate table (adapter/text_table.py), on a tiny SD3 (two CLIPs and a T5)."""
from __future__ import annotations

import pytest
import torch

from cli_helpers import quick_options
from tiny_families import save_tiny

CLASSES = ["cat", "dog", "bird"]
TEMPLATES = ["a {c}.", "a photo of a {c}.", "a drawing of the {c}."]


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    from clip_benchmark_diffusion.integration.clip_benchmark import ensure_installed

    ensure_installed()
    from clip_benchmark.models import load_clip

    root = tmp_path_factory.mktemp("sd3")
    opts = quick_options(root, strategy="full", n_samples=[2])
    return load_clip("open_clip", f"diffusion_sd3@{opts}", str(save_tiny("sd3", root / "model")), None, "cpu")


def build(loaded, **changes):
    """clip_benchmark's zero_shot_classifier over CLASSES x TEMPLATES under ``changes``; the candidate table."""
    from clip_benchmark.metrics import zeroshot_classification as zc

    model, _, tokenizer = loaded
    model.set_options(model.options.replace(**changes))
    model.begin_task("zeroshot_classification", expected_images=1)
    zc.zero_shot_classifier(model, tokenizer, CLASSES, TEMPLATES, "cpu")
    return model.classes.candidates()


def encoded(loaded, texts, **changes):
    """The oracle: the family's own encode_prompts on ``texts``, stacked, on the CPU."""
    model = loaded[0]
    return {k: v.cpu() for k, v in model.model.encode_prompts(texts, model.options.replace(**changes)).items()}


@pytest.mark.parametrize("first, second", [(8, 24), (24, 8)])
def test_a_new_max_sequence_length_encodes_the_prompts_again(sd3, first, second):
    """Rows encoded at one T5 length are not reused at another (the store key already says the other)."""
    texts = [t.format(c=c) for c in CLASSES for t in TEMPLATES]
    for length in (first, second):
        table = build(sd3, max_sequence_length=length, template_ensemble="error_mean")
        oracle = encoded(sd3, texts, max_sequence_length=length)
        assert table.cond["encoder_hidden_states"].shape == (9, 16 + length, 32)   # 16 CLIP tokens + T5's
        for k, v in oracle.items():      # class g's template j is oracle row 3g + j, table row members[g, j]
            torch.testing.assert_close(table.cond[k][table.members.flatten()], v, rtol=1e-5, atol=1e-6)
