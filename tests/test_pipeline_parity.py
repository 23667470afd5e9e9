"""Pipeline parity for SD 1.5 (epsilon), SD 2 (v-prediction), SDXL, SD3, SD3.5-medium and the
embedded models: the oracle is diffusers itself, not our reading of it.

Each model is loaded through the package's own path (``families.model.load_model``); the family's
diffusers pipeline is then built on those very components (``from_pipe``) and run for one step,
with a forward hook on the denoiser and a recorder on the scheduler (``oracle_capture``). The
package is given the same noised input at the same noise level (one of its own grid's levels: the
pipeline is told to run exactly there, ``timesteps=[t]`` for VP models, ``sigmas=[u]`` for flows,
whose scheduler applies the model's own shift) and must:

1. call the denoiser with the same arguments, every one of ``forward``'s parameters (noised input,
   timestep value and scale, text states, pooled projections, SDXL's text_embeds and size ids,
   masks, and everything left at its default);
2. put its samples at the noise level the scheduler uses for that step (alpha_bar[t]; sigma after
   the shift);
3. return the epsilon estimate that the pipeline's scheduler implies from the raw output: the
   scheduler's own ``step`` gives x0 (``pred_original_sample`` of DDPM/Euler; a flow's one-step
   ``prev_sample``, which lands at sigma = 0), and x_t = a x0 + b eps (the package's definition of
   its level (a, b)) turns that into epsilon;
4. (image-to-image, models with a VAE) encode an image to the clean latent the img2img pipeline
   builds from it, shift and scale included (the posterior *mean*: the pipelines' ``retrieve_latents``
   is run with ``sample_mode="argmax"``, their own switch for it, because the package scores the mean
   while the pipelines draw a sample by default), and noise it to the latent the scheduler's
   ``add_noise`` / ``scale_noise`` makes from the same noise, through the scoring engine's own x_t.

The noise for (4) is the engine's own (its ``NoiseBank``): the pipeline's ``randn_tensor`` returns it.
"""
from __future__ import annotations

import functools
import sys

import pytest
import torch

from oracle_capture import DenoiserCalls, SchedulerCalls, assert_same_denoiser_inputs
from tiny_families import save_tiny, sd3_pipeline, sdxl_pipeline
from tiny_models import save_tiny_sd

PROMPT = "a photo of the number one."
N_LEVELS = 4          # the package grid scored here; every level is a real sample index of that grid
TOL = dict(rtol=1e-5, atol=1e-5)

def save_sdxl_wide(folder):
    """SDXL with a 2:1 UNet (sample_size (8, 16) latents, 16 x 32 px): size ids hold height and width apart."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    parts = sdxl_pipeline().components
    parts["unet"] = UNet2DConditionModel(**{**parts["unet"].config, "sample_size": (8, 16)})
    StableDiffusionXLPipeline(**parts).save_pretrained(folder, safe_serialization=True)
    return folder


def save_sd3_dynamic(folder):
    """SD3 whose scheduler shifts by the image's token count (``use_dynamic_shifting``, which the SD3
    pipelines honour: mu from the latent size, then ``time_shift(mu)`` instead of ``shift``)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    torch.manual_seed(0)
    parts = sd3_pipeline().components
    parts["scheduler"] = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                                         base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                                         max_image_seq_len=4096)
    StableDiffusion3Pipeline(**parts).save_pretrained(folder, safe_serialization=True)
    return folder


