"""Pipeline parity for FLUX (dev, schnell), PixArt-alpha (512 and 1024-MS), PixArt-Sigma, Sana, IF
stage I and DiT: diffusers itself is the oracle.

Each test loads a tiny random instance through the package's own ``load_model`` and runs that same
pipeline's ``__call__`` (2 steps, no classifier-free-guidance doubling) with hooks on the denoiser
and the scheduler. At the step whose noise level is the package's one-sample grid level (u = 1/2:
t = 500 for the VP schedules, sigma = shift(1/2) for FLUX), the package is given the same noised
input, level and prompt (through its ``encode_prompts``) and must

* hand the denoiser the same arguments, every one of them, to float tolerance, and
* return the epsilon estimate that the pipeline's own scheduler implies for the pipeline's model
  output (derived from what ``step`` / ``convert_model_output`` computed, not from our formulas).

Image-to-image (FLUX, IF): the package's clean input equals the pipeline's encoding of the same image
and its noised input equals the scheduler's ``scale_noise`` / ``add_noise`` with the same noise.
"""
from __future__ import annotations

import pytest
import torch

from clip_benchmark_diffusion.families.model import LoadedModel, load_model
from clip_benchmark_diffusion.options import ScoringOptions
from clip_benchmark_diffusion.registry import get_family, get_recipe
from clip_benchmark_diffusion.scoring import math as smath
from clip_benchmark_diffusion.scoring.engine import Levels
from clip_benchmark_diffusion.scoring.timesteps import shift_sigma
from clip_benchmark_diffusion.weights import WeightsSource
from parity_hooks_b import assert_same_inputs, output_of, record_calls, record_method
from tiny_families import TINY_FAMILIES, pixart_pipeline, save_tiny

PROMPT = "a photo of the number one."
NAMES = ["flux_dev", "flux_schnell", "pixart_alpha", "pixart_alpha_ms", "pixart_sigma", "sana", "if", "dit"]


def pixart_alpha_1024_ms():
    """PixArt-alpha as the 1024-MS checkpoint is configured: ``sample_size`` 128, the one value for which
    the pipeline passes resolution / aspect-ratio micro-conditions (``use_additional_conditions`` follows)."""
    pipe = pixart_pipeline("alpha")
    from diffusers import PixArtTransformer2DModel

    cfg = dict(pipe.transformer.config)
    cfg.update(sample_size=128, use_additional_conditions=None)
    pipe.transformer = PixArtTransformer2DModel.from_config(cfg)
    pipe.register_modules(transformer=pipe.transformer)
    return pipe


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("parity_b")
    out = {name: save_tiny(name, root / name) for name in NAMES if name != "pixart_alpha_ms"}
    torch.manual_seed(0)
    pixart_alpha_1024_ms().save_pretrained(root / "pixart_alpha_ms", safe_serialization=True)
    out["pixart_alpha_ms"] = root / "pixart_alpha_ms"
    return out


def load(folders, name: str) -> LoadedModel:
    recipe = get_recipe(TINY_FAMILIES[name][0])
    model = load_model(get_family(recipe.family), WeightsSource(str(folders[name]), True), torch.float32)
    model.pipe.set_progress_bar_config(disable=True)
    return model


def levels_of(grid, i: int = 0) -> Levels:
    """Row ``i`` of the package's grid as the engine hands it to the denoiser (float32)."""
    return Levels(a=grid.a[i:i + 1].float(), b=grid.b[i:i + 1].float(), model_time=grid.model_time[i:i + 1].float())


def package_call(model: LoadedModel, x_t, levels, cond, options):
    with record_calls(model.denoiser) as calls:
        eps = model.denoise(x_t, levels, cond, options)
    assert len(calls) == 1
    return eps, calls[0]


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# -- FLUX -------------------------------------------------------------------------------------------------

# schnell at 16 x 32 px: the packed layout and RoPE ids of a non-square latent (its shift does not depend on
# the size; dev's does, and the package scores FLUX square).
@pytest.mark.parametrize("name, height, width", [("flux_dev", 16, 16), ("flux_schnell", 16, 16),
                                                 ("flux_schnell", 16, 32)])
