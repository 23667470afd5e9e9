"""Run at interpreter start by ``clip_benchmark_diffusion.pth``: must stay tiny.

It installs a ``sys.meta_path`` finder that waits for clip_benchmark's modules to be imported and
then hands each to the integration module. Nothing else is imported here, so ``python -c pass``
pays only for this file and the list of watched module names. Set CLIP_BENCHMARK_DIFFUSION_DISABLE=1 to turn it off.
"""
import os
import sys

from clip_benchmark_diffusion._watched import WATCHED


class _PatchingLoader:
    """Delegates to the real loader, then lets the integration patch the fresh module."""

    def __init__(self, loader, name):
        self._loader, self._name = loader, name

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        from clip_benchmark_diffusion.integration.clip_benchmark import on_import

        on_import(self._name, module)

    def __getattr__(self, attr):
        return getattr(self._loader, attr)


def _interrupted(signum, frame):
    """SIGINT while the clip_benchmark command imports (seconds of torch and open_clip): the one line
    its patched ``main`` prints for Ctrl-C, and the shell's exit code, instead of a traceback."""
    sys.stderr.write("clip_benchmark_diffusion: interrupted\n")
    sys.stderr.flush()
    raise SystemExit(130)


def _is_clip_benchmark_command():
    """True in the stock ``clip_benchmark`` console script only (its name as pip writes it on any OS)."""
    name = os.path.basename(sys.argv[0]) if getattr(sys, "argv", None) else ""
    for suffix in ("-script.pyw", "-script.py", ".exe"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return name == "clip_benchmark"


def _quiet_interrupts_while_importing():
    """In the clip_benchmark command, until its patched ``main`` starts (which restores Python's own
    handler: a run turns KeyboardInterrupt into its one line). Every other program keeps its handler:
    this hook runs in every interpreter of the environment."""
    global _interrupts_checked
    if _interrupts_checked:
        return
    _interrupts_checked = True
    if not _is_clip_benchmark_command():
        return
    import signal
    import threading

    if threading.current_thread() is threading.main_thread() and \
            signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # never a handler the user set
        signal.signal(signal.SIGINT, _interrupted)


_interrupts_checked = False


class _Finder:
    def find_spec(self, fullname, path=None, target=None):
        if fullname == "clip_benchmark" or fullname in WATCHED:
            _quiet_interrupts_while_importing()
        if fullname not in WATCHED:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _PatchingLoader(spec.loader, fullname)
                return spec
        return None


def install():
    if os.environ.get("CLIP_BENCHMARK_DIFFUSION_DISABLE") or any(isinstance(f, _Finder) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _Finder())


install()
