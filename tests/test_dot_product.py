"""The dot-product trick against clip_benchmark's real zero-shot code."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from cli_helpers import quick_options
from clip_benchmark_diffusion.adapter.caption_selection import RANK_BASE
from tiny_models import load_tiny_classifier

CLASSES = ["zero", "one", "two", "three", "four", "five"]
# CuPL-style per-class prompt lists of unequal length, one prompt shared by two classes.
CUPL = {
    "zero": ["a zero", "the digit zero", "a round zero"],
    "one": ["a one"],
    "two": ["a two", "the digit two"],
    "three": ["a three", "a number"],
    "four": ["a four", "a number", "the digit four", "four"],
    "five": ["a five"],
}


@pytest.fixture(scope="module")
def loaded(tiny_sd, tmp_path_factory):
    opts = quick_options(tmp_path_factory.mktemp("opts"), max_samples=8, p_value=0.2, batch_size=16)
    return load_tiny_classifier(tiny_sd, opts)


def _images(transform, n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    arrays = (torch.rand(n, 24, 20, 3, generator=g) * 255).to(torch.uint8).numpy()
    return torch.stack([transform(Image.fromarray(a)) for a in arrays])


@pytest.mark.parametrize("templates", [CUPL, ["a photo of {c}.", "{c}"]], ids=["cupl", "list"])
def test_classifier_columns_are_exact_one_hots(loaded, templates):
    from clip_benchmark.metrics import zeroshot_classification as zc

    model, _, tokenizer = loaded
    model.begin_task("zeroshot_classification")
    clf = zc.zero_shot_classifier(model, tokenizer, CLASSES, templates, "cpu", amp=True)
    assert clf.shape == (model.options.max_classes, len(CLASSES))
    assert torch.equal(clf.float(), torch.eye(model.options.max_classes)[:, : len(CLASSES)])


def test_clip_benchmark_logits_rank_classes_exactly_as_diffusion_scores(loaded):
    """Real zero_shot_classifier + run_classification + metrics under bfloat16 autocast."""
    from clip_benchmark.metrics import zeroshot_classification as zc

    model, transform, tokenizer = loaded
    images = _images(transform, 10)
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 0, 1, 2, 3])
    loader = [(images[:6], labels[:6]), (images[6:], labels[6:])]
    model.begin_task("zeroshot_classification")
    clf = zc.zero_shot_classifier(model, tokenizer, CLASSES, CUPL, "cpu", amp=True)
    logits, target = zc.run_classification(model, clf, loader, "cpu", amp=True)
    ranks = torch.stack([r.outcome.rank for r in model.record.results])       # (10, 6)
    assert logits.shape == (10, 6)
    # Same order of classes, for every image, after clip_benchmark's normalisation and bf16 matmul.
    assert torch.equal(torch.argsort(-logits, dim=1, stable=True), torch.argsort(ranks, dim=1))
    assert len(torch.unique(logits[0])) == 6                                 # no ties introduced
    # Top-1 / top-5 through clip_benchmark's (patched) accuracy equal the direct count.
    acc1, acc5 = zc.accuracy(logits, target, topk=(1, 5))
    assert acc1 == (ranks[torch.arange(10), target] == 0).sum().item() / 10
    assert acc5 == (ranks[torch.arange(10), target] < 5).sum().item() / 10


def test_rank_values_survive_half_precision():
    values = RANK_BASE ** torch.arange(1000, dtype=torch.float32)
    normed = torch.nn.functional.normalize(values[None], dim=-1)[0]
    for dtype in (torch.bfloat16, torch.float16):
        if dtype == torch.float16:
            normed16 = (100 * normed).to(dtype)[:200]                         # fp16 underflows far down
        else:
            normed16 = (100 * normed).to(dtype)
        assert (torch.diff(normed16.float()) < 0).all()


def test_encoders_return_float32_under_autocast(loaded):
    model, transform, tokenizer = loaded
    model.begin_task("zeroshot_classification")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        text = model.encode_text(tokenizer(["a one", "a two"]))
        image = model.encode_image(_images(transform, 1))
    assert text.dtype == image.dtype == torch.float32


def test_prompts_are_encoded_once(loaded):
    model, _, tokenizer = loaded
    model.begin_task("zeroshot_classification")
    known = set(model.prompts.texts)           # the module's model has seen other tests' prompts
    for cls in ["a", "b", "a"]:
        model.encode_text(tokenizer([f"photo of {cls}", "shared"]))
    new = {"photo of a", "photo of b", "shared"} - known
    assert set(model.prompts.texts) - known == new
    assert len(model.prompts.texts) == len(set(model.prompts.texts))      # each prompt stored once
    rows: list[int] = []
    hook = model.model.pipe.text_encoder.register_forward_hook(lambda module, args, out: rows.append(len(args[0])))
    try:
        model.classes.candidates()
        model.classes.invalidate()             # rebuild the table: the text states come from the cache
        model.classes.candidates()
    finally:
        hook.remove()
    assert rows == [len(new)]                  # one text-encoder pass, over the new prompts only
    ids = tokenizer(["photo of a", "shared", "photo of b"])
    assert ids.tolist() == tokenizer(["photo of a", "shared", "photo of b"]).tolist()
    assert len(set(ids.tolist())) == 3


def test_scores_do_not_depend_on_dataloader_batch_or_position(tiny_sd, tmp_path):
    """Noise comes from the seed and the image content: batches and positions change nothing."""
    opts = quick_options(tmp_path, max_samples=10, p_value=0.2)
    model, transform, tokenizer = load_tiny_classifier(tiny_sd, opts)
    images = _images(transform, 6)

    def scores(batches, batch_size):
        model.set_options(model.options.replace(batch_size=batch_size))
        model.begin_task("zeroshot_classification")
        for cls in CLASSES:
            model.encode_text(tokenizer(CUPL[cls]))
        for batch in batches:
            model.encode_image(batch)
        return model.record.results

    a = scores([images], batch_size=64)
    b = scores([images[[5, 3]], images[[4, 0, 2, 1]]], batch_size=5)
    for i, j in zip([5, 3, 4, 0, 2, 1], range(6)):
        assert torch.equal(a[i].outcome.rank, b[j].outcome.rank)
        assert torch.equal(a[i].outcome.samples, b[j].outcome.samples)
        assert torch.allclose(a[i].outcome.mean_error, b[j].outcome.mean_error, rtol=1e-5)
        assert a[i].seed == b[j].seed


def _protocol_members(protocol: type) -> set[str]:
    names = set(getattr(protocol, "__annotations__", {}))
    names |= {n for n, v in vars(protocol).items() if not n.startswith("_") and (callable(v) or isinstance(v, property))}
    return names


def test_the_loaded_classifier_offers_what_the_integration_calls(loaded):
    """The lifecycle and the patches talk to the model through protocols.DiffusionRunModel, and the model to
    its results through protocols.ResultSource: the objects the loader builds have every member."""
    from clip_benchmark_diffusion.adapter.protocols import DiffusionRunModel, ResultSource

    model, _, _ = loaded
    assert _protocol_members(DiffusionRunModel) >= {"rank", "begin_task", "confidences", "close_store"}
    assert [n for n in sorted(_protocol_members(DiffusionRunModel)) if not hasattr(model, n)] == []
    assert _protocol_members(ResultSource) == {"store_path", "attach", "fetch_or_score", "leave", "close"}
    assert [n for n in sorted(_protocol_members(ResultSource)) if not hasattr(model.results, n)] == []
