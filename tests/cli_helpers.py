"""Run the real console commands in a subprocess, as a user would."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

BIN = Path(sys.executable).parent


def console(name: str, *args: str, cwd: Path, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    exe = shutil.which(name, path=str(BIN)) or name
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([exe, *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


def clip_benchmark_eval(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return console("clip_benchmark", "eval", "--num_workers", "0", *args, cwd=cwd, env=env)


def quick_options(folder: Path, **fields) -> Path:
    """A JSON scoring-options file for short test runs."""
    path = folder / "quick.json"
    path.write_text(json.dumps({"strategy": "ttest", "min_samples": 3, "max_samples": 6, "p_value": 0.1,
                                "batch_size": 32, **fields}))
    return path
