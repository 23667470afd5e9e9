"""Run at interpreter start by ``clip_benchmark_diffusion.pth``: must stay tiny.

It installs a ``sys.meta_path`` finder that waits for clip_benchmark's modules to be imported and
then hands each to the integration module. Nothing else is imported here, so ``python -c pass``
pays only for this file and the list of watched module names. Set CLIP_BENCHMARK_DIFFUSION_DISABLE=1 to turn it off.
"""
import os
import sys

from clip_benchmark_diffusion._interrupts import quiet_interrupts_while_importing
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


class _Finder:
    def find_spec(self, fullname, path=None, target=None):
        if fullname == "clip_benchmark" or fullname in WATCHED:
            quiet_interrupts_while_importing()
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
