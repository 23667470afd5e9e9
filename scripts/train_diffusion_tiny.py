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

``--data pairs`` trains the same kind of model on the two-garment scenes of issue 11 (RGB 28x56,
captions naming both garments, their colours and their order; see ``demo/pairs.py``): 3 channels,
``sample_size (28, 56)``, 32 tokens. Its checks, on scenes made from the same validation hold-out,
report top-1 over the 100 ordered pairs and the accuracy of each caption-selection probe.

Usage:
    python scripts/train_diffusion_tiny.py --steps 7000 --minutes 60 --eval-every 1000  # the shipped run
    python scripts/train_diffusion_tiny.py --data pairs --out DIR ...                   # issue 11

``--checkpoint FILE`` keeps the whole training state (weights, optimiser, schedule, EMA, generators)
every ``--checkpoint-every`` steps and resumes from it when it exists, so a run can be split across
sessions (``--stop-after STEP``) or survive a kill; the split run ends bit for bit where the
uninterrupted one does (tests/test_pairs_training.py).
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

from clip_benchmark_diffusion_demo import DIFFUSION_PAIRS_DIR, DIFFUSION_TINY_DIR  # noqa: E402
from clip_benchmark_diffusion_demo.captions import EVAL_TEMPLATES, TRAIN_EVAL_TEMPLATE, TRAIN_TEMPLATES  # noqa: E402
from clip_benchmark_diffusion_demo.classifier_check import caption_ids, paired_class_errors  # noqa: E402
from clip_benchmark_diffusion_demo.fashion_mnist import to_unit_range  # noqa: E402
from clip_benchmark_diffusion_demo.pairs import EVAL_WRAPPERS, PAIR_CLASSNAMES  # noqa: E402
from clip_benchmark_diffusion_demo.pairs_data import scenes_to_unit_range  # noqa: E402
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
    data: str = "fashion_mnist"  # or "pairs": the two-garment scenes of issue 11
    base_channels: int = 16  # UNet widths (c, 2c, 4c)
    eval_probe_scenes: int = 200  # pairs: validation probe scenes per check (one item per probe each)
    checkpoint: str = ""  # resumable state: resumed from if it exists, written every checkpoint_every steps
    checkpoint_every: int = 100
    stop_after: int = 0  # end this invocation at that step, keeping the run in --checkpoint (0: run to the end)


DATA_SHAPES = {  # data -> (channels, UNet sample_size, context length)
    "fashion_mnist": (1, 28, CONTEXT_LENGTH),
    "pairs": (3, (28, 56), PAIRS_CONTEXT_LENGTH),
}


