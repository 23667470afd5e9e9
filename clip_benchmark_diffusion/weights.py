"""Resolve ``--pretrained`` to a local diffusers folder or a Hub id, and check it before compute."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from clip_benchmark_diffusion.errors import UserError

DEMO_PREFIX = "demo:"
DEMO_MODELS = Path(__file__).parent / "demo" / "models"
# Components a text-to-image diffusers folder must have for us to score with it.
REQUIRED = ("unet", "text_encoder", "tokenizer", "scheduler")


@dataclass(frozen=True)
class WeightsSource:
    """Where the weights come from: a local folder (``local=True``) or a Hub repository id."""

    location: str
    local: bool

    def describe(self) -> str:
        return self.location


def resolve_weights(value: str) -> WeightsSource:
    """Classify ``value`` (already mapped through the recipe's tags) and validate local folders."""
    if value.startswith(DEMO_PREFIX):
        path = DEMO_MODELS / value[len(DEMO_PREFIX):]
        if not path.is_dir():
            raise UserError(f"the demo model {value!r} is not installed at {path}")
        return _check_folder(path)
    looks_local = value.startswith((".", "/", "~")) or os.path.exists(value)
    if looks_local:
        path = Path(value).expanduser()
        if not path.exists():
            raise UserError(f"--pretrained folder {value!r} does not exist; give a diffusers model "
                            "folder (with model_index.json), a Hub id like org/name, or a known tag")
        return _check_folder(path)
    if "/" in value and len(value.split("/")) == 2 and all(value.split("/")):
        return WeightsSource(location=value, local=False)
    raise UserError(f"--pretrained {value!r} is neither a known weights tag, a Hub id (org/name) nor an "
                    "existing folder; run `clip_benchmark_diffusion list-models` for the tags")


def _check_folder(path: Path) -> WeightsSource:
    index_file = path / "model_index.json"
    if not path.is_dir() or not index_file.is_file():
        raise UserError(f"--pretrained {str(path)!r} is not a diffusers model folder (no model_index.json); "
                        "save one with DiffusionPipeline.save_pretrained")
    try:
        index = json.loads(index_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{index_file} is not valid JSON ({exc}); re-save the model") from None
    missing = [c for c in REQUIRED if not (isinstance(index.get(c), list) and index[c][0])]
    if missing:
        kind = index.get("_class_name", "this pipeline")
        raise UserError(f"--pretrained {str(path)!r} is not a text-to-image diffusion model: {kind} has no "
                        f"{', '.join(missing)}; use a text-conditioned UNet pipeline such as Stable Diffusion")
    return WeightsSource(location=str(path.resolve()), local=True)


def model_index(source: WeightsSource) -> dict:
    """The pipeline's model_index.json (downloaded for Hub ids)."""
    if source.local:
        return json.loads((Path(source.location) / "model_index.json").read_text())
    from huggingface_hub import hf_hub_download

    return json.loads(Path(hf_hub_download(source.location, "model_index.json")).read_text())