def test_flux_matches_the_pipeline(name, height, width, folders):
    model, opts = load(folders, name), ScoringOptions()
    pipe = model.pipe
    with record_calls(model.denoiser) as ref, record_method(pipe.scheduler, "step") as steps:
        pipe(prompt=PROMPT, height=height, width=width, num_inference_steps=2, guidance_scale=opts.guidance,
             generator=gen(), output_type="latent")
    # Step 1 runs at sigma = shift(1/2): the package's one-sample grid level, shifted by its own rule.
    sigma, sigma_next = float(pipe.scheduler.sigmas[1]), float(pipe.scheduler.sigmas[2])
    grid = model.grid(1, opts)
    assert float(grid.b[0]) == pytest.approx(sigma, abs=1e-6)
    want = ref[1].inputs
    x_t = pipe._unpack_latents(want["hidden_states"], height, width, pipe.vae_scale_factor)   # diffusers' unpacking
    eps, got = package_call(model, x_t, levels_of(grid), model.encode_prompts([PROMPT], opts), opts)
    assert_same_inputs(got.inputs, want)
    # The scheduler's Euler step prev = x + (sigma_next - sigma) v gives v; x0 = x - sigma v (the same step to
    # sigma 0) and scale_noise's x_t = sigma eps + (1 - sigma) x0 give eps.
    args, _, result, idx = steps[1]
    model_out, sample, prev = args[0], args[2], result[0]          # step(noise_pred, t, latents, return_dict=False)
    assert idx == 1 and torch.equal(model_out, output_of(ref[1]))
    v = (prev - sample) / (sigma_next - sigma)
    x0 = sample - sigma * v
    eps_ref = pipe._unpack_latents((sample - (1 - sigma) * x0) / sigma, height, width, pipe.vae_scale_factor)
    assert torch.allclose(eps, eps_ref, atol=1e-4, rtol=1e-4), float((eps - eps_ref).abs().max())


def test_flux_img2img_encodes_and_noises_as_the_pipeline(folders):
    from diffusers import FluxImg2ImgPipeline

    model, opts = load(folders, "flux_dev"), ScoringOptions()
    # FluxImg2ImgPipeline samples the VAE posterior (retrieve_latents, sample_mode="sample"); the package
    # scores its mean (deterministic). Pin the posterior's log-variance at its floor (-30: std 3e-7) so
    # the pipeline's sample is the mean and the comparison is about everything else (shift, scale, layout).
    quant = model.vae.quant_conv
    c = quant.out_channels // 2
    with torch.no_grad():
        quant.weight[c:] = 0
        quant.bias[c:] = -100
    i2i = FluxImg2ImgPipeline.from_pipe(model.pipe)
    image = torch.rand(1, 3, 16, 16, generator=gen(1))                  # [0, 1], as the pipeline takes it
    with record_calls(model.denoiser) as ref, record_method(i2i.scheduler, "scale_noise") as noised:
        i2i(prompt=PROMPT, image=image, strength=0.5, height=16, width=16, num_inference_steps=2,
            guidance_scale=opts.guidance, generator=gen(), output_type="latent")
    (clean, timestep, noise), _, out, _ = noised[0]
    x0 = model.encode_images(image * 2 - 1)
    assert torch.allclose(x0, clean, atol=1e-5), float((x0 - clean).abs().max())
    grid = model.grid(1, opts)                                           # strength 1/2 starts at u = 1/2
    assert float(timestep) / 1000 == pytest.approx(float(grid.b[0]), abs=1e-6)
    levels = levels_of(grid)
    x_t = smath.add_noise(x0, noise, levels.a, levels.b)
    assert torch.allclose(x_t, out, atol=1e-5)
    _, got = package_call(model, x_t, levels, model.encode_prompts([PROMPT], opts), opts)
    assert_same_inputs(got.inputs, ref[0].inputs, atol=1e-5)


