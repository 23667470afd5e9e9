"""Zero-shot retrieval as a labelled hybrid (issue 26): the merged ranking, clip_benchmark's own metric
reading it, and the stock command on a slice of the shipped retrieval set with the trained pair models."""
from __future__ import annotations

import json
import re
import tarfile
from pathlib import Path

import pytest
import torch

from cli_helpers import clip_benchmark_eval
from clip_benchmark_diffusion.adapter.retrieval import (ReplayModel, RetrievalData, merged_values, replay_loader,
                                                        top_k_mask)
from clip_benchmark_diffusion_demo import CLIP_PAIRS_NAME, CLIP_PAIRS_WEIGHTS
from clip_benchmark_diffusion_demo.pairs_data import RETRIEVAL_DIR

STORE = "clip_benchmark_diffusion_scores.sqlite"


def _by_keys(scored: torch.Tensor, diffusion: torch.Tensor, clip: torch.Tensor) -> list[int]:
    """A query's expected order: the scored candidates by diffusion score, then the rest by CLIP's."""
    n = len(clip)
    return sorted(range(n), key=lambda i: (not bool(scored[i]), -float(diffusion[i] if scored[i] else clip[i])))


def test_every_row_and_column_is_ordered_as_its_keys_say():
    g = torch.Generator().manual_seed(0)
    clip, diffusion = torch.rand(7, 5, generator=g), torch.randn(7, 5, generator=g).double()
    scored = top_k_mask(clip, 2, dim=1) | top_k_mask(clip, 2, dim=0)
    assert scored.sum(1).min() >= 2 and scored.sum(0).min() >= 2 and not scored.all()
    values = merged_values(scored, diffusion.masked_fill(~scored, float("-inf")), clip)
    for j in range(7):                                                   # image retrieval: each text's images
        assert (-values[j]).argsort().tolist() == _by_keys(scored[j], diffusion[j], clip[j])
    for i in range(5):                                                   # text retrieval: each image's texts
        assert (-values[:, i]).argsort().tolist() == _by_keys(scored[:, i], diffusion[:, i], clip[:, i])
    assert values.max() == 1.0 and values.min() > 0 and len(values.unique()) == values.numel()


def test_clip_benchmarks_own_retrieval_metric_reads_the_matrix_exactly():
    """Values a billionth apart, which float32 (and bfloat16 under autocast) would tie: float64 keeps them."""
    from clip_benchmark.metrics import zeroshot_retrieval as zr

    g = torch.Generator().manual_seed(1)
    values = 0.5 + torch.rand(12, 4, generator=g, dtype=torch.float64) * 1e-9          # 12 texts, 4 images
    owner = torch.arange(4).repeat_interleave(3)
    texts = [f"text {j}" for j in range(12)]
    data = RetrievalData(torch.zeros(4, 1, 1, 1), texts, owner, [[texts[0:3], texts[3:6]], [texts[6:9], texts[9:12]]])
    replay = ReplayModel(values)
    metrics = zr.evaluate(replay, replay_loader(data), replay.tokenizer, "cpu", amp=True, recall_k_list=[1, 2])
    expected = {}
    for k in (1, 2):
        expected[f"image_retrieval_recall@{k}"] = sum(int(owner[j]) in values[j].topk(k).indices.tolist()
                                                      for j in range(12)) / 12
        expected[f"text_retrieval_recall@{k}"] = sum(bool((owner[values[:, i].topk(k).indices] == i).any())
                                                     for i in range(4)) / 4
    assert metrics == pytest.approx(expected, abs=1e-7)
    assert 0 < expected["image_retrieval_recall@1"] < 1                      # not a vacuous case


def _slice(n: int, dest: Path) -> Path:
    """The first ``n`` scenes of the shipped retrieval set, as a wds folder."""
    (dest / "test").mkdir(parents=True)
    (dest / "dataset_type.txt").write_text("retrieval\n")
    with tarfile.open(RETRIEVAL_DIR / "test" / "0.tar") as src, tarfile.open(dest / "test" / "0.tar", "w") as dst:
        for member in src:
            if int(member.name[1:8]) < n:
                dst.addfile(member, src.extractfile(member))
    (dest / "test" / "nshards.txt").write_text("1\n")
    return dest


