"""Caption selection, any model: the per-instance verdicts clip_benchmark computes but only averages.

With ``CLIP_BENCHMARK_DIFFUSION_DUMP_PREDICTIONS`` set, the integration runs clip_benchmark's own
image-caption selection through :func:`evaluate_recording_instances`, which keeps each batch's
embeddings, replays clip_benchmark's decision per instance on the same tensors, and refuses to
write them unless their mean is clip_benchmark's ``acc``. The lifecycle writes them into the
predictions file (a ``correct`` field per instance), so probes can be compared pairwise.
"""
from __future__ import annotations

from typing import Any, Callable

from clip_benchmark_diffusion.integration.lifecycle import current_run


class _InstanceRecorder:
    """Caption selection, any model: keep each batch's embeddings and shape, so that the verdict
    clip_benchmark reaches on each instance (it keeps only the means) can be written per instance."""

    def __init__(self, loader: Any, model: Any) -> None:
        self.loader, self.model = loader, model
        self.shapes: list[tuple[int, int, int]] = []
        self.images: list[Any] = []
        self.texts: list[Any] = []

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for images, texts in self.loader:
            self.shapes.append((len(texts), 1 if images.dim() == 4 else images.shape[1], len(texts[0])))
            yield images, texts

    def wrap(self, name: str, store: list[Any]) -> Callable[..., Any]:
        method = getattr(self.model, name)

        def recording(*a: Any, **kw: Any) -> Any:
            out = method(*a, **kw)
            store.append(out.detach())
            return out
        return recording

    def instances(self) -> tuple[list[bool], list[list[int]]]:
        """Per instance: clip_benchmark's verdict (its code, replayed on the same tensors) and the
        captions ranked for the first image."""
        import torch
        import torch.nn.functional as F

        verdicts: list[bool] = []
        rankings: list[list[int]] = []
        for (B, nim, nt), img, txt in zip(self.shapes, self.images, self.texts, strict=True):
            img, txt = F.normalize(img, dim=-1).view(B, nim, -1), F.normalize(txt, dim=-1).view(B, nt, -1)
            gt = torch.arange(min(nim, nt), device=img.device)
            for i in range(B):
                scores = img[i] @ txt[i].t()
                text_ok = (scores.argmax(dim=1)[:len(gt)] == gt).all().item()
                image_ok = (scores.argmax(dim=0)[:len(gt)] == gt).all().item()
                verdicts.append(bool(text_ok and image_ok))
                rankings.append(scores[0].float().argsort(descending=True).tolist()[:5])
        return verdicts, rankings


def evaluate_recording_instances(original: Callable[..., Any], model: Any, dataloader: Any, *args: Any,
                                  **kwargs: Any) -> Any:
    """Run clip_benchmark's caption selection and keep its per-instance verdicts for the predictions file."""
    recorder = _InstanceRecorder(dataloader, model)
    model.encode_image = recorder.wrap("encode_image", recorder.images)  # instance attributes, removed below
    model.encode_text = recorder.wrap("encode_text", recorder.texts)
    try:
        metrics = original(model, recorder, *args, **kwargs)
    finally:
        del model.encode_image, model.encode_text
    verdicts, rankings = recorder.instances()
    if abs(sum(verdicts) / max(1, len(verdicts)) - metrics["acc"]) > 1e-6:
        raise RuntimeError(f"per-instance verdicts ({sum(verdicts)}/{len(verdicts)}) disagree with clip_benchmark's "
                           f"acc {metrics['acc']}; not writing predictions")
    state = current_run()
    if state is not None:
        state.caption_predictions = (verdicts, rankings)
    return metrics
