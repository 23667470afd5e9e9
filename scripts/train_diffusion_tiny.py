"""Train the demo text-to-image diffusion model on Fashion-MNIST, from scratch, on CPU.

A pixel-space DDPM (no VAE) on 1-channel 28x28 images in [-1, 1]: a ~1M-parameter diffusers
``UNet2DConditionModel`` with cross-attention only at the 7x7 level, conditioned on a
``CLIPTextModel`` trained jointly from scratch (tokenizer: open_clip's BPE, 16 tokens). Captions
are random ``TRAIN_TEMPLATES`` formatted with the class name. The EMA weights are saved as a
diffusers folder (``model_index.json`` + unet/, text_encoder/, tokenizer/, scheduler/).

Every ``--eval-every`` steps it measures zero-shot accuracy as a diffusion classifier on the
first ``--eval-images`` validation images: for each image the same (t, noise) pairs for every
class, L2 error on epsilon, class = lowest mean error. The validation images are
``--val-per-class`` images per class of the official *train* split, held out from training, so
no test image steers a run; ``--val-per-class 0`` trains on all 60,000 and checks on the first
images of the shipped test subset instead (how the first shipped weights were made).

Usage:
    python scripts/train_diffusion_tiny.py --steps 7000 --minutes 60 --eval-every 1000  # the shipped run
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

# Must precede the OpenMP runtime's start (torch import). With the default spinning policy, two
# threads on two shared cores stall for seconds whenever another process takes a core (measured
# 0.3 s -> 2-12 s per step); passive waiting degrades gracefully (~0.7 s).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from clip_benchmark_diffusion.demo import DIFFUSION_TINY_DIR  # noqa: E402
from clip_benchmark_diffusion.demo.captions import EVAL_TEMPLATES, TRAIN_EVAL_TEMPLATE, TRAIN_TEMPLATES  # noqa: E402
from clip_benchmark_diffusion.demo.classifier_check import (  # noqa: E402
    caption_ids,
    ema_weights,
    eval_mode,
    paired_class_errors,
    template_accuracies,
)
from clip_benchmark_diffusion.demo.fashion_mnist import to_unit_range  # noqa: E402
from clip_benchmark_diffusion.demo.training import load_training_data, parse_config, run_training  # noqa: E402
from clip_benchmark_diffusion.scoring.timesteps import uniform_grid  # noqa: E402
from clip_benchmark_diffusion.tokenizers import clip_bpe_tokenizer  # noqa: E402

CONTEXT_LENGTH = 16


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a run; written next to the weights."""

    steps: int = 4000  # length of the cosine schedule; the run may stop earlier at `minutes`
    minutes: float = 42.0  # wall-clock budget for the training steps (evaluation not counted)
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 200
    ema_decay: float = 0.999  # ~1,000-step window: smooths the tail of the schedule
    seed: int = 0
    threads: int = 2
    train_limit: int = 0  # use only the first N training images (0: all 60,000); for tests
    log_every: int = 50
    eval_every: int = 1000
    val_per_class: int = 100  # train images per class held out for the checks (0: none; check on test)
    eval_images: int = 200  # first N validation images (a class-balanced prefix)
    eval_timesteps: int = 10  # uniform grid for the periodic check
    final_eval_timesteps: int = 20  # 0 disables the final, slower evaluation