# case -> (recipe, tiny folder builder or None for the recipe's embedded weights)
CASES = {
    "sd15": ("diffusion_sd15", lambda folder: save_tiny("stable_diffusion", folder)),
    "sd2_v": ("diffusion_sd2_768", lambda folder: save_tiny_sd(folder, "v_prediction")),
    "sdxl": ("diffusion_sdxl", lambda folder: save_tiny("sdxl", folder)),
    "sd3": ("diffusion_sd3", lambda folder: save_tiny("sd3", folder)),
    "sd35_medium": ("diffusion_sd35_medium", lambda folder: save_tiny("sd35_medium", folder)),
    "sdxl_wide": ("diffusion_sdxl", save_sdxl_wide),
    "sd3_dynamic": ("diffusion_sd3", save_sd3_dynamic),
    "diffusion_tiny": ("diffusion_tiny", None),
    "diffusion_tiny_flow": ("diffusion_tiny_flow", None),
    "diffusion_pairs": ("diffusion_pairs", None),
}
WITH_VAE = ["sd15", "sd2_v", "sdxl", "sd3", "sd35_medium", "sdxl_wide", "sd3_dynamic"]


class Case:
    def __init__(self, name: str, loaded, options) -> None:
        self.name, self.loaded, self.options = name, loaded, options
        self.family = loaded.family

    @property
    def flow(self) -> bool:
        return self.family.time == "flow"

    def grid(self):
        return self.loaded.grid(N_LEVELS, self.options)

    def latent_shape(self) -> tuple[int, int, int]:
        """(C, h, w) of the denoiser's input at the model's native resolution."""
        res = self.family.native_resolution(self.loaded.pipe)
        h, w = res if isinstance(res, tuple) else (res, res)
        f = self.family.vae_scale_factor(self.loaded.pipe)
        return self.loaded.denoiser.config.in_channels, h // f, w // f

    def levels(self, k: int):
        """Sample k's level exactly as the scoring engine slices it from the grid (float32)."""
        from clip_benchmark_diffusion.scoring.engine import Levels

        g = self.grid()
        return Levels(a=g.a.float()[[k]], b=g.b.float()[[k]], model_time=g.model_time.float()[[k]])

    def pipeline_level(self, k: int) -> dict:
        """The ``__call__`` argument that makes the pipeline's one step sit at the grid's level k:
        VP: the grid's training step itself; flow: the grid's unshifted midpoint u, which the
        scheduler shifts by the model's own rule (so the shift is checked against the scheduler)."""
        from clip_benchmark_diffusion.scoring.timesteps import prefix_order

        if self.flow:
            j = int(prefix_order(N_LEVELS)[k])
            return {"sigmas": [(j + 0.5) / N_LEVELS]}
        return {"timesteps": [int(self.grid().model_time[k])]}

    def flow_mu(self) -> dict:
        """``mu`` for a dynamically shifting flow scheduler, as the SD3 pipelines compute it from the
        latent size (their own ``calculate_shift``); nothing otherwise."""
        cfg = self.loaded.pipe.scheduler.config
        if not cfg.get("use_dynamic_shifting", False):
            return {}
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

        _, h, w = self.latent_shape()
        p = self.loaded.denoiser.config.patch_size
        return {"mu": calculate_shift((h // p) * (w // p), cfg.get("base_image_seq_len", 256),
                                      cfg.get("max_image_seq_len", 4096), cfg.get("base_shift", 0.5),
                                      cfg.get("max_shift", 1.16))}

    def oracle_scheduler(self, kind: str | None = None):
        """A fresh scheduler from the loaded one's config (``kind``: another class on the same
        config). DDPM's x0 clipping is a sampler's device, not the model's prediction: it is off."""
        import diffusers

        config = dict(self.loaded.pipe.scheduler.config)
        cls = getattr(diffusers, kind) if kind else type(self.loaded.pipe.scheduler)
        off = {k: False for k in ("clip_sample", "thresholding") if k in config}
        return cls.from_config(config, **off)

    def pipeline(self, cls_name: str | None = None, scheduler=None):
        import diffusers

        cls = getattr(diffusers, cls_name) if cls_name else type(self.loaded.pipe)
        pipe = cls.from_pipe(self.loaded.pipe, scheduler=scheduler or self.oracle_scheduler())
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def call_kwargs(self, pipe) -> dict:
        """No classifier-free guidance (guidance 1: one conditional batch), latents out, the size
        the package scores at, and the token length the package's options give the T5 side."""
        _, h, w = self.latent_shape()
        kw = dict(guidance_scale=1.0, output_type="latent", height=h * pipe.vae_scale_factor,
                  width=w * pipe.vae_scale_factor)
        if self.family.name == "sd3" and self.options.max_sequence_length:
            kw["max_sequence_length"] = self.options.max_sequence_length   # else both use the pipeline default
        return kw


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    from clip_benchmark_diffusion.families.model import load_model
    from clip_benchmark_diffusion.registry import get_family, get_recipe
    from clip_benchmark_diffusion.weights import locate_weights

    made: dict[str, Case] = {}

    def get(name: str) -> Case:
        if name not in made:
            recipe_name, build = CASES[name]
            recipe, family = get_recipe(recipe_name), None
            family = get_family(recipe.family)
            weights = str(build(tmp_path_factory.mktemp(name) / "model")) if build else recipe.default_weights
            source = locate_weights(weights)
            loaded = load_model(family, source, torch.float32, expected_prediction=recipe.prediction_type)
            options = recipe.default_options().replace(strategy="full", n_samples=(N_LEVELS,))
            made[name] = Case(name, loaded.place("cpu"), options)
        return made[name]

    return get


def _eps_from_x0(x_t: torch.Tensor, x0: torch.Tensor, levels) -> torch.Tensor:
    """x_t = a x0 + b eps, solved for eps with the package's (a, b) of that sample."""
    a, b = levels.a.reshape(-1, 1, 1, 1), levels.b.reshape(-1, 1, 1, 1)
    return (x_t - a * x0) / b


# (case, scheduler class for the oracle pipeline: None = the one the model folder ships)
TXT2IMG = [("sd15", None), ("sd15", "EulerDiscreteScheduler"), ("sd2_v", None), ("sd2_v", "EulerDiscreteScheduler"),
           ("sdxl", None), ("sd3", None), ("sd35_medium", None), ("sdxl_wide", None), ("sd3_dynamic", None),
           ("diffusion_tiny", None), ("diffusion_tiny_flow", None), ("diffusion_pairs", None)]


@pytest.mark.parametrize("name, scheduler", TXT2IMG, ids=[f"{n}-{s or 'own'}" for n, s in TXT2IMG])
@pytest.mark.parametrize("k", [0, 1])          # grid levels t = 125 / 625 (VP); sigma from u = 0.125 / 0.625
def test_denoiser_call_and_epsilon_match_the_pipeline(name, scheduler, k, cases):
    case = cases(name)
    sched = case.oracle_scheduler(scheduler)
    pipe = case.pipeline(scheduler=sched)
    latents = torch.randn((1, *case.latent_shape()), generator=torch.Generator().manual_seed(7))
    record = SchedulerCalls(sched)
    with DenoiserCalls(case.loaded.denoiser) as theirs:
        pipe(prompt=PROMPT, latents=latents, generator=torch.Generator().manual_seed(1), **case.pipeline_level(k),
             **case.call_kwargs(pipe))
    assert len(theirs.calls) == 1 and len(record.steps) == 1
    call, step = theirs.calls[0], record.steps[0]
    x_name = "hidden_states" if "hidden_states" in call["inputs"] else "sample"
    x_t = call["inputs"][x_name]

    # 1. the same denoiser call from the package's own conditioning and level
    levels = case.levels(k)
    cond = case.loaded.encode_prompts([PROMPT], case.options)
    with DenoiserCalls(case.loaded.denoiser) as ours:
        eps_hat = case.loaded.denoise(x_t, levels, cond, case.options)
    assert len(ours.calls) == 1
    assert_same_denoiser_inputs(call["inputs"], ours.calls[0]["inputs"])
    torch.testing.assert_close(ours.calls[0]["output"], call["output"], **TOL)      # same model, same result

    # 2. the level: the scheduler's own alpha_bar(t) / shifted sigma at this step
    if case.flow:
        assert len(sched.sigmas) == 2 and float(sched.sigmas[1]) == 0.0          # one step, to sigma = 0
        torch.testing.assert_close(levels.b, sched.sigmas[:1], rtol=1e-6, atol=0)
        torch.testing.assert_close(levels.a, 1 - sched.sigmas[:1], rtol=1e-6, atol=0)
    else:
        t = int(step["timestep"])
        torch.testing.assert_close(levels.a.double() ** 2, sched.alphas_cumprod[[t]].double(), rtol=1e-6, atol=0)
        torch.testing.assert_close(levels.b.double() ** 2, 1 - sched.alphas_cumprod[[t]].double(), rtol=1e-5, atol=0)

    # 3. epsilon: what the pipeline's scheduler makes of the raw output
    x0_oracle = step["out"]["prev_sample"] if case.flow else step["out"]["pred_original_sample"]
    torch.testing.assert_close(eps_hat, _eps_from_x0(x_t, x0_oracle, levels), **TOL)


IMG2IMG = {"stable_diffusion": "StableDiffusionImg2ImgPipeline", "sdxl": "StableDiffusionXLImg2ImgPipeline",
           "sd3": "StableDiffusion3Img2ImgPipeline"}


def _image(case: Case, seed: int = 3):
    """A random RGB picture at the model's native size (so no resizing happens on either side)."""
    from PIL import Image

    _, h, w = case.latent_shape()
    f = case.family.vae_scale_factor(case.loaded.pipe)
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (h * f, w * f, 3), generator=g, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy(), "RGB")


