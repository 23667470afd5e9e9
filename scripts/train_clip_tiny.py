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

``--data pairs`` trains the same kind of model on the two-garment scenes of issue 11 (RGB 28x56,
``ViT-Tiny-4-28x56.json``: 4x4 patches on 28x56 images, 32 tokens); its checks, on scenes made from
the validation hold-out, report top-1 over the 100 ordered pairs and each probe's accuracy.

Usage:
    python scripts/train_clip_tiny.py --steps 1000 --minutes 15 --val-per-class 0  # the shipped run
    python scripts/train_clip_tiny.py --data pairs --out DIR ...                   # issue 11

``--checkpoint FILE`` / ``--stop-after STEP``: resumable runs, as in train_diffusion_tiny.py.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

# Before the OpenMP runtime starts: spinning threads stall on shared cores (see train_diffusion_tiny).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from clip_benchmark_diffusion_demo import (  # noqa: E402
    CLIP_PAIRS_DIR,
    CLIP_PAIRS_NAME,
    CLIP_TINY_DIR,
    CLIP_TINY_NAME,
    CLIP_TINY_WEIGHTS,
)
from clip_benchmark_diffusion_demo.captions import (  # noqa: E402
    CLASSNAMES,
    EVAL_TEMPLATES,
    TRAIN_EVAL_TEMPLATE,
    TRAIN_TEMPLATES,
    captions_for,
)
from clip_benchmark_diffusion_demo.pairs import EVAL_WRAPPERS, PAIR_CLASSNAMES  # noqa: E402
from pair_training import (  # noqa: E402
    PAIRS_CONTEXT_LENGTH,
    PairBatches,
    PairChecks,
    check_summary,
    format_summary,
    load_pair_checks,
)
from tiny_training import (  # noqa: E402
    load_training_data,
    parse_config,
    run_training,
    training_checkpoint,
)

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
# --data pairs: the same towers on 28x56 scenes (7x14 patches) and 32 tokens.
PAIRS_MODEL_CFG = {
    "embed_dim": 64,
    "vision_cfg": {**MODEL_CFG["vision_cfg"], "image_size": [28, 56]},
    "text_cfg": {**MODEL_CFG["text_cfg"], "context_length": PAIRS_CONTEXT_LENGTH},
}
MODELS = {"fashion_mnist": (MODEL_NAME, MODEL_CFG), "pairs": (CLIP_PAIRS_NAME, PAIRS_MODEL_CFG)}


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
    data: str = "fashion_mnist"  # or "pairs": the two-garment scenes of issue 11
    eval_probe_scenes: int = 200  # pairs: validation probe scenes per check (one item per probe each)
    checkpoint: str = ""  # resumable state: resumed from if it exists, written every checkpoint_every steps
    checkpoint_every: int = 100
    stop_after: int = 0  # end this invocation at that step, keeping the run in --checkpoint (0: run to the end)


def write_config(out_dir: Path, preprocess_cfg: dict | None = None, data: str = "fashion_mnist") -> Path:
    """Write ``<model name>.json`` (for ``add_model_config``) and, given the preprocessing,
    ``open_clip_config.json`` (for the ``local-dir:`` schema). Returns the former's path."""
    name, cfg = MODELS[data]
    out_dir.mkdir(parents=True, exist_ok=True)
    named = out_dir / f"{name}.json"
    named.write_text(json.dumps(cfg, indent=2) + "\n")
    if preprocess_cfg is not None:
        local = {"model_cfg": cfg, "preprocess_cfg": preprocess_cfg}
        (out_dir / "open_clip_config.json").write_text(json.dumps(local, indent=2) + "\n")
    return named


