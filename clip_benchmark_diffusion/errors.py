"""The exception types for user mistakes: printed as one line, never a traceback."""
from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix; the message says what failed and what to do."""

    exit_code = 2

    def __str__(self) -> str:
        return f"clip_benchmark_diffusion: {self.args[0]}"


class Interrupted(UserError):
    """Ctrl-C or SIGTERM: one line on what was kept, and the shell's exit code for the signal."""

    exit_code = 130  # 128 + SIGINT

    def __init__(self, message: str, exit_code: int = 130) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class Terminated(KeyboardInterrupt):
    """SIGTERM (SLURM preemption, ``kill``), raised in the main thread by the command's handler so that
    it takes Ctrl-C's path: the engine saves the work of every image in flight, then one line."""

    exit_code = 143  # 128 + SIGTERM


def stderr_note(text: str) -> None:
    """One note line on stderr, in a single write (ranks under torchrun share stderr)."""
    import sys

    sys.stderr.write(f"clip_benchmark_diffusion: note: {text}\n")
    sys.stderr.flush()
