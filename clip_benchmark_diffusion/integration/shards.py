"""A cheap look at a webdataset split before any image is decoded: tar headers, magic bytes, labels.

webdataset reads shards as streams: a shard cut at a member boundary ends early without a word,
and a broken image or a missing shard shows up only when the dataloader reaches it, after the
compute of everything before. Reading the tar headers (a seek per member), the first bytes of
each image and the few bytes of each label finds these before the first image is scored.
"""
from __future__ import annotations

import re
import tarfile
from pathlib import Path

from clip_benchmark_diffusion.errors import UserError

IMAGE_EXTENSIONS = ("webp", "png", "jpg", "jpeg")  # what clip_benchmark's wds loader decodes
_MAGIC = {"png": (b"\x89PNG\r\n\x1a\n",), "jpg": (b"\xff\xd8\xff",), "jpeg": (b"\xff\xd8\xff",), "webp": (b"RIFF",)}
_END_OF_ARCHIVE = 1024  # two zero blocks close every tar that was written to the end
_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext


def check_shards(split_dir: Path, classes: list[str] | None, labelled: bool) -> int:
    """The number of shards of ``split_dir`` (``nshards.txt``), after checking every shard."""
    nshards = read_nshards(split_dir)
    missing = [i for i in range(nshards) if not (split_dir / f"{i}.tar").is_file()]
    if missing:
        raise UserError(f"{split_dir / 'nshards.txt'} says {nshards} shards but {split_dir}/{missing[0]}.tar does "
                        f"not exist ({nshards - len(missing)} of {nshards} present); fix nshards.txt or restore "
                        "the shards")
    for i in range(nshards):
        _check_shard(split_dir / f"{i}.tar", classes, labelled)
    return nshards


def read_nshards(split_dir: Path) -> int:
    """``nshards.txt`` of a split: a positive integer."""
    nshards_file = split_dir / "nshards.txt"
    if not nshards_file.is_file():
        raise UserError(f"{nshards_file} does not exist (an empty or missing {split_dir.name}/ folder?); "
                        "write the dataset with clip_benchmark's webdataset converter")
    text = nshards_file.read_text().strip()
    if not text.isdigit() or int(text) < 1:
        raise UserError(f"{nshards_file} should hold the number of shards (1 or more), not {text!r}")
    return int(text)


def _check_shard(path: Path, classes: list[str] | None, labelled: bool) -> None:
    size = path.stat().st_size
    if size == 0:
        raise UserError(f"shard {path} is empty (0 bytes); restore it or rewrite the dataset")
    try:
        with tarfile.open(path, mode="r:") as tar:
            members = [m for m in tar.getmembers() if m.isfile()]
            last = members[-1] if members else None
            if last is not None and last.offset_data + last.size > size:
                raise _truncated(path, last.name)
            with open(path, "rb") as fh:
                fh.seek(max(size - _END_OF_ARCHIVE, 0))
                if fh.read().strip(b"\x00") and size > _END_OF_ARCHIVE:
                    raise _truncated(path, last.name if last else "its first member")
            samples = _samples(members)
            if not samples:
                raise UserError(f"shard {path} holds no samples; restore it or rewrite the dataset")
            for key, parts in samples.items():
                _check_sample(tar, path, key, parts, classes, labelled)
    except tarfile.ReadError as exc:
        if "unexpected end" in str(exc):  # a member header promises more data than the file holds
            raise _truncated(path, "a member") from None
        raise UserError(f"shard {path} is not a readable tar file ({exc}); restore it or rewrite the dataset") from None
    except tarfile.TarError as exc:
        raise UserError(f"shard {path} is not a readable tar file ({exc}); restore it or rewrite the dataset") from None


def _truncated(path: Path, member: str) -> UserError:
    return UserError(f"shard {path} is truncated (it ends inside or after {member}, without the tar "
                     "end marker), so the images after the cut would be silently missing; restore the full shard")


def _samples(members: list[tarfile.TarInfo]) -> dict[str, dict[str, tarfile.TarInfo]]:
    samples: dict[str, dict[str, tarfile.TarInfo]] = {}
    for m in members:
        match = _KEY.match(m.name)
        if match and not m.name.split("/")[-1].startswith("__"):
            samples.setdefault(match.group(1), {})[match.group(2).lower()] = m
    return samples


def _check_sample(tar: tarfile.TarFile, path: Path, key: str, parts: dict[str, tarfile.TarInfo],
                  classes: list[str] | None, labelled: bool) -> None:
    images = [ext for ext in IMAGE_EXTENSIONS if ext in parts]
    if not images:
        raise UserError(f"sample {key} in shard {path} has no image ({', '.join(sorted(parts))}); "
                        f"clip_benchmark reads {', '.join(IMAGE_EXTENSIONS)}")
    image = parts[images[0]]
    head = tar.extractfile(image).read(12)
    if not head:
        raise UserError(f"image {image.name} in shard {path} is empty (0 bytes); remove the sample or restore it")
    if not head.startswith(_MAGIC[images[0]]):
        raise UserError(f"image {image.name} in shard {path} is not a {images[0]} file (it starts with "
                        f"{head[:8]!r}); remove the sample or restore it")
    if not labelled:
        return
    if "cls" not in parts:
        raise UserError(f"sample {key} in shard {path} has no .cls label; a classification shard needs one per image")
    raw = tar.extractfile(parts["cls"]).read(64).decode("utf-8", "replace").strip()
    if not raw.lstrip("-").isdigit():
        raise UserError(f"label {raw!r} of sample {key} in shard {path} is not a class index")
    if classes is not None and not 0 <= int(raw) < len(classes):
        raise UserError(f"label {raw} of sample {key} in shard {path} is outside the {len(classes)} classes of "
                        f"the class list (0-{len(classes) - 1}); fix the label or classnames.txt")
