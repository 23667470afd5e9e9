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
