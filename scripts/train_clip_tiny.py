"""Train the demo CLIP model on Fashion-MNIST, from scratch, on CPU, with open_clip itself.

The architecture is an open_clip model config (``ViT-Tiny-4-28.json``: a 4-layer ViT with 4x4
patches on 28x28 images, and a 2-layer, width-64 text transformer over 16 open_clip BPE tokens),
trained with open_clip's ``ClipLoss`` on the official train split, captions = random
``TRAIN_TEMPLATES``. Images go through exactly the preprocessing open_clip builds for this config
(grayscale PNG -> RGB, OpenAI mean/std), so the stock loader reproduces training conditions:

    open_clip.add_model_config("<out>/ViT-Tiny-4-28.json")
    open_clip.create_model_and_transforms(
        "ViT-Tiny-4-28", pretrained="<out>/open_clip_model.safetensors")
    # or, with no registration: open_clip.create_model_and_transforms("local-dir:<out>")

Usage:
    python scripts/train_clip_tiny.py --steps 1000 --minutes 15 --val-per-class 0  # the shipped run
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

# Before the OpenMP runtime starts: spinning threads stall on shared cores (see train_diffusion_tiny).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from clip_benchmark_diffusion.demo import CLIP_TINY_DIR, CLIP_TINY_NAME, CLIP_TINY_WEIGHTS  # noqa: E402
from clip_benchmark_diffusion.demo.captions import (  # noqa: E402
    CLASSNAMES,
    EVAL_TEMPLATES,
    TRAIN_EVAL_TEMPLATE,
    TRAIN_TEMPLATES,
    captions_for,
)
from clip_benchmark_diffusion.demo.training import load_training_data, parse_config, run_training  # noqa: E402

MODEL_NAME = CLIP_TINY_NAME  # "ViT-Tiny-4-28": ViT, 4x4 patches, 28x28 images
WEIGHTS_NAME = CLIP_TINY_WEIGHTS.name
# open_clip model config: architecture as data, one JSON file per model name.
MODEL_CFG = {
    "embed_dim": 64,
    "vision_cfg": {
        "image_size": 28, "patch_size": 4, "width": 96, "head_width": 24, "layers": 4, "mlp_ratio": 2.0,
    },
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2},
}


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a run; written next to the weights."""

    steps: int = 1000  # length of the cosine schedule; the run may stop earlier at `minutes`
    minutes: float = 15.0  # a cap; 1,000 steps take ~6-10 min on 2 shared cores
    batch_size: int = 256  # larger batches give more negatives but fewer steps on 2 cores
    lr: float = 2e-3
    weight_decay: float = 0.1
    warmup_steps: int = 100
    seed: int = 0
    threads: int = 2
    train_limit: int = 0  # use only the first N training images (0: all 60,000); for tests
    log_every: int = 50
    eval_every: int = 250
    val_per_class: int = 100  # train images per class held out for the checks (0: none; check on test)
    eval_images: int = 1000  # first N held-out images (a class-balanced prefix)


def write_config(out_dir: Path, preprocess_cfg: dict | None = None) -> Path:
    """Write ``<MODEL_NAME>.json`` (for ``add_model_config``) and, given the preprocessing,
    ``open_clip_config.json`` (for the ``local-dir:`` schema). Returns the former's path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    named = out_dir / f"{MODEL_NAME}.json"
    named.write_text(json.dumps(MODEL_CFG, indent=2) + "\n")
    if preprocess_cfg is not None:
        local = {"model_cfg": MODEL_CFG, "preprocess_cfg": preprocess_cfg}
        (out_dir / "open_clip_config.json").write_text(json.dumps(local, indent=2) + "\n")
    return named


def normalize_gray(images: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    """uint8 (N, 28, 28) -> (N, 3, 28, 28) float: what open_clip's transform does to a gray PNG.

    The transform converts to RGB (three equal channels), resizes/crops 28 -> 28 (a no-op) and
    normalises per channel; doing it on tensors avoids 60k PIL round trips per epoch.
    """
    x = images.float().div(255.0).unsqueeze(1).expand(-1, 3, -1, -1)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


@torch.no_grad()
def zeroshot_predictions(model, tokenizer, x: torch.Tensor, templates) -> torch.Tensor:
    """clip_benchmark's recipe: mean of normalised prompt embeddings per class, renormalised; (N,) classes."""
    was_training = model.training
    model.eval()
    weights = []
    for label in range(len(CLASSNAMES)):
        emb = model.encode_text(tokenizer(captions_for(label, templates)), normalize=True)
        weights.append(torch.nn.functional.normalize(emb.mean(0), dim=-1))
    classifier = torch.stack(weights, dim=1)  # (D, C)
    logits = torch.cat([model.encode_image(b, normalize=True) @ classifier for b in x.split(500)])
    model.train(was_training)
    return logits.argmax(1)


def zeroshot_accuracy(model, tokenizer, x: torch.Tensor, labels: torch.Tensor, templates) -> float:
    return (zeroshot_predictions(model, tokenizer, x, templates) == labels).float().mean().item()


