"""The typed seams around the classifier: what it asks of the results package, and what the
integration (lifecycle, clip_benchmark patches) and scripts may call on it.

Structural types only, so the classifier needs no import of the store, the leases or the process
group, and the integration none of the classifier's module.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol

if TYPE_CHECKING:
    import torch

    from clip_benchmark_diffusion.scoring.engine import Checkpoints


class ScoreRequest(Protocol):
    """Images of a batch to score here (``results.fetch.ScoreRequest``)."""

    indices: list[int]
    checkpoints: "Checkpoints | None"
    save: Callable[[int, dict], None]


class Fetched(Protocol):
    """A batch's payloads and where they came from (``results.fetch.Fetched``)."""

    payloads: dict[int, dict]
    reused: int
    scored: int


class ResultSource(Protocol):
    """Where results come from and go to (``results.fetch.RunResults``)."""

    @property
    def store_path(self) -> Path | None: ...

    def attach(self, store: Any) -> None: ...

    def fetch_or_score(self, keys: list[str], score_fn: Callable[[ScoreRequest], None]) -> Fetched: ...

    def leave(self) -> None: ...

    def close(self) -> None: ...


class DiffusionRunModel(Protocol):
    """What the integration calls on the model the loader returns, besides clip_benchmark's own
    ``encode_text`` / ``encode_image``."""

    is_diffusion_classifier: bool
    rank: int
    pair_errors: "list[torch.Tensor]"
    unconditional_errors: "list[torch.Tensor]"

    def attach_store(self, store: Any) -> None: ...

    def begin_task(self, task: str, expected_images: int | None = None, classnames: list[str] | None = None,
                   templates: list[str] | dict[str, list[str]] | None = None, progress: bool = True) -> None: ...

    def set_batch_structure(self, instances: int, images_per_instance: int, texts_per_instance: int) -> None: ...

    def classification_logits(self, logits: "torch.Tensor") -> "torch.Tensor": ...

    def prediction_histogram(self, logits: "torch.Tensor", target: "torch.Tensor") -> dict: ...

    def shortlist_recall(self, target: "torch.Tensor") -> float | None: ...

    def image_calls(self) -> list[int]: ...

    def confidences(self) -> list[float | None]: ...

    def cost_summary(self) -> dict[str, float]: ...

    def result_metadata(self, model_type: str) -> dict: ...

    def weights_digest(self) -> str: ...

    def store_report(self) -> str: ...

    def close_store(self) -> None: ...
