"""No lost work and scale-out: SIGKILL + resume, free re-runs, torchrun across 2 processes, two
commands sharing one store, SIGTERM + resume.

All but the shared-store split are slow (several console runs each); the default suite keeps one
fast path per feature: resume after a stop mid-run in tests/test_mistakes.py (in-process), an
interrupt saving the images in flight in tests/test_checkpoints.py, torchrun in
tests/test_distributed.py, and the shared-store split here.
"""
from __future__ import annotations

import json
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cli_helpers import BIN, clip_benchmark_eval, free_port, load_script, quick_options, subprocess_env

TIMING = ("seconds_per_image",)  # measured wall time: the one field two runs cannot share


def _args(opts: Path, tiny_sd: Path, wds: Path, out: Path) -> list[str]:
    return ["--model", f"diffusion_sd2@{opts}", "--pretrained", str(tiny_sd), "--dataset", "wds/digits",
            "--dataset_root", str(wds), "--batch_size", "4", "--output", str(out)]


def _without_timing(result: dict) -> dict:
    result = json.loads(json.dumps(result))
    for key in TIMING:
        result["metrics"].pop(key)
    # the process's peak memory is a measurement, as the timings are
    result.get("diffusion_classifier", {}).get("memory", {}).pop("peak_bytes", None)
    return result


def _rows(db: Path) -> int:
    try:
        with sqlite3.connect(db, timeout=30) as conn:
            return conn.execute("SELECT COUNT(*) FROM scores").fetchone()[0]
    except sqlite3.Error:
        return 0