def train(config: TrainConfig, out_dir: Path) -> dict:
    """Train with ClipLoss, evaluate zero-shot periodically, save config + safetensors to ``out_dir``."""
    import open_clip
    from diffusers.optimization import get_cosine_schedule_with_warmup
    from open_clip.loss import ClipLoss
    from safetensors.torch import save_file

    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    open_clip.add_model_config(write_config(out_dir))
    model, _, preprocess = open_clip.create_model_and_transforms(MODEL_NAME)
    tokenizer = open_clip.get_tokenizer(MODEL_NAME)
    pp = model.visual.preprocess_cfg
    n_params = sum(p.numel() for p in model.parameters())
    n_visual = sum(p.numel() for p in model.visual.parameters())
    print(f"params: total {n_params:,}  visual {n_visual:,}  preprocess {pp}", flush=True)

    data = load_training_data(config.train_limit, config.val_per_class, config.eval_images)
    x_train, y_train = torch.from_numpy(data.train_images), torch.from_numpy(data.train_labels)
    x_eval = normalize_gray(torch.from_numpy(data.check_images), pp["mean"], pp["std"])
    y_eval = torch.from_numpy(data.check_labels)
    # Guard the fast path against drift from open_clip's real transform.
    reference = preprocess(Image.fromarray(data.check_images[0]).convert("RGB"))
    if not torch.allclose(reference, x_eval[0], atol=1e-5):
        raise RuntimeError("normalize_gray() no longer matches open_clip's preprocessing")
    caption_tokens = torch.stack(  # (C, P, L)
        [tokenizer(captions_for(label, TRAIN_TEMPLATES)) for label in range(len(CLASSNAMES))]
    )

    params_decay = [p for p in model.parameters() if p.ndim >= 2]
    params_other = [p for p in model.parameters() if p.ndim < 2]  # norms, biases, logit_scale
    optimizer = torch.optim.AdamW(
        [
            {"params": params_decay, "weight_decay": config.weight_decay},
            {"params": params_other, "weight_decay": 0.0},
        ],
        lr=config.lr,
    )
    lr_schedule = get_cosine_schedule_with_warmup(optimizer, config.warmup_steps, config.steps)
    loss_fn = ClipLoss()
    gen = torch.Generator().manual_seed(config.seed)

    def run_eval(step: int) -> dict:
        heldout = (zeroshot_predictions(model, tokenizer, x_eval, EVAL_TEMPLATES) == y_eval).float()
        acc = {
            "step": step,
            "heldout": heldout.mean().item(),
            "train_template": zeroshot_accuracy(model, tokenizer, x_eval, y_eval, (TRAIN_EVAL_TEMPLATE,)),
            "heldout_first200": heldout[:200].mean().item(),  # the diffusion script's evaluation size
        }
        print(f"eval step {step}: held-out {acc['heldout']:.3f} (first 200: {acc['heldout_first200']:.3f})"
              f"  train-template {acc['train_template']:.3f}  ({len(x_eval)} {data.check_name} images)", flush=True)
        return acc

    def train_step() -> float:
        idx = torch.randint(len(x_train), (config.batch_size,), generator=gen)
        template = torch.randint(len(TRAIN_TEMPLATES), (config.batch_size,), generator=gen)
        x = normalize_gray(x_train[idx], pp["mean"], pp["std"])  # (B, 3, 28, 28)
        image_features = model.encode_image(x, normalize=True)
        text_features = model.encode_text(caption_tokens[y_train[idx], template], normalize=True)
        loss = loss_fn(image_features, text_features, model.logit_scale.exp())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        lr_schedule.step()
        with torch.no_grad():  # CLIP's clamp: temperature at most 100
            model.logit_scale.clamp_(0, math.log(100))
        return loss.item()

    loop = run_training(config.steps, config.minutes, train_step, run_eval, config.log_every, config.eval_every,
                        describe=lambda: f"logit_scale {model.logit_scale.exp().item():.1f}")

    write_config(out_dir, preprocess_cfg=dict(pp))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out_dir / WEIGHTS_NAME))
    summary = {
        "config": asdict(config), "model_name": MODEL_NAME, "model_cfg": MODEL_CFG,
        "steps_done": loop.steps_done, "train_minutes": round(loop.train_minutes, 2),
        "params": {"total": n_params, "visual": n_visual},
        "final_loss_mean_last_50": loop.mean_loss(50), "curve": loop.curve,
        "eval_templates": list(EVAL_TEMPLATES), "train_eval_template": TRAIN_EVAL_TEMPLATE,
    }
    (out_dir / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"saved {out_dir / WEIGHTS_NAME} after {loop.steps_done} steps, {loop.train_minutes:.1f} min", flush=True)
    return summary


def main(argv: list[str] | None = None) -> dict:
    return train(*parse_config(TrainConfig, CLIP_TINY_DIR, "output folder", __doc__.splitlines()[0], argv))


if __name__ == "__main__":
    main()