def _engine_calls(case: Case, x0: torch.Tensor, seed: int):
    """Score ``x0`` (1, C, h, w) against PROMPT with the package's engine (full strategy, the grid's
    N_LEVELS samples); returns the denoiser calls it made and the noise of each sample."""
    from clip_benchmark_diffusion.scoring.engine import Candidates, ScoringEngine
    from clip_benchmark_diffusion.scoring.noise import NoiseBank

    loaded, options = case.loaded, case.options
    engine = ScoringEngine(lambda x_t, levels, cond: loaded.denoise(x_t, levels, cond, options), case.grid(),
                           loaded.objective, options, "cpu")
    cands = Candidates(cond=loaded.encode_prompts([PROMPT], options), members=torch.tensor([[0]]))
    with DenoiserCalls(loaded.denoiser) as ours:
        engine.score(x0, [seed], cands)
    eps = NoiseBank(seed, tuple(x0.shape[1:]), "cpu").get(torch.arange(N_LEVELS))
    return ours.calls, eps


def _row_of(calls, case: Case, k: int) -> tuple[dict, int]:
    """The engine call and row that scored sample k (found by its timestep)."""
    want = float(case.grid().model_time.float()[k])
    for call in calls:
        t = call["inputs"]["timestep"]
        rows = (t == want).nonzero().flatten().tolist()
        if rows:
            return call, rows[0]
    raise AssertionError(f"sample {k} (model time {want}) never reached the denoiser")