@pytest.mark.skipif(not CLIP_PAIRS_WEIGHTS.is_file(), reason="the trained CLIP pair model is not shipped")
def test_retrieval_through_the_stock_command_is_a_labelled_rerank(tmp_path, monkeypatch):
    from clip_benchmark.datasets.builder import build_dataset

    from clip_benchmark_diffusion.adapter.pair_scores import pair_errors
    from clip_benchmark_diffusion.integration.clip_benchmark import ensure_installed
    from clip_benchmark_diffusion.options import OPTIONS_ENV
    from clip_benchmark_diffusion.results.store import ScoreStore

    n, k, samples = 8, 2, 2
    data = _slice(n, tmp_path / "data")
    opts = (f"min_samples=2,max_samples={samples},shortlist_model={CLIP_PAIRS_NAME},"
            f"shortlist_pretrained={CLIP_PAIRS_WEIGHTS},shortlist_k={k}")
    args = ("--task", "zeroshot_retrieval", "--model", "diffusion_pairs", "--pretrained", "default",
            "--dataset", "wds/fashion_pairs_retrieval", "--dataset_root", str(data), "--recall_k", "1", "2",
            "--batch_size", "3", "--output", "{dataset}_{model}_{pretrained}.json")
    proc = clip_benchmark_eval(*args, cwd=tmp_path, env={OPTIONS_ENV: opts})
    assert proc.returncode == 0, proc.stderr[-3000:]
    (out,) = tmp_path.glob("fashion_pairs_retrieval_diffusion_pairs+hybrid-*@top2_default.json")
    res = json.loads(out.read_text())
    label = f"hybrid:{CLIP_PAIRS_NAME}/{CLIP_PAIRS_WEIGHTS}@top{k}"
    assert res["task"] == "zeroshot_retrieval" and res["model"] == f"diffusion_pairs+{label}"
    meta = res["diffusion_classifier"]["retrieval"]
    assert res["diffusion_classifier"]["hybrid"] == label
    assert (meta["k"], meta["images"], meta["texts"], meta["normalisation"]) == (k, n, 5 * n, "difference")
    m = res["metrics"]

    # The expected rankings, from CLIP's scores and the pair errors the run stored (read here: no call runs).
    monkeypatch.setenv(OPTIONS_ENV, opts)
    ensure_installed()
    from clip_benchmark.models import load_clip

    model, transform, _ = load_clip("open_clip", "diffusion_pairs", "default", None, "cpu")
    model.attach_store(ScoreStore(tmp_path / STORE))
    items = list(build_dataset(dataset_name="wds/fashion_pairs_retrieval", root=str(data), transform=transform,
                               split="test", download=False, task="zeroshot_retrieval"))
    images = torch.stack([img for img, _ in items])
    texts = [t for _, captions in items for t in captions]
    owner = torch.arange(n).repeat_interleave(5)
    shortlister = model.shortlist.load(model.options)
    clip = shortlister.text_embeddings(texts) @ shortlister.image_embeddings(images).T          # (40, 8)
    image_sl = top_k_mask(clip, k, dim=1)                                        # each text's k images
    text_sl = top_k_mask(clip, k, dim=0)                                         # each image's k texts
    scored = image_sl | text_sl
    found = pair_errors(model, images, texts, scored.T)
    assert (found.run_calls, found.reused_pairs) == (0, int(scored.sum()) + n)
    diffusion = -(found.errors - found.unconditional[:, None]).T                     # the difference normalisation
    text_top1 = [_by_keys(image_sl[j], diffusion[j], clip[j])[0] for j in range(5 * n)]
    image_top1 = [_by_keys(text_sl[:, i], diffusion[:, i], clip[:, i])[0] for i in range(n)]
    assert m["image_retrieval_recall@1"] == pytest.approx(sum(text_top1[j] == owner[j] for j in range(5 * n)) / (5 * n))
    assert m["text_retrieval_recall@1"] == pytest.approx(sum(owner[image_top1[i]] == i for i in range(n)) / n)
    # The rerank changed the shortlister's ranking: some queries' first answer is not CLIP's.
    assert text_top1 != clip.argmax(1).tolist() and image_top1 != clip.argmax(0).tolist()
    # Reranking within the top k leaves recall@k the shortlister's: the ceiling.
    shortlist_image = float(image_sl[torch.arange(5 * n), owner].float().mean())
    shortlist_text = sum(bool(text_sl[owner == i, i].any()) for i in range(n)) / n
    assert m["shortlist_image_retrieval_recall@2"] == pytest.approx(shortlist_image) == m["image_retrieval_recall@2"]
    assert m["shortlist_text_retrieval_recall@2"] == pytest.approx(shortlist_text) == m["text_retrieval_recall@2"]
    assert m["denoiser_calls_per_query"] == pytest.approx((int(scored.sum()) + n) * samples / (n + 5 * n))
    model.close_store()

    # Run again: every pair comes from the score store, and the result is the same.
    again = clip_benchmark_eval(*args, cwd=tmp_path, env={OPTIONS_ENV: opts})
    assert again.returncode == 0, again.stderr[-3000:]
    pairs = int(scored.sum()) + n
    assert re.search(rf"{pairs} of {pairs} \(image, text\) pairs from the score store .*; 0 denoiser calls run",
                     again.stderr)
    assert json.loads(out.read_text())["metrics"] == m


