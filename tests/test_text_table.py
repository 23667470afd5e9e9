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


def test_class_means_are_the_mean_of_each_class_prompts_rows(sd3):
    table = build(sd3, max_sequence_length=8, template_ensemble="embedding_mean")
    assert table.members.flatten().tolist() == [0, 1, 2]
    for c, name in enumerate(CLASSES):
        oracle = encoded(sd3, [t.format(c=name) for t in TEMPLATES], max_sequence_length=8)
        for k, v in oracle.items():
            torch.testing.assert_close(table.cond[k][c], v.float().mean(0), rtol=1e-5, atol=1e-6)


class _Encodings:
    """Wraps the model's encode_prompts: the chunks it was asked for, and how many earlier chunks'
    outputs are still alive (held by someone) each time a new chunk is encoded."""

    def __init__(self, loaded_model, monkeypatch):
        from torch.multiprocessing.reductions import StorageWeakRef   # a row view keeps its chunk's storage

        self.sizes, self.alive, self._refs = [], [], []
        inner = loaded_model.encode_prompts

        def encode(texts, options):
            self.alive.append(sum(not ref.expired() for ref in self._refs))
            self.sizes.append(len(texts))
            out = inner(texts, options)
            self._refs += [StorageWeakRef(v.untyped_storage()) for v in out.values()]
            return out

        monkeypatch.setattr(loaded_model, "encode_prompts", encode)


def test_an_embedding_mean_table_holds_a_class_prompt_rows_only_until_its_mean(sd3, monkeypatch):
    """At ImageNet scale the prompts' rows are 80x the means': they must not pile up while the means are
    taken. Chunks of 2 prompts over 3 classes x 3 templates: when a chunk is encoded, at most the previous
    chunk's output (a class straddles two chunks) is alive; nothing but the means is held after."""
    from clip_benchmark_diffusion.scoring import batching

    model = sd3[0]
    monkeypatch.setattr(batching, "ENCODE_CHUNK", 2)
    calls = _Encodings(model.model, monkeypatch)
    table = build(sd3, max_sequence_length=7, template_ensemble="embedding_mean")   # a length no other test uses
    assert calls.sizes == [2, 2, 2, 2, 1]
    assert max(calls.alive) <= 2                      # one chunk's two tensors (states, pooled)
    assert model.classes.text.held_bytes() == batching.table_bytes(table.cond) == 3 * ((16 + 7) * 32 + 32) * 4


def test_the_host_holds_one_copy_and_a_rebuild_over_the_same_prompts_encodes_nothing(sd3, monkeypatch):
    from clip_benchmark_diffusion.scoring import batching

    model = sd3[0]
    table = build(sd3, max_sequence_length=9, template_ensemble="error_mean")
    assert model.classes.text.held_bytes() == batching.table_bytes(table.cond) == 9 * ((16 + 9) * 32 + 32) * 4
    assert all(table.cond[k] is v for k, v in model.classes.text.host.items())   # off CUDA: the host table
    calls = _Encodings(model.model, monkeypatch)
    again = build(sd3, max_sequence_length=9, template_ensemble="error_mean", seed=7)   # new options, same prompts
    assert calls.sizes == []
    assert again.cond["encoder_hidden_states"].data_ptr() == table.cond["encoder_hidden_states"].data_ptr()


def test_a_table_that_would_not_fit_the_host_is_refused_after_one_chunk(sd3, monkeypatch):
    from clip_benchmark_diffusion.errors import UserError
    from clip_benchmark_diffusion.scoring import batching

    model = sd3[0]
    monkeypatch.setattr(batching, "ENCODE_CHUNK", 2)
    monkeypatch.setattr(batching, "host_free_bytes", lambda: 10_000)
    calls = _Encodings(model.model, monkeypatch)
    with pytest.raises(UserError) as refusal:
        build(sd3, max_sequence_length=11, template_ensemble="error_mean")
    message = str(refusal.value)
    assert "\n" not in message and "needs 0.0 GB (9 rows of 0.00 MB)" in message
    assert message.endswith("use template_ensemble=embedding_mean (one row per class) or fewer templates")
    assert calls.sizes == [2]                        # the first chunk sized the table; nothing more was encoded
    monkeypatch.setattr(batching, "host_free_bytes", lambda: 10**12)
    table = build(sd3, max_sequence_length=11, template_ensemble="error_mean")   # with room, it is built
    assert table.cond["encoder_hidden_states"].shape == (9, 27, 32)


def test_a_streamed_text_table_is_the_kept_host_table(sd3, monkeypatch):
    """Where the table is streamed (a CUDA device it would crowd), the engine reads the host table itself:
    no second copy is made."""
    from clip_benchmark_diffusion.scoring import batching

    model = sd3[0]
    build(sd3, max_sequence_length=10, template_ensemble="error_mean")
    monkeypatch.setattr(batching, "table_home", lambda nbytes, device, free_bytes=None: "host")
    table = build(sd3, max_sequence_length=10, template_ensemble="error_mean", seed=3)
    assert model.classes.streamed
    assert model.classes.text.held_bytes() == batching.table_bytes(table.cond)
    assert all(table.cond[k] is v for k, v in model.classes.text.host.items())


def test_caption_rows_are_encoded_for_the_call_and_not_kept(sd3):
    from clip_benchmark_diffusion.scoring import batching

    model = sd3[0]
    table = build(sd3, max_sequence_length=12, template_ensemble="error_mean")
    held = model.classes.text.held_bytes()
    ids = model.classes.prompts.add(["a caption nobody else uses.", "a cat."]).tolist()
    rows = model.classes.conditioning(ids)
    oracle = encoded(sd3, ["a caption nobody else uses.", "a cat."], max_sequence_length=12)
    torch.testing.assert_close(rows["encoder_hidden_states"], oracle["encoder_hidden_states"], rtol=1e-5, atol=1e-6)
    assert model.classes.text.held_bytes() == held == batching.table_bytes(table.cond)
