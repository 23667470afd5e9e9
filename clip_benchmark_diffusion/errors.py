"""The one exception type for user mistakes: printed as one line, never a traceback."""
from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix; the message says what failed and what to do."""

    def __str__(self) -> str:
        return f"clip_benchmark_diffusion: {self.args[0]}"
