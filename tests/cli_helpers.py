"""Run the real console commands in a subprocess, as a user would."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

BIN = Path(sys.executable).parent
SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def subprocess_env(extra: dict | None = None) -> dict:
    """The environment of every command a test starts: one thread, offline, plus ``extra``."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **(extra or {})}


def console(name: str, *args: str, cwd: Path, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    exe = shutil.which(name, path=str(BIN)) or name
    return subprocess.run([exe, *args], cwd=cwd, env=subprocess_env(env), capture_output=True, text=True,
                          timeout=timeout)


def load_script(name: str):
    """Import scripts/<name>.py as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"_script_{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def clip_benchmark_eval(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return console("clip_benchmark", "eval", "--num_workers", "0", *args, cwd=cwd, env=env)


def quick_options(folder: Path, **fields) -> Path:
    """A JSON scoring-options file for short test runs."""
    path = folder / "quick.json"
    path.write_text(json.dumps({"strategy": "ttest", "min_samples": 3, "max_samples": 6, "p_value": 0.1,
                                "batch_size": 32, **fields}))
    return path


def assert_clean_failure(proc: subprocess.CompletedProcess, *needles: str, cwd: Path | None = None) -> str:
    """A user mistake: non-zero exit, no traceback, our one-line message last on stderr (containing
    ``needles``), and, given ``cwd``, no result or partial file left there. Returns that line."""
    assert proc.returncode != 0
    err = proc.stderr.strip().splitlines()
    last = err[-1] if err else ""
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert last.startswith("clip_benchmark_diffusion: "), proc.stderr[-2000:]
    for needle in needles:
        assert needle in last, last
    if cwd is not None:
        assert not list(cwd.glob("digits*.json")) and not list(cwd.glob(".*partial"))
    return last


def free_port() -> int:
    """A TCP port nothing listens on now, for a torchrun rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class InProcessEval:
    """``clip_benchmark eval ...`` through the patched ``cli.main`` in this process, captured like a
    subprocess: what the console script runs, without a new interpreter (the ``inproc`` fixture)."""

    def __init__(self, capsys, monkeypatch) -> None:
        self.capsys, self.monkeypatch = capsys, monkeypatch

    def __call__(self, *args: str, cwd, env=None) -> subprocess.CompletedProcess:
        from clip_benchmark_diffusion.integration.clip_benchmark import ensure_installed

        ensure_installed()
        import clip_benchmark.cli as cli

        self.monkeypatch.chdir(cwd)
        for key, value in (env or {}).items():
            self.monkeypatch.setenv(key, value)
        self.monkeypatch.setattr(sys, "argv", ["clip_benchmark", "eval", "--num_workers", "0", *args])
        self.capsys.readouterr()
        code = cli.main()
        out, err = self.capsys.readouterr()
        return subprocess.CompletedProcess(args, code or 0, out, err)
