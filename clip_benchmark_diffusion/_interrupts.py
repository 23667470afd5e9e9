"""SIGINT while the stock ``clip_benchmark`` command imports its modules (seconds of torch and open_clip).

Imported by the start-up hook in every interpreter of the environment, so it imports nothing but
``os`` and ``sys`` and changes nothing outside the ``clip_benchmark`` console script.
"""
import os
import sys


def exit_interrupted(signum, frame):
    """SIGINT while the clip_benchmark command imports (seconds of torch and open_clip): the one line
    its patched ``main`` prints for Ctrl-C, and the shell's exit code, instead of a traceback."""
    sys.stderr.write("clip_benchmark_diffusion: interrupted\n")
    sys.stderr.flush()
    raise SystemExit(130)


def is_clip_benchmark_command() -> bool:
    """True in the stock ``clip_benchmark`` console script only (its name as pip writes it on any OS)."""
    name = os.path.basename(sys.argv[0]) if getattr(sys, "argv", None) else ""
    for suffix in ("-script.pyw", "-script.py", ".exe"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return name == "clip_benchmark"


def quiet_interrupts_while_importing() -> None:
    """In the clip_benchmark command, until its patched ``main`` starts (which restores Python's own
    handler: a run turns KeyboardInterrupt into its one line). Every other program keeps its handler:
    this hook runs in every interpreter of the environment."""
    global _interrupts_checked
    if _interrupts_checked:
        return
    _interrupts_checked = True
    if not is_clip_benchmark_command():
        return
    import signal
    import threading

    if threading.current_thread() is threading.main_thread() and \
            signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # never a handler the user set
        signal.signal(signal.SIGINT, exit_interrupted)


_interrupts_checked = False


def restore_interrupts() -> None:
    """Python's own SIGINT handler again once the command runs: the import-time one exits at once, but
    a run must see KeyboardInterrupt to say what it kept (``lifecycle.execute``)."""
    import signal

    if signal.getsignal(signal.SIGINT) is exit_interrupted:
        signal.signal(signal.SIGINT, signal.default_int_handler)
