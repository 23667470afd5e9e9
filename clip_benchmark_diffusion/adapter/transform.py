"""PIL image -> tensor at the model's resolution, channels and [-1, 1] range."""
from __future__ import annotations

from PIL import Image
from torchvision import transforms


class ConvertMode:
    """PIL ``convert`` as a picklable transform (dataloader workers may pickle it)."""

    def __init__(self, mode: str) -> None:
        self.mode = mode

    def __call__(self, image: Image.Image) -> Image.Image:
        return image if image.mode == self.mode else image.convert(self.mode)

    def __repr__(self) -> str:
        return f"ConvertMode({self.mode!r})"


def image_transform(resolution: int | tuple[int, int], channels: int) -> transforms.Compose:
    """Resize the short side, centre-crop to a square and scale to [-1, 1], as SD was trained; a
    (height, width) resolution resizes to exactly that size (a non-square model sees all of the image)."""
    size = tuple(resolution) if isinstance(resolution, (list, tuple)) else resolution
    mode = {1: "L", 3: "RGB"}.get(channels)
    if mode is None:
        raise ValueError(f"models with {channels} image channels are not supported (1 or 3)")
    return transforms.Compose([
        ConvertMode(mode),
        transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC, antialias=True),
        transforms.CenterCrop(size),
        transforms.ToTensor(),
        transforms.Normalize([0.5] * channels, [0.5] * channels),
    ])