def normalize_gray(images: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    """uint8 (N, 28, 28) -> (N, 3, 28, 28) float: what open_clip's transform does to a gray PNG.

    The transform converts to RGB (three equal channels), resizes/crops 28 -> 28 (a no-op) and
    normalises per channel; doing it on tensors avoids 60k PIL round trips per epoch.
    """
    x = images.float().div(255.0).unsqueeze(1).expand(-1, 3, -1, -1)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def normalize_rgb(pixels: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> (N, 3, H, W) float: open_clip's transform of an RGB PNG at its own size."""
    x = pixels.permute(0, 3, 1, 2).float().div(255.0)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


@torch.no_grad()
def class_logits(model, tokenizer, x: torch.Tensor, prompts_per_class: list[list[str]]) -> torch.Tensor:
    """clip_benchmark's recipe: mean of normalised prompt embeddings per class, renormalised; (N, C)."""
    was_training = model.training
    model.eval()
    weights = []
    for prompts in prompts_per_class:
        emb = model.encode_text(tokenizer(prompts), normalize=True)
        weights.append(torch.nn.functional.normalize(emb.mean(0), dim=-1))
    classifier = torch.stack(weights, dim=1)  # (D, C)
    logits = torch.cat([model.encode_image(b, normalize=True) @ classifier for b in x.split(500)])
    model.train(was_training)
    return logits


def zeroshot_predictions(model, tokenizer, x: torch.Tensor, templates) -> torch.Tensor:
    """Fashion-MNIST zero-shot classes (N,) with the given templates."""
    prompts = [captions_for(label, templates) for label in range(len(CLASSNAMES))]
    return class_logits(model, tokenizer, x, prompts).argmax(1)


@torch.no_grad()
def evaluate_pairs(model, tokenizer, checks: PairChecks, mean: list[float], std: list[float]) -> dict:
    """Top-1 over the 100 ordered pairs (held-out wrappers) and each probe's accuracy: the caption
    with the higher cosine similarity wins, as in clip_benchmark's image_caption_selection."""
    prompts = [[w.format(c=name) for w in EVAL_WRAPPERS] for name in PAIR_CLASSNAMES]
    logits = class_logits(model, tokenizer, normalize_rgb(torch.from_numpy(checks.pixels), mean, std), prompts)
    was_training = model.training
    model.eval()
    images = model.encode_image(normalize_rgb(torch.from_numpy(checks.probe_pixels), mean, std), normalize=True)
    texts = [t for m in range(len(images)) for t in checks.candidates(m)]
    text_emb = model.encode_text(tokenizer(texts), normalize=True).view(len(images), -1, images.shape[1])
    model.train(was_training)
    scores = torch.einsum("md,mkd->mk", images, text_emb)
    return check_summary(logits.numpy(), checks.labels, scores.numpy())


def zeroshot_accuracy(model, tokenizer, x: torch.Tensor, labels: torch.Tensor, templates) -> float:
    return (zeroshot_predictions(model, tokenizer, x, templates) == labels).float().mean().item()


def fashion_batches(tokenizer, config: TrainConfig, gen: torch.Generator, pp: dict, preprocess):
    """Fashion-MNIST: (check images, check labels, check name, batch function) for :func:`train`."""
    data = load_training_data(config.train_limit, config.val_per_class, config.eval_images)
    x_train, y_train = torch.from_numpy(data.train_images), torch.from_numpy(data.train_labels)
    x_eval = normalize_gray(torch.from_numpy(data.check_images), pp["mean"], pp["std"])
    # Guard the fast path against drift from open_clip's real transform.
    reference = preprocess(Image.fromarray(data.check_images[0]).convert("RGB"))
    if not torch.allclose(reference, x_eval[0], atol=1e-5):
        raise RuntimeError("normalize_gray() no longer matches open_clip's preprocessing")
    caption_tokens = torch.stack(  # (C, P, L)
        [tokenizer(captions_for(label, TRAIN_TEMPLATES)) for label in range(len(CLASSNAMES))]
    )

    def batch() -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(len(x_train), (config.batch_size,), generator=gen)
        template = torch.randint(len(TRAIN_TEMPLATES), (config.batch_size,), generator=gen)
        x = normalize_gray(x_train[idx], pp["mean"], pp["std"])  # (B, 3, 28, 28)
        return x, caption_tokens[y_train[idx], template]

    return x_eval, torch.from_numpy(data.check_labels), data.check_name, batch


def pairs_batches(tokenizer, config: TrainConfig, pp: dict):
    """Two-garment scenes: (batch function, its scene source), a fresh batch of scenes and training
    captions per step."""
    source = PairBatches(config.seed, config.train_limit)

    def batch() -> tuple[torch.Tensor, torch.Tensor]:
        pixels, captions = source.sample(config.batch_size)
        return normalize_rgb(torch.from_numpy(pixels), pp["mean"], pp["std"]), tokenizer(captions)

    return batch, source


def train(config: TrainConfig, out_dir: Path) -> dict:
    """Train with ClipLoss, evaluate zero-shot periodically, save config + safetensors to ``out_dir``."""
    import open_clip
    from diffusers.optimization import get_cosine_schedule_with_warmup
    from open_clip.loss import ClipLoss
    from safetensors.torch import save_file

    if config.data not in MODELS:
        raise SystemExit(f"clip_benchmark_diffusion: --data must be one of {sorted(MODELS)}, got {config.data!r}")
    if config.data == "pairs" and config.val_per_class != 100:
        raise SystemExit("clip_benchmark_diffusion: --data pairs always holds out the 100-per-class validation split")
    name = MODELS[config.data][0]
    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    open_clip.add_model_config(write_config(out_dir, data=config.data))
    # Random initialisation is the point here: open_clip's "no pretrained weights loaded" warning is not.
    logging.disable(logging.WARNING)
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(name)
    finally:
        logging.disable(logging.NOTSET)
    tokenizer = open_clip.get_tokenizer(name)
    pp = model.visual.preprocess_cfg
    n_params = sum(p.numel() for p in model.parameters())
    n_visual = sum(p.numel() for p in model.visual.parameters())
    print(f"params: total {n_params:,}  visual {n_visual:,}  preprocess {pp}", flush=True)

    gen = torch.Generator().manual_seed(config.seed)
    source = None
    if config.data == "pairs":
        checks = load_pair_checks(config.eval_images, config.eval_probe_scenes)
        # Guard the fast path against drift from open_clip's real transform.
        reference = preprocess(Image.fromarray(checks.pixels[0]))
        if not torch.allclose(reference, normalize_rgb(torch.from_numpy(checks.pixels[:1]), pp["mean"], pp["std"])[0],
                              atol=1e-5):
            raise RuntimeError("normalize_rgb() no longer matches open_clip's preprocessing")
        next_batch, source = pairs_batches(tokenizer, config, pp)
    else:
        x_eval, y_eval, check_name, next_batch = fashion_batches(tokenizer, config, gen, pp, preprocess)

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

    def run_eval(step: int) -> dict:
        if config.data == "pairs":
            acc = {"step": step, **evaluate_pairs(model, tokenizer, checks, pp["mean"], pp["std"])}
            print(f"eval step {step}: {format_summary(acc)}  ({len(checks.labels)} validation scenes, "
                  f"{len(checks.probe_pixels)} per probe)", flush=True)
            return acc
        heldout = (zeroshot_predictions(model, tokenizer, x_eval, EVAL_TEMPLATES) == y_eval).float()
        acc = {
            "step": step,
            "heldout": heldout.mean().item(),
            "train_template": zeroshot_accuracy(model, tokenizer, x_eval, y_eval, (TRAIN_EVAL_TEMPLATE,)),
            "heldout_first200": heldout[:200].mean().item(),  # the diffusion script's evaluation size
        }
        print(f"eval step {step}: held-out {acc['heldout']:.3f} (first 200: {acc['heldout_first200']:.3f})"
              f"  train-template {acc['train_template']:.3f}  ({len(x_eval)} {check_name} images)", flush=True)
        return acc

    def train_step() -> float:
        x, tokens = next_batch()
        image_features = model.encode_image(x, normalize=True)
        text_features = model.encode_text(tokens, normalize=True)
        loss = loss_fn(image_features, text_features, model.logit_scale.exp())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        lr_schedule.step()
        with torch.no_grad():  # CLIP's clamp: temperature at most 100
            model.logit_scale.clamp_(0, math.log(100))
        return loss.item()

    checkpoint = training_checkpoint(config, {"model": model}, optimizer, lr_schedule, gen, scenes=source)
    loop = run_training(config.steps, config.minutes, train_step, run_eval, config.log_every, config.eval_every,
                        describe=lambda: f"logit_scale {model.logit_scale.exp().item():.1f}",
                        checkpoint=checkpoint, stop_after=config.stop_after)
    if loop.stopped:
        return {"config": asdict(config), "model_name": name, **loop.record()}

    write_config(out_dir, preprocess_cfg=dict(pp), data=config.data)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out_dir / WEIGHTS_NAME))
    summary = {
        "config": asdict(config), "model_name": name, "model_cfg": MODELS[config.data][1],
        **loop.record(), "params": {"total": n_params, "visual": n_visual},
        "final_loss_mean_last_50": loop.mean_loss(50),
        "eval_templates": list(EVAL_WRAPPERS if config.data == "pairs" else EVAL_TEMPLATES),
        "train_eval_template": TRAIN_EVAL_TEMPLATE if config.data != "pairs" else None,
    }
    (out_dir / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"saved {out_dir / WEIGHTS_NAME} after {loop.steps_done} steps, {loop.train_minutes:.1f} min", flush=True)
    return summary


def main(argv: list[str] | None = None) -> dict:
    config, out = parse_config(TrainConfig, None, "output folder (default: the shipped model of --data)",
                               __doc__.splitlines()[0], argv)
    return train(config, out or (CLIP_PAIRS_DIR if config.data == "pairs" else CLIP_TINY_DIR))


if __name__ == "__main__":
    main()
