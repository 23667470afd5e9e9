"""The progress display: a tqdm bar on a terminal, plain lines in a log."""
from __future__ import annotations

import io

from clip_benchmark_diffusion.progress import LogProgress, progress_bar


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_log_lines_every_n_images_or_seconds_and_at_the_end():
    out, clock = io.StringIO(), _Clock()
    bar = LogProgress(250, "diffusion scoring", "img", out, every=100, seconds=30.0, clock=clock)
    for _ in range(25):                  # 10 images a second: the 100-image rule fires first
        clock.now += 1.0
        bar.set_postfix(calls_per_img="207", refresh=False)
        bar.update(10)
    assert out.getvalue().splitlines() == [
        "diffusion scoring: 100/250 img (40%), 10.00 img/s, calls_per_img=207",
        "diffusion scoring: 200/250 img (80%), 10.00 img/s, calls_per_img=207",
        "diffusion scoring: 250/250 img (100%), 10.00 img/s, calls_per_img=207",
    ]
    assert "\r" not in out.getvalue()
    slow = LogProgress(None, "x", "img", out := io.StringIO(), every=100, seconds=30.0, clock=clock)
    for _ in range(3):                   # 1 image every 20 s: the 30-second rule fires
        clock.now += 20.0
        slow.update(1)
    slow.close()
    assert [line.split(",")[0] for line in out.getvalue().splitlines()] == ["x: 2 img", "x: 3 img"]


def test_a_terminal_gets_a_tqdm_bar():
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert type(progress_bar(10, "x", stream=io.StringIO())) is LogProgress
    assert type(progress_bar(10, "x", stream=Tty())).__module__.startswith("tqdm")


def _logged_lines(tiny_sd, tmp_path, **options) -> list[str]:
    """The log lines of one 2-image batch of a 2-class task, with a line at every heartbeat."""
    import torch
    from clip_benchmark.metrics import zeroshot_classification as zc

    from cli_helpers import quick_options
    from tiny_models import load_tiny_classifier

    opts = quick_options(tmp_path, batch_size=4, **options)
    model, _, tokenizer = load_tiny_classifier(tiny_sd, opts)
    model.begin_task("zeroshot_classification", expected_images=2)
    model.account.bar = LogProgress(2, "diffusion scoring", "img", out := io.StringIO(), seconds=0.0)  # a line per heartbeat
    clf = zc.zero_shot_classifier(model, tokenizer, ["zero", "one"], ["a {c}"], "cpu")
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    zc.run_classification(model, clf, [(images, torch.tensor([0, 1]))], "cpu")
    return out.getvalue().splitlines()


def test_a_long_first_batch_still_logs_its_calls(tiny_sd, tmp_path):
    # Many classes: no image of the first batch is decided for a long time. The log still gets a line
    # per LOG_EVERY_SECONDS (here every denoiser batch) with the denoiser calls so far, before the first image.
    lines = _logged_lines(tiny_sd, tmp_path, strategy="staged", n_samples=[2, 4], to_keep=[2, 1])
    # stage 1: 2 images x 2 classes x 2 samples = 8 calls in denoiser batches of 4, no image decided
    assert lines[0].startswith("diffusion scoring: 0/2 img (0%)") and "calls=4," in lines[0], lines
    assert "calls=8, cands_left" in lines[1], lines
    assert lines[-1].startswith("diffusion scoring: 2/2 img (100%)") and "calls_per_img=8," in lines[-1], lines


def test_a_full_strategy_batch_logs_every_denoiser_batch(tiny_sd, tmp_path):
    # strategy full decides everything in one round: the heartbeat must not wait for the round's end
    lines = _logged_lines(tiny_sd, tmp_path, strategy="full", n_samples=[4])
    before_first = [line for line in lines if "calls_per_img" not in line]
    # 2 images x 2 classes x 4 samples = 16 calls in 4 denoiser batches, each one line
    assert [line.split("calls=")[1].split(",")[0] for line in before_first] == ["4", "8", "12", "16"], lines


def test_calls_per_image_counts_only_decided_images():
    # 3 images decided with 8 calls each while 9,000 calls ran for images still in flight: the per-image
    # figure is 8 (it was 9024 / 3), and the calls so far are shown as such
    from clip_benchmark_diffusion.adapter.run_account import heartbeat_postfix
    from clip_benchmark_diffusion.scoring.engine import EngineStats

    assert heartbeat_postfix(EngineStats(denoiser_calls=9024)) == {"calls": 9024}
    assert heartbeat_postfix(EngineStats(denoiser_calls=9024, images=3, decided_calls=24)) == \
        {"calls": 9024, "calls_per_img": "8"}


def test_no_progress_display_when_the_caller_has_its_own(tiny_sd, tmp_path, capsys):
    """begin_task(progress=False): no bar at all, while the images are still counted in the run's records."""
    import torch
    from clip_benchmark.metrics import zeroshot_classification as zc

    from cli_helpers import quick_options
    from tiny_models import load_tiny_classifier

    model, _, tokenizer = load_tiny_classifier(tiny_sd, quick_options(tmp_path, batch_size=4))
    model.begin_task("zeroshot_classification", expected_images=2, progress=False)
    assert model.account.bar is None
    clf = zc.zero_shot_classifier(model, tokenizer, ["zero", "one"], ["a {c}"], "cpu")
    capsys.readouterr()
    zc.run_classification(model, clf, [(torch.rand(2, 3, 32, 32) * 2 - 1, torch.tensor([0, 1]))], "cpu")
    assert "diffusion scoring" not in capsys.readouterr().err
    assert len(model.image_calls()) == 2