@pytest.mark.parametrize("name", WITH_VAE)
@pytest.mark.parametrize("k", [0, 1])
def test_img2img_clean_latent_and_noised_input_match_the_pipeline(name, k, cases, monkeypatch):
    case = cases(name)
    cls_name = IMG2IMG[case.family.name]
    sched = case.oracle_scheduler()
    pipe = case.pipeline(cls_name, sched)
    image = _image(case)
    seed = 11

    # the package: the pipeline's own preprocessing, our VAE encoding, our engine's x_t
    pixels = pipe.image_processor.preprocess(image)
    x0 = case.loaded.encode_images(pixels)
    ours, eps = _engine_calls(case, x0, seed)
    our_call, row = _row_of(ours, case, k)

    # the pipeline: posterior mean (argmax) instead of a draw, and the engine's noise for sample k
    module = sys.modules[type(pipe).__module__]
    monkeypatch.setattr(module, "retrieve_latents", functools.partial(module.retrieve_latents, sample_mode="argmax"))
    monkeypatch.setattr(module, "randn_tensor", lambda shape, **kw: eps[k:k + 1].to(kw.get("dtype")).clone())
    record = SchedulerCalls(sched)
    with DenoiserCalls(case.loaded.denoiser) as theirs:
        pipe(prompt=PROMPT, image=image, strength=1.0, generator=torch.Generator().manual_seed(1),
             **case.pipeline_level(k), **case.call_kwargs(pipe))
    assert len(record.noising) == 1 and len(theirs.calls) == 1
    noising = record.noising[0]
    # the clean latent the pipeline noises is ours: VAE mean, minus shift_factor, times scaling_factor
    torch.testing.assert_close(x0, noising["clean"], **TOL)
    torch.testing.assert_close(eps[k:k + 1], noising["noise"], rtol=0, atol=0)
    # and the noised input reaching the denoiser (after Euler's scale_model_input for SDXL) is ours,
    # with every other argument of the call
    assert_same_denoiser_inputs(theirs.calls[0]["inputs"], our_call["inputs"], row=row)


