"""The exception types for user mistakes: printed as one line, never a traceback."""
from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix; the message says what failed and what to do."""

    exit_code = 2

    def __str__(self) -> str:
        return f"clip_benchmark_diffusion: {self.args[0]}"


class Interrupted(UserError):
    """Ctrl-C: one line on what was kept, and the shell's exit code for SIGINT."""

    exit_code = 130


def stderr_note(text: str) -> None:
    """One note line on stderr, in a single write (ranks under torchrun share stderr)."""
    import sys

    sys.stderr.write(f"clip_benchmark_diffusion: note: {text}\n")
    sys.stderr.flush()
