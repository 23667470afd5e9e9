"""``--dataset winoground`` from a local folder in Winoground's own release layout.

clip_benchmark's ``winoground`` loader reads only the Hugging Face dataset ``facebook/winoground``
(gated, needs the ``datasets`` package and a network or its cache). Winoground's original release
is a folder of ``examples.jsonl`` (one instance per line: ``id``, ``caption_0``, ``caption_1``,
``image_0``, ``image_1`` naming ``images/<name>.png``, and tags) and ``images/``. When
``--dataset_root`` holds such an ``examples.jsonl``, the stock loader is replaced for that run by
one that reads it and returns what the Hugging Face one returns: two images and two captions per
instance, image i matching caption i. Any other root goes to clip_benchmark's own loader, untouched.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

EXAMPLES = "examples.jsonl"
IMAGES = "images"


def is_local_winoground(root: str | Path) -> bool:
    return (Path(root) / EXAMPLES).is_file()


def read_examples(root: str | Path) -> list[dict]:
    lines = (Path(root) / EXAMPLES).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


class LocalWinoground:
    """The items of clip_benchmark's ``WinoGround``: ``(stacked images or [PIL, PIL], [caption_0, caption_1])``."""

    def __init__(self, root: str | Path, transform: Callable[[Any], Any] | None = None) -> None:
        self.root, self.transform = Path(root), transform
        self.examples = read_examples(root)

    def __len__(self) -> int:
        return len(self.examples)

    def _image(self, name: str):
        from PIL import Image

        with Image.open(self.root / IMAGES / f"{name}.png") as im:
            return im.convert("RGB")   # what the Hugging Face dataset hands out

    def __getitem__(self, idx: int):
        import torch

        ex = self.examples[idx]
        images = [self._image(ex["image_0"]), self._image(ex["image_1"])]
        if self.transform is not None:
            images = torch.stack([self.transform(im) for im in images])
        return images, [ex["caption_0"], ex["caption_1"]]


def patch(module: Any) -> None:
    """Route ``winoground.WinoGround(root=..., transform=...)`` (how clip_benchmark's builder calls it)."""
    original = module.WinoGround

    def WinoGround(root: str = ".", transform: Callable[[Any], Any] | None = None):  # noqa: N802 (its name)
        if is_local_winoground(root):
            return LocalWinoground(root, transform)
        return original(root=root, transform=transform)

    module.WinoGround = WinoGround
