"""The embedded demo: Fashion-MNIST data and three tiny models trained on it offline.

``fashion_mnist_1k/`` is a clip_benchmark webdataset folder (1,000 official test images);
``models/diffusion_tiny/`` is a pixel-space text-to-image diffusion model in diffusers format,
``models/diffusion_tiny_flow/`` a pixel-space rectified-flow transformer in the SD3 format and
``models/clip_tiny/`` an open_clip model, all trained from scratch by ``scripts/train_*_tiny.py``
on the official train split with the captions in :mod:`clip_benchmark_diffusion_demo.captions`.
"""

from __future__ import annotations

from pathlib import Path

DEMO_DIR = Path(__file__).resolve().parent
DATASET_DIR = DEMO_DIR / "fashion_mnist_1k"
DIFFUSION_TINY_DIR = DEMO_DIR / "models" / "diffusion_tiny"
DIFFUSION_TINY_FLOW_DIR = DEMO_DIR / "models" / "diffusion_tiny_flow"
CLIP_TINY_DIR = DEMO_DIR / "models" / "clip_tiny"
CLIP_TINY_NAME = "ViT-Tiny-4-28"
# open_clip's own weights file name (what its ``local-dir:`` schema looks for).
CLIP_TINY_WEIGHTS = CLIP_TINY_DIR / "open_clip_model.safetensors"
# Issue 11's pair, trained on the two-garment scenes by the same scripts with ``--data pairs``.
DIFFUSION_PAIRS_DIR = DEMO_DIR / "models" / "diffusion_pairs"
CLIP_PAIRS_DIR = DEMO_DIR / "models" / "clip_pairs"
CLIP_PAIRS_NAME = "ViT-Tiny-4-28x56"
CLIP_PAIRS_WEIGHTS = CLIP_PAIRS_DIR / "open_clip_model.safetensors"


def register_open_clip_configs() -> None:
    """Make the demo CLIPs' architectures known to open_clip by name (what the plugin hook does for a run)."""
    from clip_benchmark_diffusion.plugins import register_open_clip_configs as register_all

    register_all()


def shipped_images(n: int = 8) -> tuple[list, list[str]]:
    """The first ``n`` of the 1,000 shipped test images, in the shipped (class-interleaved) order, as
    28x28 grayscale PIL images, with their class names (for the README's Python example)."""
    import io
    import tarfile

    from PIL import Image

    from clip_benchmark_diffusion_demo.captions import CLASSNAMES

    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(DATASET_DIR / "test" / "0.tar") as tar:
        for member in tar:
            key, _, ext = member.name.rpartition(".")
            if key not in samples and len(samples) == n:
                break
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    images = [Image.open(io.BytesIO(s["png"])) for s in samples.values()]
    for image in images:
        image.load()
    return images, [CLASSNAMES[int(s["cls"])] for s in samples.values()]