# -- PixArt -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["pixart_alpha", "pixart_alpha_ms", "pixart_sigma"])
def test_pixart_matches_the_pipeline(name, folders):
    model, opts = load(folders, name), ScoringOptions()
    pipe = model.pipe
    assert pipe.transformer.use_additional_conditions == (name == "pixart_alpha_ms")
    with record_calls(model.denoiser) as ref, record_method(pipe.scheduler, "convert_model_output") as conv:
        pipe(prompt=PROMPT, height=16, width=16, num_inference_steps=2, guidance_scale=1.0, generator=gen(),
             output_type="latent", use_resolution_binning=False, clean_caption=False)
    # DPM-Solver's linspace timesteps for 2 steps are (999, 500): step 1 is the one-sample grid's t = 500.
    grid = model.grid(1, opts)
    want = ref[1].inputs
    eps, got = package_call(model, want["hidden_states"], levels_of(grid), model.encode_prompts([PROMPT], opts), opts)
    assert_same_inputs(got.inputs, want)
    _assert_vp_eps(pipe, eps, want["hidden_states"], conv[1][2], int(pipe.scheduler.timesteps[1]))


def _assert_vp_eps(pipe, eps, x_t, x0_ref, t):
    """The pipeline's scheduler turned the model output into x0_ref at step t; x_t = sqrt(ab) x0 + sqrt(1 - ab) eps."""
    ab = pipe.scheduler.alphas_cumprod[t].double()
    eps_ref = ((x_t.double() - ab.sqrt() * x0_ref.double()) / (1 - ab).sqrt()).float()
    assert torch.allclose(eps, eps_ref, atol=1e-4, rtol=1e-4), float((eps - eps_ref).abs().max())


# -- Sana -------------------------------------------------------------------------------------------------

def test_sana_matches_the_pipeline(folders):
    from diffusers import DPMSolverMultistepScheduler

    model, opts = load(folders, "sana"), ScoringOptions()
    pipe = model.pipe
    family = model.family

    def exact_time(i, inputs):
        # SanaPipeline feeds int64(sigma * 1000) * timestep_scale (DPMSolverMultistepScheduler casts its flow
        # timesteps to int64) while converting the output with the float sigma; the package feeds the float
        # level. The oracle run is given the float level too (recorded below: it differs by < 1/1000 in sigma).
        truncated.append(inputs["timestep"].clone())
        inputs["timestep"] = (pipe.scheduler.sigmas[i] * 1000 * pipe.transformer.config.timestep_scale).expand(
            inputs["timestep"].shape).to(inputs["timestep"].dtype)
        return inputs

    truncated: list[torch.Tensor] = []
    with record_calls(model.denoiser, rewrite=exact_time) as ref, \
            record_method(pipe.scheduler, "convert_model_output") as conv:
        pipe(prompt=PROMPT, height=32, width=32, num_inference_steps=2, guidance_scale=1.0, generator=gen(),
             output_type="latent", use_resolution_binning=False, clean_caption=False, complex_human_instruction=None)
    sigmas = pipe.scheduler.sigmas
    s = float(sigmas[1])
    assert torch.equal(truncated[1], torch.floor(sigmas[1].double() * 1000).float().expand_as(truncated[1])
                       * pipe.transformer.config.timestep_scale)
    # The level: the scheduler's own unshifted time, shifted by the package's flow_shift, is the pipeline's sigma.
    unshifted = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, flow_shift=1.0)
    unshifted.set_timesteps(2)
    assert shift_sigma(unshifted.sigmas[1].double(), family.flow_shift(pipe, 16)) == pytest.approx(s, abs=1e-6)
    levels = Levels(a=torch.tensor([1 - s]), b=torch.tensor([s]),
                    model_time=torch.tensor([s * family.flow_time_scale(pipe)]))
    want = ref[1].inputs
    eps, got = package_call(model, want["hidden_states"], levels, model.encode_prompts([PROMPT], opts), opts)
    assert_same_inputs(got.inputs, want, atol=1e-4)
    # With flow sigmas DPM-Solver's x0 = x - sigma v and its alpha_t = 1 - sigma, sigma_t = sigma.
    x0_ref, x_t = conv[1][2], want["hidden_states"]
    eps_ref = (x_t - (1 - s) * x0_ref) / s
    assert torch.allclose(eps, eps_ref, atol=1e-4, rtol=1e-4), float((eps - eps_ref).abs().max())


# -- DeepFloyd IF ---------------------------------------------------------------------------------------------

def _unclipped(scheduler):
    """The same scheduler without x0 clipping / dynamic thresholding (sampling-time clamps of x0, which
    the scheduler applies before returning pred_original_sample; scoring reads the raw estimate)."""
    return type(scheduler).from_config(scheduler.config, clip_sample=False, thresholding=False)