@pytest.mark.slow
def test_sigkill_then_resume_computes_only_what_is_missing(tiny_sd, digits_wds, tmp_path):
    opts = quick_options(tmp_path, strategy="full", n_samples=[12], batch_size=16)
    run_dir, ref_dir = tmp_path / "run", tmp_path / "ref"
    run_dir.mkdir(), ref_dir.mkdir()
    out = run_dir / "result.json"
    db = run_dir / "clip_benchmark_diffusion_scores.sqlite"
    env = subprocess_env()
    proc = subprocess.Popen([str(BIN / "clip_benchmark"), "eval", "--num_workers", "0",
                             *_args(opts, tiny_sd, digits_wds, out)], cwd=run_dir, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while _rows(db) < 6 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    stored = _rows(db)
    assert 6 <= stored < 20, f"killed too late or too early: {stored} of 20 images stored"
    assert not out.exists()

    resumed = clip_benchmark_eval(*_args(opts, tiny_sd, digits_wds, out), cwd=run_dir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    report = resumed.stderr.strip().splitlines()[-1]
    assert f"{stored} of 20 images from the score store" in report
    per_image = 10 * 2 * 12
    # only what neither the stored images nor the checkpoints of the images in flight hold
    ran = int(re.search(r"; (\d+) denoiser calls run", report).group(1))
    assert 0 < ran <= (20 - stored) * per_image

    again = clip_benchmark_eval(*_args(opts, tiny_sd, digits_wds, out), cwd=run_dir)
    assert "20 of 20 images from the score store" in again.stderr and "; 0 denoiser calls run" in again.stderr
    ref = clip_benchmark_eval(*_args(opts, tiny_sd, digits_wds, ref_dir / "result.json"), cwd=ref_dir,
                              env={"CLIP_BENCHMARK_DIFFUSION_STORE": "off"})
    assert ref.returncode == 0, ref.stderr[-3000:]
    resumed_json = json.loads(out.read_text())
    reference = json.loads((ref_dir / "result.json").read_text())
    assert _without_timing(resumed_json) == _without_timing(reference)
    assert resumed_json["metrics"]["denoiser_calls_per_image"] == per_image
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


@pytest.mark.slow
def test_second_run_is_free_and_writes_the_same_json(tiny_sd, digits_wds, tmp_path):
    opts = quick_options(tmp_path)
    out = tmp_path / "r.json"
    first = clip_benchmark_eval(*_args(opts, tiny_sd, digits_wds, out), cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    text = out.read_text()
    second = clip_benchmark_eval(*_args(opts, tiny_sd, digits_wds, out), cwd=tmp_path)
    assert "20 of 20 images from the score store" in second.stderr and "; 0 denoiser calls run" in second.stderr
    assert out.read_text() == text


@pytest.mark.slow
def test_torchrun_two_processes_match_one(tiny_sd, digits_wds, tmp_path):
    opts = quick_options(tmp_path, strategy="ttest", min_samples=3, max_samples=10, p_value=0.2)
    one = clip_benchmark_eval(*_args(opts, tiny_sd, digits_wds, tmp_path / "one.json"), cwd=tmp_path,
                              env={"CLIP_BENCHMARK_DIFFUSION_STORE": "off"})
    assert one.returncode == 0, one.stderr[-2000:]
    env = subprocess_env({"CLIP_BENCHMARK_DIFFUSION_STORE": str(tmp_path / "two.sqlite")})
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(free_port()), str(BIN / "clip_benchmark"), "eval", "--num_workers", "0",
                          *_args(opts, tiny_sd, digits_wds, tmp_path / "two.json")],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-4000:]
    a = json.loads((tmp_path / "one.json").read_text())
    b = json.loads((tmp_path / "two.json").read_text())
    assert _without_timing(a) == _without_timing(b)
    # Both ranks scored: the work was split, not duplicated.
    # Parsed from the whole stream, not line by line: the ranks share one stderr pipe.
    reports = re.findall(r"; (\d+) denoiser calls run on rank (\d+)", two.stderr)
    calls = {int(rank): int(n) for n, rank in reports}
    assert set(calls) == {0, 1} and all(c > 0 for c in calls.values())
    assert sum(calls.values()) == round(a["metrics"]["denoiser_calls_per_image"] * 20)


def test_two_identical_commands_on_one_store_split_the_images(tiny_sd, digits_wds, tmp_path):
    """Started together on one store, two commands score each image once between them and write the
    same result; together they run exactly the denoiser calls of one clean run."""
    opts = quick_options(tmp_path)
    clean = clip_benchmark_eval(*_args(opts, tiny_sd, digits_wds, tmp_path / "clean.json"), cwd=tmp_path,
                                env={"CLIP_BENCHMARK_DIFFUSION_STORE": "off"})
    assert clean.returncode == 0, clean.stderr[-2000:]
    store = {"CLIP_BENCHMARK_DIFFUSION_STORE": str(tmp_path / "shared.sqlite")}
    procs = [subprocess.Popen([str(BIN / "clip_benchmark"), "eval", "--num_workers", "0",
                               *_args(opts, tiny_sd, digits_wds, tmp_path / f"run{i}.json")], cwd=tmp_path,
                              env=subprocess_env(store), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    errs = [p.communicate(timeout=600)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    calls = [int(re.search(r"(\d+) denoiser calls run", e).group(1)) for e in errs]
    reference = json.loads((tmp_path / "clean.json").read_text())["metrics"]
    assert sum(calls) == round(reference["denoiser_calls_per_image"] * 20)          # no image scored twice
    for i in range(2):
        assert _without_timing(json.loads((tmp_path / f"run{i}.json").read_text()))["metrics"] == \
            _without_timing(json.loads((tmp_path / "clean.json").read_text()))["metrics"]


def _counted_eval(args: list[str], cwd: Path, counter: Path, env: dict | None = None) -> subprocess.Popen:
    """``clip_benchmark eval`` with every UNet forward's batch size appended to ``counter`` (it survives a kill)."""
    child = load_script("measure_kill_loss")
    return subprocess.Popen([sys.executable, "-c", child.CHILD, "eval", "--num_workers", "0", *args], cwd=cwd,
                            env=subprocess_env({child.COUNTER_ENV: str(counter), **(env or {})}),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _calls(counter: Path) -> int:
    return sum(int(n) for n in counter.read_text().split()) if counter.exists() else 0


@pytest.mark.slow
def test_sigterm_mid_batch_keeps_the_work_in_flight_and_resumes_to_the_same_json(tiny_sd, digits_wds, tmp_path):
    """SIGTERM (SLURM preemption) mid-batch: the images in flight are checkpointed, one line, exit 143; the
    resumed run computes only the rest, so both runs together cost a clean run's calls (within one
    denoiser batch: the one computing when the signal came) and write the clean run's JSON."""
    batch = 16
    opts = quick_options(tmp_path, strategy="full", n_samples=[6], batch_size=batch)
    run_dir, ref_dir = tmp_path / "run", tmp_path / "ref"
    run_dir.mkdir(), ref_dir.mkdir()
    out = run_dir / "result.json"
    clean = _counted_eval(_args(opts, tiny_sd, digits_wds, ref_dir / "result.json"), ref_dir, tmp_path / "clean.count",
                          env={"CLIP_BENCHMARK_DIFFUSION_STORE": "off"})
    assert clean.wait(timeout=600) == 0, clean.stderr.read()[-3000:]
    clean_calls = _calls(tmp_path / "clean.count")
    per_batch = 4 * 10 * 2 * 6       # dataloader batch 4 x 10 classes x 2 templates x 6 samples

    first = _counted_eval(_args(opts, tiny_sd, digits_wds, out), run_dir, tmp_path / "first.count")
    deadline = time.time() + 300
    # in the middle of the third dataloader batch: half its work is in flight, none of it decided
    while _calls(tmp_path / "first.count") < 2.5 * per_batch and first.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    first.send_signal(signal.SIGTERM)
    err = first.communicate(timeout=120)[1]
    assert first.returncode == 143, err[-3000:]
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith(
        "clip_benchmark_diffusion: terminated (SIGTERM); every image finished so far is kept"), err[-3000:]
    assert not out.exists()
    assert _calls(tmp_path / "first.count") < 3 * per_batch, "the signal came too late to test anything"

    second = _counted_eval(_args(opts, tiny_sd, digits_wds, out), run_dir, tmp_path / "second.count")
    assert second.wait(timeout=600) == 0, second.stderr.read()[-3000:]
    lost = _calls(tmp_path / "first.count") + _calls(tmp_path / "second.count") - clean_calls
    assert 0 <= lost <= batch, f"{lost} denoiser calls computed twice"
    assert _without_timing(json.loads(out.read_text())) == \
        _without_timing(json.loads((ref_dir / "result.json").read_text()))
    db = run_dir / "clip_benchmark_diffusion_scores.sqlite"
    with sqlite3.connect(db) as conn:   # no checkpoint of a finished image is left behind
        assert conn.execute("SELECT COUNT(*) FROM partial_parts").fetchone()[0] == 0
