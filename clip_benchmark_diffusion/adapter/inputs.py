"""Images given in Python (PIL images, tensors or paths) -> the model's input batch, read and checked
before any compute, each mistake one line (``errors.UserError``)."""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Union

import torch
from PIL import Image

from clip_benchmark_diffusion.errors import UserError

ImageInput = Union[Image.Image, torch.Tensor, str, os.PathLike]
Images = Union[ImageInput, Sequence[ImageInput]]


def image_batch(images: Images, pil_transform: Callable[[Image.Image], torch.Tensor],
                tensor_transform: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """(N, C, H, W) float32 in [-1, 1]: each image through the stock command's transform (``pil_transform``),
    tensors through its tensor counterpart. A tensor is one image (C, H, W) or (H, W), or a batch
    (N, C, H, W), in [0, 1] (``ToTensor``'s convention; uint8 is divided by 255)."""
    items = _items(images)
    if not items:
        raise UserError("no images given; pass PIL images, tensors or image paths")
    out = []
    for i, item in enumerate(items):
        if isinstance(item, torch.Tensor):
            out.append(_from_tensor(item, i, tensor_transform))
        elif isinstance(item, Image.Image):
            out.append(pil_transform(item))
        elif isinstance(item, (str, os.PathLike)):
            out.append(pil_transform(read_image(item)))
        else:
            raise UserError(f"image {i} is of type {type(item).__name__}; give PIL images, tensors or image paths")
    return torch.stack(out).float()


def _items(images: Images) -> list:
    """A flat list of single images (a 4-D tensor is a batch of them)."""
    if isinstance(images, torch.Tensor):
        return list(images) if images.dim() == 4 else [images]
    if isinstance(images, (Image.Image, str, os.PathLike)):
        return [images]
    try:
        items = list(images)
    except TypeError:
        raise UserError(f"images must be PIL images, tensors or image paths (or a list of them), "
                        f"not {type(images).__name__}") from None
    return [x for item in items for x in (list(item) if isinstance(item, torch.Tensor) and item.dim() == 4 else [item])]


def _from_tensor(image: torch.Tensor, i: int, transform: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    if image.dim() == 2:
        image = image[None]
    if image.dim() != 3 or image.shape[0] not in (1, 3, 4) or image.numel() == 0:
        raise UserError(f"image {i} is a tensor of shape {tuple(image.shape)}; give (C, H, W) with 1, 3 or 4 "
                        "channels, (H, W), or a batch (N, C, H, W)")
    if image.dtype == torch.uint8:
        image = image.float() / 255.0
    elif not image.is_floating_point():
        raise UserError(f"image {i} is a {image.dtype} tensor; give float values in [0, 1] or uint8")
    image = image.detach().cpu().float()
    if not torch.isfinite(image).all() or image.min() < 0 or image.max() > 1:
        raise UserError(f"image {i} has values outside [0, 1] (min {float(image.min()):g}, max "
                        f"{float(image.max()):g}); give tensors as ToTensor makes them, not normalised ones")
    try:
        return transform(image)
    except ValueError as exc:
        raise UserError(f"image {i}: {exc}") from None


def read_image(path: str | os.PathLike[str]) -> Image.Image:
    """The decoded image at ``path``; one line if it is missing or not an image."""
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except Image.DecompressionBombError as exc:
        raise UserError(f"image {os.fspath(path)!r} is too large to decode safely ({exc}); downscale it, "
                        "or raise PIL.Image.MAX_IMAGE_PIXELS if you trust it") from None
    except (OSError, SyntaxError, ValueError) as exc:  # missing, a folder, unreadable, not an image, truncated
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else " ".join(str(exc).split())
        raise UserError(f"image {os.fspath(path)!r} cannot be read ({reason}); give the path of an image "
                        "file, a PIL image or a tensor") from None
