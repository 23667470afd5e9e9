"""Shared fixtures: tiny SD-format pipelines and a local webdataset of real digits."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
# The training scripts' helpers (tiny_training, pair_training) live beside the scripts, apart from the library.
sys.path.insert(1, str(Path(__file__).resolve().parents[1] / "scripts"))

# Tiny models run fastest on one thread, and a second process beside the tests (a training run)
# makes multi-threaded CPU kernels stall; subprocesses inherit this too.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(1)

from cli_helpers import InProcessEval  # noqa: E402
from tiny_models import save_tiny_sd  # noqa: E402
from wds_data import write_digits_wds  # noqa: E402


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory) -> Path:
    """A tiny epsilon-prediction Stable Diffusion folder."""
    return save_tiny_sd(tmp_path_factory.mktemp("tiny_sd") / "model")


@pytest.fixture(scope="session")
def digits_wds(tmp_path_factory) -> Path:
    """20 real scikit-learn digits (2 per class) as a clip_benchmark webdataset folder."""
    return write_digits_wds(tmp_path_factory.mktemp("wds") / "digits", per_class=2)


@pytest.fixture
def inproc(capsys, monkeypatch) -> InProcessEval:
    """Run ``clip_benchmark eval ...`` in this process (see :class:`cli_helpers.InProcessEval`)."""
    return InProcessEval(capsys, monkeypatch)
