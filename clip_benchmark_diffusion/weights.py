"""Locate ``--pretrained``: a plugin's own scheme, a local diffusers folder or a Hub id, with its model index.

Both kinds are read the same way, before any weight is: ``model_index.json`` must be a JSON
object. Which family the index belongs to is the registry's question
(:func:`clip_benchmark_diffusion.registry.resolve`); this module knows nothing of recipes or families.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clip_benchmark_diffusion.errors import UserError



@dataclass(frozen=True)
class WeightsSource:
    """Where the weights come from: a local folder (``local=True``) or a Hub repository id."""

    location: str
    local: bool
    # The parsed model_index.json (read once, when the weights are located).
    index: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def describe(self) -> str:
        return self.location


def locate_weights(value: str, cache_dir: str | None = None) -> WeightsSource:
    """Classify ``value`` (already mapped through the recipe's tags) and read its model index."""
    from clip_benchmark_diffusion.plugins import locate_weights as plugin_folder

    located = plugin_folder(value)   # a plugin's own scheme (NAME:...), first answer wins
    if located is not None:
        path = Path(located)
        if not path.is_dir():
            raise UserError(f"the weights {value!r} are not installed at {path}")
        return WeightsSource(str(path.resolve()), local=True, index=_local_index(path))
    parts = value.split("/")
    hub_like = len(parts) == 2 and all(parts) and not value.startswith((".", "/", "~"))
    # "models/x" where ./models exists is a folder the user meant, not a Hub id.
    looks_local = value.startswith((".", "/", "~")) or os.path.exists(value) or (hub_like and os.path.isdir(parts[0]))
    if looks_local:
        path = Path(value).expanduser()
        if not path.exists():
            raise UserError(f"--pretrained folder {value!r} does not exist; give a diffusers model "
                            "folder (with model_index.json), a Hub id like org/name, or a known tag")
        return WeightsSource(str(path.resolve()), local=True, index=_local_index(path))
    if not hub_like:
        raise UserError(f"--pretrained {value!r} is neither a known weights tag, a Hub id (org/name) nor an "
                        "existing folder; run `clip_benchmark_diffusion list-models` for the tags")
    return WeightsSource(location=value, local=False, index=_hub_index(value, cache_dir))


def training_timesteps(source: WeightsSource, cache_dir: str | None = None) -> int | None:
    """``num_train_timesteps`` from the scheduler config (None when it cannot be read cheaply)."""
    try:
        if source.local:
            config = Path(source.location) / "scheduler" / "scheduler_config.json"
        else:
            from huggingface_hub import hf_hub_download

            config = Path(hf_hub_download(source.location, "scheduler/scheduler_config.json", cache_dir=cache_dir))
        value = json.loads(config.read_text(encoding="utf-8")).get("num_train_timesteps", 1000)
        return int(value)
    except Exception:  # noqa: BLE001 - a best-effort early check; loading reports a broken scheduler
        return None


def read_config(source: WeightsSource, relative: str, cache_dir: str | None = None) -> dict | None:
    """A JSON config of the weights (``vae/config.json``), or None when it cannot be read cheaply: from
    the folder, or the Hub cache (fetched online). For early checks; loading reports a broken file."""
    try:
        if source.local:
            path = Path(source.location) / relative
        else:
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(source.location, relative, cache_dir=cache_dir))
        data = json.loads(path.read_text(encoding="utf-8"))
    except Exception:  # noqa: BLE001 - best effort: missing, offline, not JSON
        return None
    return data if isinstance(data, dict) else None


def _local_index(path: Path) -> dict:
    index_file = path / "model_index.json"
    if not path.is_dir() or not index_file.is_file():
        raise UserError(f"--pretrained {str(path)!r} is not a diffusers model folder (no model_index.json); "
                        "save one with DiffusionPipeline.save_pretrained")
    return _parse_index(index_file)


def _hub_index(repo: str, cache_dir: str | None) -> dict:
    """The Hub repository's model_index.json: from the cache offline, downloaded (and cached) online."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return _parse_index(Path(hf_hub_download(repo, "model_index.json", cache_dir=cache_dir)))
    except LocalEntryNotFoundError:
        raise UserError(f"--pretrained {repo!r} is not a local folder, and the Hub repository is not in the cache "
                        "while offline; download it first (huggingface-cli download "
                        f"{repo}) or give a local diffusers folder") from None
    except (HfHubHTTPError, OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"--pretrained {repo!r} is not a local folder, and its Hub model_index.json could not be "
                        f"read ({first}); check the id, log in with huggingface-cli login, or give a folder") from None


def _parse_index(index_file: Path) -> dict:
    try:
        index = json.loads(index_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{index_file} is not valid JSON ({exc}); re-save the model") from None
    if not isinstance(index, dict):
        raise UserError(f"{index_file} must hold a JSON object (it holds a {type(index).__name__}); re-save the model")
    return index
