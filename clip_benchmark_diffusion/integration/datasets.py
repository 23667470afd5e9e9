"""clip_benchmark's dataset building, made safe: text files with a byte-order mark, data that is
not there while offline, and downloads that fail.

clip_benchmark reads ``classnames.txt`` and ``zeroshot_classification_templates.txt`` with
``open(fname, "r")``: a UTF-8 byte-order mark (Notepad writes one) stays in the first class name
or template, so its prompts silently differ ("a photo of \\ufeffzero"). torchvision datasets are
built with ``download=True`` after the model has loaded, so a missing dataset offline was a
download traceback minutes into a run. :func:`check_dataset_present` finds that in the plan;
:func:`wrap_build_dataset` cleans the names and turns a failed download into one line.
"""
from __future__ import annotations

import functools
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

from clip_benchmark_diffusion.errors import UserError

BOM = "\ufeff"
# Environment variables under which nothing may be fetched from the network (values as huggingface_hub reads them).
OFFLINE_ENVS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
_TRUE = ("1", "on", "yes", "true")
# torchvision datasets clip_benchmark builds whose presence can be checked cheaply, by building them
# with download=False (a few MB to 200 MB of pickles or idx files, no network, nothing written),
# and the folder torchvision keeps them in under --dataset_root.
CHEAP_TO_CHECK = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python", "mnist": "MNIST"}


def offline() -> bool:
    """True when the user said not to use the network (``HF_HUB_OFFLINE=1`` and its siblings)."""
    return any(os.environ.get(name, "").strip().lower() in _TRUE for name in OFFLINE_ENVS)


def strip_bom(names: Any) -> Any:
    """A list of class names or templates without a byte-order mark: only the first line of a
    file can start with one, but a mark anywhere at a line's start is never meant as text."""
    if not isinstance(names, list):
        return names  # None, or a per-class prompt dict read from JSON (the JSON files are copied without one)
    return [n.lstrip(BOM).strip() if isinstance(n, str) and n.startswith(BOM) else n for n in names]


def check_dataset_present(args: Any, root: str, dataset: str) -> None:
    """Offline, a torchvision dataset that would have to be downloaded is one line before loading."""
    if dataset not in CHEAP_TO_CHECK or not offline():
        return
    from clip_benchmark.datasets.builder import build_dataset

    build_dataset = getattr(build_dataset, "__wrapped__", build_dataset)  # its own errors, not the wrapper's
    try:
        build_dataset(dataset_name=dataset, root=root, transform=None, split=args.split, download=False,
                      language=args.language, task="zeroshot_classification")
    except AssertionError as exc:  # e.g. a split the dataset does not have
        raise UserError(f"dataset {dataset} in {root} cannot be read: {' '.join(str(exc).split())}") from None
    except (RuntimeError, OSError):  # torchvision: "Dataset not found or corrupted"
        where = os.path.join(root, CHEAP_TO_CHECK[dataset])
        raise UserError(f"dataset {dataset} is not in --dataset_root {root} (torchvision looks for {where}) "
                        "and cannot be downloaded offline (HF_HUB_OFFLINE is set); put the data there, or run "
                        "once with network access to download it") from None


def wrap_build_dataset(original: Callable[..., Any]) -> Callable[..., Any]:
    """clip_benchmark's ``build_dataset`` with BOM-free class names and templates, and a failed
    download as one line (raised before the first image is scored: the dataset is built first)."""

    @functools.wraps(original)
    def build_dataset(*args: Any, **kwargs: Any) -> Any:
        with tempfile.TemporaryDirectory(prefix="clip_benchmark_diffusion-") as scratch:
            for flag in ("custom_classname_file", "custom_template_file"):
                if kwargs.get(flag):
                    kwargs[flag] = _without_bom(kwargs[flag], Path(scratch) / flag)
            try:
                ds = original(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - re-raised unless it is a failed download
                name = kwargs.get("dataset_name", args[0] if args else "the dataset")
                root = kwargs.get("root", args[1] if len(args) > 1 else "root")
                _raise_if_download_failed(exc, name, root)
                raise
        for field in ("classes", "templates"):
            if isinstance(getattr(ds, field, None), list):
                setattr(ds, field, strip_bom(getattr(ds, field)))
        return ds

    return build_dataset


def _without_bom(path: str, copy: Path) -> str:
    """``path``, or ``copy`` of it without its byte-order mark: clip_benchmark reads the custom JSON
    files with ``json.load``, which refuses a BOM ("Unexpected UTF-8 BOM")."""
    try:
        data = Path(path).read_bytes()
    except OSError:
        return path  # clip_benchmark looks for it in its own folder, or says it does not exist
    if not data.startswith(BOM.encode("utf-8")):
        return path
    copy.write_bytes(data[len(BOM.encode("utf-8")):])
    return str(copy)


def _raise_if_download_failed(exc: BaseException, name: str, root: str) -> None:
    """A UserError for an exception (or its cause) that is a download that could not reach the network."""
    import http.client
    import socket
    import urllib.error

    seen: BaseException | None = exc
    while seen is not None:
        network = isinstance(seen, (urllib.error.URLError, http.client.HTTPException, socket.timeout,
                                    socket.gaierror, ConnectionError))
        if network or (isinstance(seen, RuntimeError) and "download" in str(seen).lower()):
            text = " ".join(str(seen).split())[:200]
            raise UserError(f"dataset {name} is not in --dataset_root {root} and could not be downloaded "
                            f"({type(seen).__name__}: {text}); put the data there, or run once with network "
                            "access to download it") from None
        seen = seen.__cause__ or seen.__context__