def test_if_matches_the_pipeline(folders):
    model, opts = load(folders, "if"), ScoringOptions()
    pipe = model.pipe
    pipe.scheduler = _unclipped(pipe.scheduler)
    with record_calls(model.denoiser) as ref, record_method(pipe.scheduler, "step") as steps:
        pipe(prompt=PROMPT, height=16, width=16, num_inference_steps=2, guidance_scale=1.0, generator=gen(),
             output_type="pt", clean_caption=False)
    # DDPM's leading timesteps for 2 steps are (500, 0): step 0 is the one-sample grid's t = 500.
    assert int(pipe.scheduler.timesteps[0]) == 500
    want = ref[0].inputs
    eps, got = package_call(model, want["sample"], levels_of(model.grid(1, opts)),
                            model.encode_prompts([PROMPT], opts), opts)
    assert_same_inputs(got.inputs, want)
    assert steps[0][0][0].shape[1] == 6          # the scheduler got the learned-range variance too, and split it
    _assert_vp_eps(pipe, eps, want["sample"], steps[0][2][1], 500)    # (prev_sample, pred_original_sample)


def test_if_img2img_noises_as_the_pipeline(folders):
    from diffusers import IFImg2ImgPipeline

    model, opts = load(folders, "if"), ScoringOptions()
    i2i = IFImg2ImgPipeline.from_pipe(model.pipe)
    image = torch.rand(1, 3, 16, 16, generator=gen(1)) * 2 - 1       # a tensor is taken as is, in [-1, 1]
    with record_calls(model.denoiser) as ref, record_method(i2i.scheduler, "add_noise") as noised:
        i2i(prompt=PROMPT, image=image, strength=1.0, num_inference_steps=2, guidance_scale=1.0, generator=gen(),
            output_type="pt", clean_caption=False)
    (clean, noise, timestep), _, out, _ = noised[0]
    x0 = model.encode_images(image)
    assert torch.equal(x0, clean)                                      # pixels: no encoding
    grid = model.grid(1, opts)
    assert int(timestep) == int(grid.model_time[0]) == 500
    levels = levels_of(grid)
    x_t = smath.add_noise(x0, noise, levels.a, levels.b)
    assert torch.allclose(x_t, out, atol=1e-6)
    _, got = package_call(model, x_t, levels, model.encode_prompts([PROMPT], opts), opts)
    assert_same_inputs(got.inputs, ref[0].inputs, atol=1e-5)


# -- DiT ------------------------------------------------------------------------------------------------------

def test_dit_matches_the_pipeline(folders):
    model, opts = load(folders, "dit"), ScoringOptions()
    pipe = model.pipe
    pipe.scheduler = _unclipped(pipe.scheduler)
    label = pipe.get_label_ids(["goldfish"])                           # the pipeline's own name -> id map
    with record_calls(model.denoiser) as ref, record_method(pipe.scheduler, "step") as steps:
        pipe(class_labels=label, num_inference_steps=2, guidance_scale=1.0, generator=gen(), output_type="pt")
    assert int(pipe.scheduler.timesteps[0]) == 500
    want = ref[0].inputs
    eps, got = package_call(model, want["hidden_states"], levels_of(model.grid(1, opts)),
                            model.encode_classes(["Goldfish"]), opts)
    assert_same_inputs(got.inputs, want)
    assert steps[0][0][0].shape[1] == 4          # the pipeline dropped the learned-sigma channels first
    _assert_vp_eps(pipe, eps, want["hidden_states"], steps[0][2].pred_original_sample, 500)


# -- what the package no longer borrows from diffusers' private API ------------------------------------------

@pytest.mark.parametrize("family", sorted(__import__("clip_benchmark_diffusion.registry", fromlist=["x"])
                                          .REGISTRY.families()))
def test_pipeline_signature_keys_are_diffusers_own(family):
    """load_model sorts a pipeline's __init__ arguments itself; diffusers' private _get_signature_keys is the oracle."""
    import diffusers

    from clip_benchmark_diffusion.families.model import pipeline_signature_keys

    cls = getattr(diffusers, get_family(family).pipeline)
    assert pipeline_signature_keys(cls) == tuple(cls._get_signature_keys(cls))