@pytest.mark.parametrize("name", list(CASES))
def test_engine_noises_like_the_scheduler(name, cases):
    """The engine's x_t for each of the grid's samples is the scheduler's forward process at that level
    with the same noise: DDPM's ``add_noise`` on the model's alpha_bar (VP; a DDPM scheduler on the
    folder's own config, since Euler's ``add_noise`` works in its sigma-scaled space) or the flow
    scheduler's ``scale_noise`` after ``set_timesteps(sigmas=[u])``. Covers the pixel-space embedded
    models too (their clean input is the image itself)."""
    import diffusers

    case = cases(name)
    C, h, w = case.latent_shape()
    if case.loaded.vae is not None:
        x0 = case.loaded.encode_images(case.loaded.pipe.image_processor.preprocess(_image(case)))
    else:
        x0 = torch.rand((1, C, h, w), generator=torch.Generator().manual_seed(5)) * 2 - 1   # pixels: x0 = image
    ours, eps = _engine_calls(case, x0, seed=13)
    for k in range(N_LEVELS):
        call, row = _row_of(ours, case, k)
        x_name = "hidden_states" if "hidden_states" in call["inputs"] else "sample"
        x_t = call["inputs"][x_name][row:row + 1]
        if case.flow:
            sched = case.oracle_scheduler()
            sched.set_timesteps(**case.pipeline_level(k), **case.flow_mu())
            expected = sched.scale_noise(x0, sched.timesteps[:1], eps[k:k + 1])
        else:
            sched = diffusers.DDPMScheduler.from_config(case.loaded.pipe.scheduler.config)
            assert torch.equal(sched.alphas_cumprod, case.loaded.pipe.scheduler.alphas_cumprod)
            expected = sched.add_noise(x0, eps[k:k + 1], torch.tensor(case.pipeline_level(k)["timesteps"]))
        torch.testing.assert_close(x_t, expected, **TOL, msg=lambda m: f"sample {k}: {m}")


@pytest.mark.parametrize("name", ["sd15", "sdxl", "sd3"])
def test_image_transform_gives_the_pipelines_pixels(name, cases):
    """At the native size (no resizing), the package's transform and the pipeline's
    ``image_processor.preprocess`` give the same [-1, 1] tensor."""
    from clip_benchmark_diffusion.adapter.transform import image_transform

    case = cases(name)
    image = _image(case)
    ours = image_transform(case.loaded.resolution(case.options), case.loaded.image_channels)(image)
    theirs = case.loaded.pipe.image_processor.preprocess(image)
    torch.testing.assert_close(ours[None], theirs, rtol=0, atol=1e-6)