def build_components(seed: int, data: str = "fashion_mnist", base_channels: int = 16):
    """Fresh, seeded (tokenizer, text_encoder, unet, scheduler) with the demo architecture."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    channels, sample_size, context_length = DATA_SHAPES[data]
    torch.manual_seed(seed)
    tokenizer = clip_bpe_tokenizer(context_length)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=256,
            projection_dim=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=context_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=(base_channels, 2 * base_channels, 4 * base_channels),  # 28x28 -> 14x14 -> 7x7
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
    was_training = unet.training
    unet.eval()
    text_encoder.eval()
    out = {}
    for name, templates in (("heldout", EVAL_TEMPLATES), ("train_template", (TRAIN_EVAL_TEMPLATE,))):
        ids = caption_ids(tokenizer, templates)
        cond = text_encoder(ids.flatten(0, 1)).last_hidden_state.unflatten(0, ids.shape[:2])
        errors = class_errors(unet, scheduler, x0, cond, n_timesteps, round_robin=not full)
        out[name] = (errors.argmin(1) == labels).float().mean().item()
    unet.train(was_training)
    text_encoder.train(was_training)
    return out


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


def denoising_loss(unet, text_encoder, scheduler, x0: torch.Tensor, ids: torch.Tensor,
                   gen: torch.Generator) -> torch.Tensor:
    """The DDPM epsilon loss on one batch of images ``x0`` with caption token ids ``ids``."""
    noise = torch.randn(x0.shape, generator=gen)
    t = torch.randint(scheduler.config.num_train_timesteps, (len(x0),), generator=gen)
    cond = text_encoder(ids).last_hidden_state  # (B, L, 64)
    pred = unet(scheduler.add_noise(x0, noise, t), t, encoder_hidden_states=cond).sample
    return F.mse_loss(pred, noise)


def fashion_batches(tokenizer, config: TrainConfig, gen: torch.Generator):
    """Fashion-MNIST: (check images, check labels, check name, batch function) for :func:`train`."""
    data = load_training_data(config.train_limit, config.val_per_class, config.eval_images)
    x_train, y_train = to_unit_range(data.train_images), torch.from_numpy(data.train_labels)
    train_ids = caption_ids(tokenizer, TRAIN_TEMPLATES)  # (C, P, L)

    def batch() -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(len(x_train), (config.batch_size,), generator=gen)
        template = torch.randint(train_ids.shape[1], (config.batch_size,), generator=gen)
        return x_train[idx], train_ids[y_train[idx], template]

    return to_unit_range(data.check_images), torch.from_numpy(data.check_labels), data.check_name, batch


def pairs_batches(tokenizer, config: TrainConfig):
    """Two-garment scenes: (batch function, its scene source), a fresh batch of scenes and training
    captions per step."""
    source = PairBatches(config.seed, config.train_limit)

    def batch() -> tuple[torch.Tensor, torch.Tensor]:
        pixels, captions = source.sample(config.batch_size)
        ids = tokenizer(captions, padding="max_length", truncation=True, return_tensors="pt").input_ids
        return scenes_to_unit_range(pixels), ids

    return batch, source


@torch.no_grad()
def evaluate_pairs(unet, text_encoder, tokenizer, scheduler, checks: PairChecks, n_timesteps: int,
                   full: bool) -> dict:
    """Top-1 over the 100 ordered pairs (held-out wrappers) and each probe's accuracy, as a
    diffusion classifier: lower epsilon error = better match, same noise for every candidate."""
    was_training = unet.training
    unet.eval()
    text_encoder.eval()

    def encode(texts: list[str]) -> torch.Tensor:
        ids = tokenizer(texts, padding="max_length", truncation=True, return_tensors="pt").input_ids
        return text_encoder(ids).last_hidden_state

    prompts = [w.format(c=name) for name in PAIR_CLASSNAMES for w in EVAL_WRAPPERS]
    cond = encode(prompts).unflatten(0, (len(PAIR_CLASSNAMES), len(EVAL_WRAPPERS)))  # (100, 3, L, D)
    x = scenes_to_unit_range(checks.pixels)
    class_err = torch.cat([class_errors(unet, scheduler, part, cond, n_timesteps, round_robin=not full, chunk=250)
                           for part in x.split(50)])
    probe_x = scenes_to_unit_range(checks.probe_pixels)
    cand_err = torch.stack([  # (M, 1 + probes): each scene against its own candidates only
        class_errors(unet, scheduler, probe_x[m:m + 1], encode(checks.candidates(m))[:, None], n_timesteps,
                     round_robin=False)[0]
        for m in range(len(probe_x))])
    unet.train(was_training)
    text_encoder.train(was_training)
    return check_summary(-class_err.numpy(), checks.labels, -cand_err.numpy())


def train(config: TrainConfig, out_dir: Path) -> dict:
    """Train, evaluate periodically, save the EMA weights to ``out_dir``; return a summary."""
    from diffusers.optimization import get_cosine_schedule_with_warmup
    from diffusers.training_utils import EMAModel

    if config.data not in DATA_SHAPES:
        raise SystemExit(f"clip_benchmark_diffusion: --data must be one of {sorted(DATA_SHAPES)}, got {config.data!r}")
    torch.set_num_threads(config.threads)
    tokenizer, text_encoder, unet, scheduler = build_components(config.seed, config.data, config.base_channels)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    n_unet = sum(p.numel() for p in unet.parameters())
    n_text = sum(p.numel() for p in text_encoder.parameters())
    print(f"params: unet {n_unet:,}  text_encoder {n_text:,}", flush=True)

    gen = torch.Generator().manual_seed(config.seed)
    source = None
    if config.data == "pairs":
        if config.val_per_class != 100:
            raise SystemExit("clip_benchmark_diffusion: --data pairs always holds out the 100-per-class validation split")
        checks = load_pair_checks(config.eval_images, config.eval_probe_scenes)
        next_batch, source = pairs_batches(tokenizer, config)
    else:
        x_eval, y_eval, check_name, next_batch = fashion_batches(tokenizer, config, gen)

    optimizer = torch.optim.AdamW(params, lr=config.lr)
    lr_schedule = get_cosine_schedule_with_warmup(optimizer, config.warmup_steps, config.steps)
    ema = EMAModel(params, decay=config.ema_decay, foreach=True)

    def run_eval(step: int, n_timesteps: int, full: bool) -> dict:
        ema.store(params)
        ema.copy_to(params)
        t0 = time.time()
        kind = "all templates x timesteps" if full else "templates round-robin"
        if config.data == "pairs":
            acc = evaluate_pairs(unet, text_encoder, tokenizer, scheduler, checks, n_timesteps, full)
            print(f"eval step {step}: {format_summary(acc)}  ({len(checks.labels)} validation scenes, "
                  f"{len(checks.probe_pixels)} per probe, {n_timesteps} timesteps, {kind}, {time.time() - t0:.0f}s)",
                  flush=True)
        else:
            acc = evaluate(unet, text_encoder, tokenizer, scheduler, x_eval, y_eval, n_timesteps, full)
            print(f"eval step {step}: held-out {acc['heldout']:.3f}  train-template {acc['train_template']:.3f}"
                  f"  ({len(x_eval)} {check_name} images, {n_timesteps} timesteps, {kind},"
                  f" {time.time() - t0:.0f}s)", flush=True)
        ema.restore(params)
        return {"step": step, "timesteps": n_timesteps, "full": full, **acc}

    def train_step() -> float:
        loss = denoising_loss(unet, text_encoder, scheduler, *next_batch(), gen)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        lr_schedule.step()
        ema.step(params)
        return loss.item()

    checkpoint = training_checkpoint(config, {"unet": unet, "text_encoder": text_encoder}, optimizer, lr_schedule,
                                     gen, ema=ema, scenes=source)
    loop = run_training(
        config.steps, config.minutes, train_step, lambda step: run_eval(step, config.eval_timesteps, full=False),
        config.log_every, config.eval_every, describe=lambda: f"lr {lr_schedule.get_last_lr()[0]:.2e}",
        checkpoint=checkpoint, stop_after=config.stop_after,
    )
    if loop.stopped:
        return {"config": asdict(config), **loop.record()}
    final = None
    if config.final_eval_timesteps:
        final = run_eval(loop.steps_done, config.final_eval_timesteps, full=True)

    ema.copy_to(params)
    save_pipeline(out_dir, tokenizer, text_encoder, unet, scheduler)
    summary = {
        "config": asdict(config), **loop.record(), "final_loss_mean_last_200": loop.mean_loss(200),
        "params": {"unet": n_unet, "text_encoder": n_text}, "final": final,
        "eval_templates": list(EVAL_WRAPPERS if config.data == "pairs" else EVAL_TEMPLATES),
        "train_eval_template": TRAIN_EVAL_TEMPLATE if config.data != "pairs" else None,
    }
    (out_dir / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"saved EMA weights to {out_dir} after {loop.steps_done} steps, {loop.train_minutes:.1f} min of training",
          flush=True)
    return summary


def main(argv: list[str] | None = None) -> dict:
    config, out = parse_config(TrainConfig, None, "output diffusers folder (default: the shipped model of --data)",
                               __doc__.splitlines()[0], argv)
    return train(config, out or (DIFFUSION_PAIRS_DIR if config.data == "pairs" else DIFFUSION_TINY_DIR))


if __name__ == "__main__":
    main()