@pytest.mark.slow
@pytest.mark.skipif(not CLIP_PAIRS_WEIGHTS.is_file(), reason="the trained CLIP pair model is not shipped")
def test_retrieval_under_torchrun_splits_the_pairs_and_matches_one_process(tmp_path):
    """Two torchrun ranks score the shortlisted pairs between them (each rank runs calls) and write the
    metrics one process writes; together they run exactly one process's denoiser calls."""
    import subprocess
    import sys

    from cli_helpers import BIN, free_port, subprocess_env
    from clip_benchmark_diffusion.options import OPTIONS_ENV

    data = _slice(8, tmp_path / "data")
    opts = (f"min_samples=2,max_samples=2,shortlist_model={CLIP_PAIRS_NAME},"
            f"shortlist_pretrained={CLIP_PAIRS_WEIGHTS},shortlist_k=2")

    def args(out: str) -> list[str]:
        return ["--task", "zeroshot_retrieval", "--model", "diffusion_pairs", "--pretrained", "default",
                "--dataset", "wds/fashion_pairs_retrieval", "--dataset_root", str(data), "--recall_k", "1", "2",
                "--batch_size", "3", "--num_workers", "0", "--output", out]

    one = clip_benchmark_eval(*args(str(tmp_path / "one.json")), cwd=tmp_path,
                              env={OPTIONS_ENV: opts, "CLIP_BENCHMARK_DIFFUSION_STORE": "off"})
    assert one.returncode == 0, one.stderr[-3000:]
    env = subprocess_env({OPTIONS_ENV: opts, "CLIP_BENCHMARK_DIFFUSION_STORE": str(tmp_path / "two.sqlite")})
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(free_port()), str(BIN / "clip_benchmark"), "eval", *args(str(tmp_path / "two.json"))],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert two.returncode == 0, two.stderr[-4000:]
    a, b = (json.loads((tmp_path / f"{name}.json").read_text()) for name in ("one", "two"))
    assert a["metrics"] == b["metrics"]
    single = int(re.search(r"; (\d+) denoiser calls run on rank 0", one.stderr).group(1))
    calls = {int(rank): int(n) for n, rank in re.findall(r"; (\d+) denoiser calls run on rank (\d+)", two.stderr)}
    assert set(calls) == {0, 1} and all(c > 0 for c in calls.values()), two.stderr[-2000:]
    assert sum(calls.values()) == single > 0


@pytest.mark.slow
@pytest.mark.skipif(not CLIP_PAIRS_WEIGHTS.is_file(), reason="the trained CLIP pair model is not shipped")
def test_two_identical_retrieval_commands_on_one_store_split_the_pairs(tmp_path):
    """Started together on one store, two retrieval commands lease each image's pairs (as classification
    leases images): together they run exactly one clean run's denoiser calls and write its metrics."""
    import subprocess

    from cli_helpers import BIN, subprocess_env
    from clip_benchmark_diffusion.options import OPTIONS_ENV

    data = _slice(8, tmp_path / "data")
    opts = (f"min_samples=2,max_samples=2,shortlist_model={CLIP_PAIRS_NAME},"
            f"shortlist_pretrained={CLIP_PAIRS_WEIGHTS},shortlist_k=2")

    def args(out: str) -> list[str]:
        return ["eval", "--task", "zeroshot_retrieval", "--model", "diffusion_pairs", "--pretrained", "default",
                "--dataset", "wds/fashion_pairs_retrieval", "--dataset_root", str(data), "--recall_k", "1", "2",
                "--batch_size", "3", "--num_workers", "0", "--output", out]

    clean = clip_benchmark_eval(*args(str(tmp_path / "clean.json"))[1:], cwd=tmp_path,
                                env={OPTIONS_ENV: opts, "CLIP_BENCHMARK_DIFFUSION_STORE": "off"})
    assert clean.returncode == 0, clean.stderr[-3000:]
    single = int(re.search(r"; (\d+) denoiser calls run on rank 0", clean.stderr).group(1))
    env = subprocess_env({OPTIONS_ENV: opts, "CLIP_BENCHMARK_DIFFUSION_STORE": str(tmp_path / "shared.sqlite")})
    procs = [subprocess.Popen([str(BIN / "clip_benchmark"), *args(str(tmp_path / f"run{i}.json"))], cwd=tmp_path,
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for i in range(2)]
    errs = [p.communicate(timeout=900)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    calls = [int(re.search(r"; (\d+) denoiser calls run on rank 0", e).group(1)) for e in errs]
    assert sum(calls) == single > 0, calls                                   # no pair scored twice
    clean_metrics = json.loads((tmp_path / "clean.json").read_text())["metrics"]
    for i in range(2):
        assert json.loads((tmp_path / f"run{i}.json").read_text())["metrics"] == clean_metrics