def build_components(seed: int):
    """Fresh, seeded (tokenizer, text_encoder, unet, scheduler) with the demo architecture."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = clip_bpe_tokenizer(CONTEXT_LENGTH)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=256,
            projection_dim=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=CONTEXT_LENGTH,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=28,
        in_channels=1,
        out_channels=1,
        block_out_channels=(16, 32, 64),  # 28x28 -> 14x14 -> 7x7
        # Attention over 28x28 or 14x14 tokens is what makes CPU forwards slow: only at 7x7.
        down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=8,
        cross_attention_dim=64,
        attention_head_dim=8,
    )
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="linear", prediction_type="epsilon"
    )
    return tokenizer, text_encoder, unet, scheduler


@torch.no_grad()
def class_errors(
    unet, scheduler, x0: torch.Tensor, cond: torch.Tensor, n_timesteps: int,
    round_robin: bool, seed: int = 1234, chunk: int = 1000,
) -> torch.Tensor:
    """Mean epsilon L2 error of every image under every class: (B, C); lower is better.

    x0: (B, 1, H, W) in [-1, 1]; cond: (C, P, L, D) text states of P prompts per class.
    Timesteps are Li et al.'s uniform grid; noise is seeded, shared by all classes (paired).
    round_robin: use prompt k % P at timestep k (P times cheaper) instead of every prompt at every k.
    """
    T = scheduler.config.num_train_timesteps
    ts = uniform_grid(n_timesteps, T)  # (K,)
    B, K, (C, P) = len(x0), len(ts), cond.shape[:2]
    noise = torch.randn((B, K, *x0.shape[1:]), generator=torch.Generator().manual_seed(seed))
    x_t = scheduler.add_noise(  # (B, K, 1, H, W); add_noise wants one timestep per leading row
        x0.repeat_interleave(K, 0), noise.flatten(0, 1), ts.repeat(B)
    ).view_as(noise)

    def row_errors(b, c, k, p):
        pred = unet(x_t[b, k], ts[k], encoder_hidden_states=cond[c, p]).sample
        return (pred.float() - noise[b, k]).pow(2).mean(dim=(1, 2, 3))

    return paired_class_errors(B, C, K, P, round_robin, row_errors, chunk)


@torch.no_grad()
def evaluate(unet, text_encoder, tokenizer, scheduler, x0, labels, n_timesteps, full: bool) -> dict:
    """Top-1 accuracy with the held-out templates and with one training template."""

    def errors_for(templates):
        ids = caption_ids(tokenizer, templates)
        cond = text_encoder(ids.flatten(0, 1)).last_hidden_state.unflatten(0, ids.shape[:2])
        return class_errors(unet, scheduler, x0, cond, n_timesteps, round_robin=not full)

    with eval_mode(unet, text_encoder):
        return template_accuracies(errors_for, labels)


def save_pipeline(out_dir: Path, tokenizer, text_encoder, unet, scheduler) -> None:
    """Write a diffusers-format folder without a VAE (pixel space)."""
    import diffusers

    out_dir.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(out_dir / "unet")
    text_encoder.save_pretrained(out_dir / "text_encoder")
    tokenizer.save_pretrained(out_dir / "tokenizer")
    scheduler.save_pretrained(out_dir / "scheduler")
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDPMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": [None, None],
    }
    (out_dir / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def denoising_loss(
    unet, text_encoder, scheduler, caption_table: torch.Tensor,
    x_train: torch.Tensor, y_train: torch.Tensor, batch_size: int, gen: torch.Generator,
) -> torch.Tensor:
    """The DDPM epsilon loss on one random batch, each image with a random training caption."""
    idx = torch.randint(len(x_train), (batch_size,), generator=gen)
    x0, y = x_train[idx], y_train[idx]
    template = torch.randint(caption_table.shape[1], (batch_size,), generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    t = torch.randint(scheduler.config.num_train_timesteps, (batch_size,), generator=gen)
    cond = text_encoder(caption_table[y, template]).last_hidden_state  # (B, L, 64)
    pred = unet(scheduler.add_noise(x0, noise, t), t, encoder_hidden_states=cond).sample
    return F.mse_loss(pred, noise)


def train(config: TrainConfig, out_dir: Path) -> dict:
    """Train, evaluate periodically, save the EMA weights to ``out_dir``; return a summary."""
    from diffusers.optimization import get_cosine_schedule_with_warmup
    from diffusers.training_utils import EMAModel

    torch.set_num_threads(config.threads)
    tokenizer, text_encoder, unet, scheduler = build_components(config.seed)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    n_unet = sum(p.numel() for p in unet.parameters())
    n_text = sum(p.numel() for p in text_encoder.parameters())
    print(f"params: unet {n_unet:,}  text_encoder {n_text:,}", flush=True)

    data = load_training_data(config.train_limit, config.val_per_class, config.eval_images)
    x_train, y_train = to_unit_range(data.train_images), torch.from_numpy(data.train_labels)
    x_eval, y_eval = to_unit_range(data.check_images), torch.from_numpy(data.check_labels)
    train_ids = caption_ids(tokenizer, TRAIN_TEMPLATES)  # (C, P, L)

    optimizer = torch.optim.AdamW(params, lr=config.lr)
    lr_schedule = get_cosine_schedule_with_warmup(optimizer, config.warmup_steps, config.steps)
    ema = EMAModel(params, decay=config.ema_decay, foreach=True)
    gen = torch.Generator().manual_seed(config.seed)

    def run_eval(step: int, n_timesteps: int, full: bool) -> dict:
        t0 = time.time()
        with ema_weights(ema, params):
            acc = evaluate(unet, text_encoder, tokenizer, scheduler, x_eval, y_eval, n_timesteps, full)
        kind = "all templates x timesteps" if full else "templates round-robin"
        print(f"eval step {step}: held-out {acc['heldout']:.3f}  train-template {acc['train_template']:.3f}"
              f"  ({len(x_eval)} {data.check_name} images, {n_timesteps} timesteps, {kind},"
              f" {time.time() - t0:.0f}s)", flush=True)
        return {"step": step, "timesteps": n_timesteps, "full": full, **acc}

    def train_step() -> float:
        loss = denoising_loss(
            unet, text_encoder, scheduler, train_ids, x_train, y_train, config.batch_size, gen
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        lr_schedule.step()
        ema.step(params)
        return loss.item()

    loop = run_training(
        config.steps, config.minutes, train_step, lambda step: run_eval(step, config.eval_timesteps, full=False),
        config.log_every, config.eval_every, describe=lambda: f"lr {lr_schedule.get_last_lr()[0]:.2e}",
    )
    final = None
    if config.final_eval_timesteps:
        final = run_eval(loop.steps_done, config.final_eval_timesteps, full=True)

    ema.copy_to(params)
    save_pipeline(out_dir, tokenizer, text_encoder, unet, scheduler)
    summary = {
        "config": asdict(config), "steps_done": loop.steps_done, "train_minutes": round(loop.train_minutes, 2),
        "final_loss_mean_last_200": loop.mean_loss(200),
        "params": {"unet": n_unet, "text_encoder": n_text}, "curve": loop.curve, "final": final,
        "eval_templates": list(EVAL_TEMPLATES), "train_eval_template": TRAIN_EVAL_TEMPLATE,
    }
    (out_dir / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"saved EMA weights to {out_dir} after {loop.steps_done} steps, {loop.train_minutes:.1f} min of training",
          flush=True)
    return summary


def main(argv: list[str] | None = None) -> dict:
    return train(*parse_config(TrainConfig, DIFFUSION_TINY_DIR, "output diffusers folder",
                               __doc__.splitlines()[0], argv))


if __name__ == "__main__":
    main()
