"""Every key and digest of the score store, built in one place.

An image's store key is ``run_key/image_digest``: the run key is a sha256 of everything that decides
an image's scores except the image (the model fingerprint: family, objective, weights, noise levels;
the conditioning fingerprint; the options' fingerprint; each class's prompts), the image digest a
hash of its quantised pixels (which also seeds its noise). A change to any of these is a new key, so
a store never hands back a result computed under other settings.

torch is imported inside the functions that need it, so the store's writers need not load it.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

if TYPE_CHECKING:
    import torch


def run_key(model_fingerprint: str, options_fingerprint: dict, candidates: list[list[str]]) -> str:
    """sha256 hex of everything that decides an image's scores except the image itself.

    ``options_fingerprint`` is :meth:`ScoringOptions.fingerprint_dict`; ``candidates`` the
    prompts of each class in class order.
    """
    canonical = json.dumps({"model": model_fingerprint, "options": options_fingerprint,
                            "candidates": candidates},
                           sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def image_key(run_key: str, image_digest: str) -> str:
    """The store key of one image in one run."""
    return f"{run_key}/{image_digest}"


def image_digest(image: "torch.Tensor") -> str:
    """blake2b-128 hex of the image's shape and pixels quantised to int16, on CPU.

    The noise seed is derived from this digest (:func:`clip_benchmark_diffusion.scoring.noise.image_seed`),
    so two images with one digest get the same noise and hence the same scores, on any device.
    """
    import torch

    q = (image.detach().cpu().float().clamp(-1, 1) * 32767).round().to(torch.int16).contiguous()
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps(list(q.shape)).encode())
    h.update(q.numpy().tobytes())
    return h.hexdigest()


def tensor_digest(t: "torch.Tensor") -> str:
    """blake2b-128 hex of a tensor's shape, dtype and values (as float32, or int64 for integers)."""
    import torch

    t = t.detach().cpu()
    t = t.to(torch.float32) if t.is_floating_point() else t.to(torch.int64)
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{list(t.shape)}|{t.dtype}".encode())
    h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


def weights_fingerprint(modules: Mapping[str, "torch.nn.Module"]) -> str:
    """sha256 over every weight of ``modules``: a change of any single value changes it.

    Per module (sorted by name): each state-dict entry's name, shape and dtype (so the loaded dtype
    counts), then the content. A module loaded from a folder (``config._name_or_path``: diffusers and
    transformers record it) is hashed through its files, its ``*.safetensors`` and ``*.json``
    (config, shard index), with digests cached per file version (:mod:`file_digests`), so a multi-GB
    checkpoint is read once; any other module through all of its values. It once sampled 192 values
    per tensor: a checkpoint with one edited embedding row reused the original's scores.
    """
    import torch

    from clip_benchmark_diffusion.results.file_digests import file_digests

    h = hashlib.sha256()

    def add(text: str) -> None:
        data = text.encode()
        h.update(len(data).to_bytes(4, "little") + data)

    with torch.no_grad():
        for mname in sorted(modules):
            module = modules[mname]
            state = module.state_dict()
            for pname in sorted(state):
                add(f"{mname}/{pname}|{list(state[pname].shape)}|{state[pname].dtype}")
            files = weight_files(module)
            if files is not None:
                digests = file_digests(files)
                for path in files:
                    add(f"file:{path.name}:{digests[os.path.realpath(path)]}")
                continue
            for pname in sorted(state):
                values = _value_bytes(state[pname])
                if values is not None:
                    add(f"values:{pname}")
                    h.update(values)
    return h.hexdigest()


def weight_files(module: "torch.nn.Module") -> list[Path] | None:
    """The files ``module`` was loaded from: the ``*.safetensors`` and ``*.json`` of its folder, or None.

    A folder holding variants (``*.fp16.safetensors``) beside the loaded files is hashed whole: a
    change there only makes a new key, never a wrong reuse."""
    folder = getattr(getattr(module, "config", None), "_name_or_path", None)
    if not folder or not os.path.isdir(folder):
        return None
    files = sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix in (".safetensors", ".json"))
    return files if any(p.suffix == ".safetensors" for p in files) else None


def _value_bytes(t: "torch.Tensor") -> bytes | None:
    """Every byte of ``t`` (on the CPU), or None when it has no values to read."""
    import torch

    if t.device.type == "meta" or t.is_quantized or t.layout != torch.strided:
        return None                      # name, shape and dtype still count
    return t.detach().reshape(-1).contiguous().cpu().view(torch.uint8).numpy().tobytes()


def model_fingerprint(family: str, objective: str, modules: Mapping[str, "torch.nn.Module"],
                      noise_levels: "torch.Tensor") -> str:
    """The model's part of a run key: family, objective, every weight, and the noise levels it is scored at."""
    return f"{family}:{objective}:{weights_fingerprint(modules)}:{tensor_digest(noise_levels)}"


def tokenizer_fingerprint(encodings: list[tuple[str, int, "torch.Tensor", "torch.Tensor"]]) -> str:
    """A text-conditioned model's conditioning fingerprint: per tokenizer (name, max length, input ids,
    attention mask) of the run's prompts, so a changed tokenizer file, vocabulary or length is a new key."""
    return "|".join(f"{name}:{limit}:{tensor_digest(ids)}:{tensor_digest(mask)}" for name, limit, ids, mask in encodings)


def class_conditioning_fingerprint(cond: Mapping[str, "torch.Tensor"]) -> str:
    """A class-conditional model's conditioning fingerprint: a digest of each conditioning tensor."""
    return ":".join(f"{k}={tensor_digest(v)}" for k, v in sorted(cond.items()))


def task_run_key(model: str, conditioning: str, options_fingerprint: dict, candidates: list[list[str]]) -> str:
    """The run key of one task: :func:`run_key` of the model and conditioning fingerprints together."""
    return run_key(f"{model}|{conditioning}", options_fingerprint, candidates)
