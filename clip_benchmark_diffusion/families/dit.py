"""DiT: a class-conditional DiTTransformer2DModel on ImageNet label ids (no text), epsilon with learned sigma."""
from __future__ import annotations

from typing import Any

import torch

from clip_benchmark_diffusion.errors import UserError
from clip_benchmark_diffusion.families.base import Family
from clip_benchmark_diffusion.options import ScoringOptions
from clip_benchmark_diffusion.scoring.engine import Conditioning, Levels


class DiTFamily(Family):
    name = "dit"
    pipeline = "DiTPipeline"
    denoiser = "transformer"
    text = ()
    required = ("transformer", "vae", "scheduler")
    description = ("DiT: class-conditional DiTTransformer2DModel on ImageNet label ids (dataset class names "
                   "mapped by the pipeline's id2label); epsilon + learned sigma")

    def label_ids(self, pipe: Any) -> dict[str, int]:
        """Lower-cased ImageNet names -> label id, from the pipeline's own ``labels`` (every comma-separated
        synonym of model_index.json's ``id2label``)."""
        return {name.lower(): int(i) for name, i in pipe.labels.items()}

    def encode_classes(self, pipe: Any, classnames: list[str]) -> Conditioning:
        """One label id per class (exact, case-insensitive name match); any unmappable class is refused.

        clip_benchmark's ImageNet datasets (imagenet1k, imagenetv2, imagenet_sketch, ...) use OpenAI's
        curated names, 183 of which are no ImageNet synonym ("rooster", "smooth newt") and two of which
        repeat; they are listed in label order, so that exact list maps class g to label g.
        """
        if _is_clip_benchmark_imagenet(classnames) and set(range(1000)) <= set(pipe.labels.values()):
            return {"class_labels": torch.arange(1000)}
        ids = self.label_ids(pipe)
        missing = [c for c in classnames if c.strip().lower() not in ids]
        if missing:
            shown = ", ".join(repr(c) for c in missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise UserError(f"the dit family serves only ImageNet-class datasets: {len(missing)} of "
                            f"{len(classnames)} class names are not ImageNet names of this model ({shown}); "
                            f"{len(ids)} names are known (its model_index.json id2label)")
        return {"class_labels": torch.tensor([ids[c.strip().lower()] for c in classnames], dtype=torch.long)}

    def call_denoiser(self, pipe: Any, x_t: torch.Tensor, levels: Levels, cond: Conditioning,
                      options: ScoringOptions) -> torch.Tensor:
        return pipe.transformer(x_t, timestep=levels.model_time, class_labels=cond["class_labels"]).sample


def _is_clip_benchmark_imagenet(classnames: list[str]) -> bool:
    """True when ``classnames`` are clip_benchmark's own 1,000 ImageNet class names, in order."""
    if len(classnames) != 1000:
        return False
    import json
    from importlib import resources

    names = json.loads(resources.files("clip_benchmark.datasets").joinpath("en_classnames.json").read_text())
    return [c.lower() for c in classnames] == [c.lower() for c in names["imagenet1k"]]
