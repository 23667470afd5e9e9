"""PIL image (or a [0, 1] tensor) -> tensor at the model's resolution, channels and [-1, 1] range."""
from __future__ import annotations

import torch
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


class TensorChannels:
    """A (C, H, W) tensor with the model's channels: RGB to grayscale with torchvision's weights (ITU-R
    601, as PIL's ``L``), grayscale repeated to RGB, and an alpha channel dropped (as PIL's ``RGB``)."""

    def __init__(self, channels: int) -> None:
        self.channels = channels

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if image.shape[0] == 4:
            image = image[:3]
        if image.shape[0] == self.channels:
            return image
        if image.shape[0] == 3 and self.channels == 1:
            return transforms.functional.rgb_to_grayscale(image)
        if image.shape[0] == 1 and self.channels == 3:
            return image.expand(3, -1, -1)
        raise ValueError(f"a {image.shape[0]}-channel image cannot be given to a {self.channels}-channel model")


def tensor_transform(resolution: int | tuple[int, int], channels: int) -> transforms.Compose:
    """``image_transform`` for a float (C, H, W) tensor in [0, 1] (what ``ToTensor`` makes of a PIL image):
    the same resize, crop and scaling, on the tensor. An image already at the model's size is not
    resampled, so it gives exactly what its PIL image gives; one that is resized differs from the PIL
    path by torchvision's tensor bicubic filter against PIL's (clamped to [0, 1] like PIL's 8 bits)."""
    size = tuple(resolution) if isinstance(resolution, (list, tuple)) else resolution
    return transforms.Compose([
        TensorChannels(channels),
        transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC, antialias=True),
        transforms.Lambda(lambda x: x.clamp(0.0, 1.0)),
        transforms.CenterCrop(size),
        transforms.Normalize([0.5] * channels, [0.5] * channels),
    ])
