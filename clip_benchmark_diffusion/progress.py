"""A progress display that reads well in a terminal and in a log file.

On a terminal it is a tqdm bar. When stderr is not a terminal (a log file, a pipe, a batch job),
tqdm's carriage-return redraws would fill the log with one long line of bars, so instead one
plain line is written every ``every`` images or ``seconds``, whichever comes first, and one at
the end.
"""
from __future__ import annotations

import sys
import time
from typing import Any, Protocol, TextIO

LOG_EVERY_IMAGES = 100
LOG_EVERY_SECONDS = 30.0


class Progress(Protocol):
    def update(self, n: int = 1) -> Any: ...
    def set_postfix(self, refresh: bool = True, **values: Any) -> Any: ...
    def close(self) -> Any: ...


def progress_bar(total: int | None, desc: str, unit: str = "img", stream: TextIO | None = None) -> Progress:
    """tqdm on a terminal, :class:`LogProgress` elsewhere."""
    stream = sys.stderr if stream is None else stream
    if getattr(stream, "isatty", lambda: False)():
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit=unit, leave=False, file=stream)
    return LogProgress(total, desc, unit, stream)


class LogProgress:
    """One line per ``every`` items or ``seconds``: ``desc: 300/1000 img (30%), 2.1 img/s, key=value``."""

    def __init__(self, total: int | None, desc: str, unit: str, stream: TextIO,
                 every: int = LOG_EVERY_IMAGES, seconds: float = LOG_EVERY_SECONDS,
                 clock: Any = time.monotonic) -> None:
        self.total, self.desc, self.unit, self.stream = total, desc, unit, stream
        self.every, self.seconds, self.clock = every, seconds, clock
        self.n, self.postfix = 0, ""
        self.start = self.last_time = clock()
        self.last_n = 0
        self.closed = False

    def update(self, n: int = 1) -> None:
        self.n += n
        finished = self.total is not None and self.n >= self.total
        if finished or self.n - self.last_n >= self.every or self.clock() - self.last_time >= self.seconds:
            self._line()

    def set_postfix(self, refresh: bool = True, **values: Any) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        if not self.closed and self.n != self.last_n:
            self._line()
        self.closed = True

    def _line(self) -> None:
        now = self.clock()
        done = f"{self.n}/{self.total}" if self.total else str(self.n)
        share = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        rate = self.n / max(now - self.start, 1e-9)
        extra = f", {self.postfix}" if self.postfix else ""
        # one write per line: under torchrun the ranks share stderr
        self.stream.write(f"{self.desc}: {done} {self.unit}{share}, {rate:.2f} {self.unit}/s{extra}\n")
        self.stream.flush()
        self.last_n, self.last_time = self.n, now
