"""Every family beside FLUX.1 (test_image_flow.py), offline, on a tiny random pipeline built from
configs and loaded back through from_pretrained: the family's own diffusers pipeline is the
oracle for its conventions (timestep, latent layout, σ grid, conditioning, guidance form); then
LoRA and full fine-tune runs, exports that diffusers loads, resume, torchrun.
"""

import json
import math

import pytest
import torch

import g2rpo

from image_flow import families, flags, loading, trainer
from image_flow.tiny import (PIPELINES, make_tiny_flux, make_tiny_flux2_klein,
                             make_tiny_qwen_image, make_tiny_z_image)
from image_flow.prompts import PromptEncoder
from image_flow.velocity import Velocity
from test_image_flow import (H, W, assert_resume_is_bit_exact, checkpoint, parse_error,
                             train_args, two_processes)


class Case:
    """How the tests build and call one family: its tiny pipeline and text length (long enough
    that the prompts differ after the family's template; image_flow/tiny.py's PIPELINES), the
    guidance scale they train with (both rows when it has classifier-free guidance) and the
    pipeline's own guidance arguments."""

    def __init__(self, key, guidance, call, off=1.0):
        self.key, self.guidance, self.call = key, guidance, call
        self.make, self.max_len = PIPELINES[key]
        self.off = off  # a scale that turns guidance off


FAMILIES = {c.key: c for c in [
    Case("sd3", 4.5, lambda w, negative, n: {"guidance_scale": w, "negative_prompt": negative}),
    Case("qwen-image", 4.0, lambda w, negative, n: {"true_cfg_scale": w,
                                                    "negative_prompt": negative if w > 1
                                                    else None}),
    Case("flux2-klein", 4.0, lambda w, negative, n: {"guidance_scale": w}),
    # Z-Image's w = 1 is guidance on (the usual 2); off is 0.
    Case("z-image", 1.5, lambda w, negative, n: {"guidance_scale": w,  # one negative per prompt
                                                 "negative_prompt": [negative] * n},
         off=0.0),
]}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def tiny(request, tmp_path_factory):
    """(family key, saved tiny pipeline folder)."""
    return request.param, FAMILIES[request.param].make(tmp_path_factory.mktemp(request.param))


# FLUX.1 too, for the tests that every family takes (its own file: test_image_flow.py).
EVERY = {**FAMILIES, "flux": Case("flux", 3.5, lambda w, negative, n: {"guidance_scale": w})}


def case_of(pipe):
    return EVERY[families.family_of(pipe).slug]


def pipeline_call(pipe, prompts, guidance, steps=5, negative="", height=H, width=W, **kw):
    """The family's own pipeline, η = 0, latent or pt output."""
    case = case_of(pipe)
    # A copy: ZImagePipeline replaces the caller's prompts with their templated text.
    return pipe(prompt=list(prompts), generator=torch.Generator().manual_seed(0), height=height,
                width=width, num_inference_steps=steps, max_sequence_length=case.max_len,
                **case.call(guidance, negative, len(prompts)), **kw).images


def as_pipeline_latents(pipe, x, height=H, width=W):
    """Our sampler's states as the pipeline's output_type="latent" gives them: what its VAE
    decodes for FLUX.2 [klein] (unpacked, denormalised, unpatchified), the state itself for
    the others."""
    family = families.family_of(pipe)
    return family.to_vae(pipe, x, height, width) if family.slug == "flux2-klein" else x


def ours(pipe, prompts, guidance, steps=5, negative="", height=H, width=W, dtype=torch.float32,
         **options):
    """Our η = 0 sampler (g2rpo.ode_step) on the pipeline's own σ grid, its states as the
    pipeline's latents, and the images."""
    velocity = Velocity.from_pipe(pipe.transformer, pipe, height, width, guidance, dtype,
                                  guidance_options=options)
    encoder = PromptEncoder(pipe, case_of(pipe).max_len,
                            negative if velocity.needs_uncond else None)
    x, images = trainer.sample(pipe, velocity, encoder, prompts, height, width,
                               trainer.sigma_grid(pipe, steps, height, width, "pipeline"),
                               torch.Generator().manual_seed(0))
    return as_pipeline_latents(pipe, x, height, width), images


# ----------------------------------------------------------------------------------------------
# The seam says what a family answers, and a family answers nothing else.


def test_the_seam_lists_every_question_and_each_family_answers_only_those():
    from image_flow.families import seam

    doc = seam.__doc__
    for cls in (seam.Family, seam.Guidance):
        asked = {n for n in dir(cls) if not n.startswith("_")}
        assert asked, cls
        assert not [n for n in asked if n not in doc], f"{cls.__name__}: not in the docstring"
    questions = set(dir(seam.Family)) | {"encode", "forward"}  # no default for these two
    assert "encode" in doc and "forward" in doc
    for family in families.all_families():
        own = {n for n in vars(type(family)) if not n.startswith("_")}
        assert {"encode", "forward"} <= own <= questions, (family.name, own - questions)
        extra = {n for n in vars(type(family.guidance)) if not n.startswith("_")}
        assert extra <= set(dir(seam.Guidance)), (family.name, extra)


# ----------------------------------------------------------------------------------------------
# The pipeline is the oracle.


@pytest.mark.parametrize("cfg", [False, True], ids=["no-guidance", "guidance"])
@pytest.mark.parametrize("dynamic_shift", [False, True], ids=["static-shift", "dynamic-shift"])
def test_eta_zero_sampler_equals_the_family_pipeline(tmp_path, cfg, dynamic_shift):
    for key, case in FAMILIES.items():
        pipe = loading.load_pipeline(case.make(tmp_path / key, dynamic_shift=dynamic_shift))
        w = case.guidance if cfg else case.off
        assert families.family_of(pipe).guidance.needs_uncond(w) == cfg
        prompts = ["a red fox", "a lighthouse in a storm"]
        latents, images = ours(pipe, prompts, w)
        ref = pipeline_call(pipe, prompts, w, output_type="latent")
        torch.testing.assert_close(latents, ref.float(), rtol=1e-4, atol=1e-5)
        ref_images = pipeline_call(pipe, prompts, w, output_type="pt")
        torch.testing.assert_close(images, ref_images.float(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("key", sorted(EVERY))
def test_the_oracle_holds_at_non_square_sizes(tmp_path, key):
    """H ≠ W: position ids, packing, the VAE's layout and the σ grid's token count."""
    case = EVERY[key]
    pipe = loading.load_pipeline(case.make(tmp_path / key))
    prompts = ["a red fox", "a lighthouse in a storm"]
    for h, w in ((32, 64), (64, 32)):
        latents, images = ours(pipe, prompts, case.guidance, height=h, width=w)
        ref = pipeline_call(pipe, prompts, case.guidance, height=h, width=w, output_type="latent")
        torch.testing.assert_close(latents, ref.float(), rtol=1e-4, atol=1e-5)
        ref_images = pipeline_call(pipe, prompts, case.guidance, height=h, width=w,
                                   output_type="pt")
        assert images.shape[-2:] == (h, w)
        torch.testing.assert_close(images, ref_images.float(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("key", sorted(EVERY))
def test_the_transformer_gets_the_pipelines_timestep_in_bf16(tmp_path, key):
    """In bf16 the timestep's rounding is part of the convention (1000·σ in the latents' dtype
    for the FLUX-like families; float32 for SD3 and Z-Image): what the transformer receives at
    every step is the pipeline's, bit for bit, in its dtype."""
    case = EVERY[key]
    pipe = loading.load_pipeline(case.make(tmp_path / key), dtype=torch.bfloat16)
    seen = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs["timestep"] if "timestep" in kwargs
                                            else args[1]), with_kwargs=True)
    pipeline_call(pipe, ["a red fox"], case.off, steps=6, output_type="latent")
    theirs = [t.clone() for t in seen]
    seen.clear()
    ours(pipe, ["a red fox"], case.off, steps=6, dtype=torch.bfloat16)
    hook.remove()
    assert len(theirs) == len(seen) == 6
    for a, b in zip(theirs, seen):
        assert a.dtype == b.dtype and torch.equal(a.flatten(), b.flatten()), (a, b)
    assert any(t.dtype == torch.bfloat16 for t in seen) == (key not in ("sd3", "z-image"))


# Scheduler settings like the released checkpoints' scheduler_config.json: Qwen-Image's
# exponential time shift with shift_terminal, FLUX.2 [klein]'s empirical mu (the pipeline's,
# whatever the config's shifts), SD3.5's and Z-Image-Turbo's static shift 3, FLUX.1-dev's
# dynamic one.
RELEASED_SCHEDULERS = {
    "qwen-image": dict(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192,
                       max_shift=0.9, shift=1.0, shift_terminal=0.02,
                       time_shift_type="exponential", use_dynamic_shifting=True),
    "flux2-klein": dict(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096,
                        max_shift=1.15, shift=3.0, time_shift_type="exponential",
                        use_dynamic_shifting=True),
    "sd3": dict(shift=3.0),
    "z-image": dict(shift=3.0, use_dynamic_shifting=False),
    "flux": dict(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15,
                 shift=3.0, use_dynamic_shifting=True),
}


@pytest.mark.parametrize("key", sorted(EVERY))
def test_sigma_grids_with_the_released_scheduler_settings(tmp_path, key):
    from diffusers import FlowMatchEulerDiscreteScheduler

    case = EVERY[key]
    pipe = loading.load_pipeline(case.make(tmp_path / key))
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(**RELEASED_SCHEDULERS[key])
    for steps, (h, w) in ((4, (32, 32)), (16, (32, 64)), (28, (64, 64))):
        pipeline_call(pipe, ["a red fox"], case.off, steps=steps, height=h, width=w,
                      output_type="latent")
        ref = pipe.scheduler.sigmas.float()
        torch.testing.assert_close(trainer.sigma_grid(pipe, steps, h, w, "pipeline"), ref,
                                   rtol=0, atol=1e-6)
        if key == "qwen-image":  # shift_terminal: the last σ before 0 is 0.02
            assert ref[-2].item() == pytest.approx(0.02)


def test_a_distilled_klein_is_sampled_as_its_pipeline_samples_it(tmp_path, tiny_clip):
    """A step-distilled FLUX.2 [klein] (is_distilled): the recipe it gets (4 steps on the
    pipeline's grid, guidance off) is the pipeline's own sampling, latents and images."""
    folder = make_tiny_flux2_klein(tmp_path / "klein", distilled=True)
    args = flags.parse_args(["--model", folder, "--clip-model", tiny_clip, "--output-dir",
                             str(tmp_path / "out")])
    assert (args.recipe, args.steps, args.schedule, args.guidance, args.eval_steps,
            args.branch_steps) == ("distilled", 4, "pipeline", 1.0, 4, (0, 1))
    pipe = loading.load_pipeline(folder)
    prompts = ["a red fox", "a lighthouse in a storm"]
    latents, images = ours(pipe, prompts, args.guidance, steps=args.steps)
    ref = pipeline_call(pipe, prompts, 1.0, steps=4, output_type="latent")
    torch.testing.assert_close(latents, ref.float(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(images, pipeline_call(pipe, prompts, 1.0, steps=4,
                                                     output_type="pt").float(),
                               rtol=1e-4, atol=1e-5)


def test_the_oracle_catches_a_wrong_guidance_form_or_timestep(tiny, monkeypatch):
    """Another family's guidance form (Z-Image's pos + w·(pos − neg); SD3's for Z-Image) or
    timestep (1 − σ; σ for Z-Image) in place of this family's: the comparison above fails."""
    key, folder = tiny
    pipe = loading.load_pipeline(folder)
    family, guidance = families.family_of(pipe), FAMILIES[key].guidance
    prompts = ["a red fox"]
    ref = pipeline_call(pipe, prompts, guidance, output_type="latent").float()
    torch.testing.assert_close(ours(pipe, prompts, guidance)[0], ref, rtol=1e-4, atol=1e-5)
    with monkeypatch.context() as m:
        wrong = ((lambda self, c, u, w, sigma, **o: u + w * (c - u)) if key == "z-image" else
                 (lambda self, c, u, w, sigma, **o: c + w * (c - u)))
        m.setattr(type(family.guidance), "combine", wrong)
        assert (ours(pipe, prompts, guidance)[0] - ref).abs().max() > 1e-3
    forward = type(family).forward
    with monkeypatch.context() as m:  # Z-Image's convention, 1 − σ, in place of this family's
        m.setattr(type(family), "forward",
                  lambda self, t, x, sigma, *a: forward(self, t, x, 1 - sigma, *a))
        assert (ours(pipe, prompts, guidance)[0] - ref).abs().max() > 1e-3
    if not family.guidance.negative_prompt:
        return
    # The negative prompt is the unconditional row's.
    other = pipeline_call(pipe, prompts, guidance, output_type="latent",
                          negative="blurry").float()
    torch.testing.assert_close(ours(pipe, prompts, guidance, negative="blurry")[0], other,
                               rtol=1e-4, atol=1e-5)
    assert (other - ref).abs().max() > 1e-4


@pytest.mark.parametrize("negative", ["", "blurry"])
def test_flux1_true_cfg_is_the_pipelines(tmp_path, negative):
    """FLUX.1's optional true CFG beside the distilled embedding: FluxPipeline's true_cfg_scale
    with a negative prompt, the two rows in one call."""

    pipe = loading.load_pipeline(make_tiny_flux(tmp_path / "flux"))
    prompts = ["a red fox", "a lighthouse in a storm"]
    ref = pipe(prompt=list(prompts), negative_prompt=[negative] * 2, true_cfg_scale=2.5,
               guidance_scale=3.5, generator=torch.Generator().manual_seed(0), height=H,
               width=W, num_inference_steps=5, max_sequence_length=16, output_type="latent")
    velocity = Velocity.from_pipe(pipe.transformer, pipe, H, W, 3.5,
                                  guidance_options={"true_cfg": 2.5})
    assert velocity.needs_uncond
    ours_, _ = trainer.sample(pipe, velocity, PromptEncoder(pipe, 16, negative),
                              prompts, H, W, trainer.sigma_grid(pipe, 5, H, W, "pipeline"),
                              torch.Generator().manual_seed(0))
    torch.testing.assert_close(ours_, ref.images.float(), rtol=1e-4, atol=1e-5)
    assert (plain_latents(pipe, prompts) - ref.images).abs().max() > 1e-4


def plain_latents(pipe, prompts):
    return pipe(prompt=list(prompts), guidance_scale=3.5, height=H, width=W,
                generator=torch.Generator().manual_seed(0), num_inference_steps=5,
                max_sequence_length=16, output_type="latent").images


def test_flux1_trains_with_true_cfg(tiny_flux, tiny_clip, tmp_path, capsys):
    history, _ = trainer.main(train_args(tiny_flux, tiny_clip, tmp_path, "--iterations", "1",
                                         "--lora-rank", "4", "--true-cfg", "2",
                                         "--negative-prompt", "blurry"))
    assert "guidance 3.5, true CFG 2 (2 transformer rows per sample)" in capsys.readouterr().out
    assert history[0]["ratio_dev_first"] < 1e-5 and math.isfinite(history[0]["loss"])
    fingerprint = checkpoint(tmp_path / "checkpoint")["fingerprint"]
    assert fingerprint["true_cfg"] == 2 and fingerprint["negative_prompt"] == "blurry"



@pytest.mark.parametrize("options", [{"cfg_normalization": 1.0}, {"cfg_truncation": 0.3},
                                     {"cfg_normalization": 1.05, "cfg_truncation": 0.5}])
def test_z_image_norm_clamp_and_truncation_are_the_pipelines(tmp_path, options):
    pipe = loading.load_pipeline(make_tiny_z_image(tmp_path / "z"))
    prompts = ["a red fox", "a lighthouse in a storm"]
    ref = pipeline_call(pipe, prompts, 2.0, output_type="latent", **options).float()
    torch.testing.assert_close(ours(pipe, prompts, 2.0, **options)[0], ref, rtol=1e-4,
                               atol=1e-5)
    assert (ours(pipe, prompts, 2.0)[0] - ref).abs().max() > 1e-4  # the options do something


def test_guidance_rows_go_through_the_transformer_in_one_call(tiny):
    key, folder = tiny
    pipe = loading.load_pipeline(folder)
    calls = []
    hook = pipe.transformer.register_forward_hook(
        lambda m, args, kwargs, out: calls.append(len(kwargs.get("hidden_states", args[:1] and
                                                                 args[0]))),
        with_kwargs=True)
    ours(pipe, ["a cat", "a dog", "a fox"], FAMILIES[key].guidance, steps=3)
    assert calls == [6, 6, 6]  # 3 prompts × (conditional, unconditional), once per step
    calls.clear()
    ours(pipe, ["a cat", "a dog", "a fox"], FAMILIES[key].off, steps=3)
    assert calls == [3, 3, 3]  # guidance off: one row per sample
    hook.remove()


def test_image_size_and_guidance_are_checked(tiny, tiny_clip, tmp_path, capsys):

    key, folder = tiny
    if key == "sd3":  # refused before any weights load, from the configs alone
        assert "--width 144 is larger than this SD3 transformer takes (128" in parse_error(
            family_args(folder, tiny_clip, tmp_path / "out", key, "--width", "144"), capsys)
    pipe = loading.load_pipeline(folder)
    multiple = families.family_of(pipe).image_multiple(pipe)
    with pytest.raises(ValueError, match=f"height must be a positive multiple of {multiple}"):
        trainer.latent_shape(pipe, H + multiple // 2, W)
    if type(pipe).__name__ == "StableDiffusion3Pipeline":  # 8 patches × 2 × 8 = 128 at most
        with pytest.raises(ValueError, match="width 144 is larger than this SD3 transformer"):
            trainer.latent_shape(pipe, H, 144)


def test_a_guidance_scale_the_checkpoint_cannot_take_is_refused_before_loading(tmp_path,
                                                                               tiny_clip, capsys):

    schnell_like = make_tiny_flux(tmp_path / "flux", guidance_embeds=False)
    args = train_args(schnell_like, tiny_clip, tmp_path / "out", "--iterations", "1")
    assert ("--guidance 3.5: this FLUX.1 checkpoint has no guidance embedding" in
            parse_error(args + ["--guidance", "3.5"], capsys))
    assert ("--cfg-normalization is not an option of FLUX.1's guidance" in
            parse_error(args + ["--cfg-normalization", "1.5"], capsys))
    assert "--true-cfg must be >= 0 and finite, got nan" in parse_error(
        args + ["--true-cfg", "nan"], capsys)
    # A step-distilled FLUX.2 [klein]: its pipeline ignores guidance; off by default here.
    distilled = make_tiny_flux2_klein(tmp_path / "klein", distilled=True)
    args = train_args(distilled, tiny_clip, tmp_path / "out", "--iterations", "1")
    assert "this FLUX.2 [klein] checkpoint is step-distilled" in parse_error(
        args + ["--guidance", "4"], capsys)
    assert flags.parse_args(args).guidance == 1.0
    assert flags.parse_args(args + ["--guidance", "1"]).guidance == 1.0
    assert not (tmp_path / "out").exists()


def test_the_recipe_follows_what_the_checkpoint_declares(tmp_path, tiny_clip):
    from image_flow.tiny import make_tiny_sd3

    def parsed(folder, *extra):
        return flags.parse_args(["--model", folder, "--clip-model", tiny_clip, "--output-dir",
                                 str(tmp_path / "out"), "--height", "32", "--width", "32",
                                 *extra])

    def recipe(a):
        return a.recipe, a.steps, a.schedule, a.guidance, a.eval_steps, a.branch_steps

    paper = tuple(range(8))  # T = 16: branch steps 0..7, the paper's
    klein = parsed(make_tiny_flux2_klein(tmp_path / "klein"))
    assert recipe(klein) == ("base", 16, "static", 4.0, 50, paper)
    assert klein.recipe_reason == "model_index.json: is_distilled false"
    distilled = make_tiny_flux2_klein(tmp_path / "klein-4b", distilled=True)
    assert recipe(parsed(distilled)) == ("distilled", 4, "pipeline", 1.0, 4, (0, 1))
    assert parsed(distilled).recipe_reason == "model_index.json: is_distilled true"
    dev = parsed(make_tiny_flux(tmp_path / "dev"))
    assert recipe(dev) == ("base", 16, "static", 3.5, 28, paper)
    schnell = parsed(make_tiny_flux(tmp_path / "schnell", guidance_embeds=False))
    assert recipe(schnell)[:3] == ("distilled", 4, "pipeline") and schnell.eval_steps == 4
    assert schnell.recipe_reason == ("scheduler/scheduler_config.json: use_dynamic_shifting "
                                     "false, shift 1, as the timestep-distilled FLUX.1-schnell")
    assert schnell.max_sequence_length == 256  # schnell's text length, not dev's 512
    assert dev.max_sequence_length == 512
    # FLUX.1 on a static shifted grid: neither dev's nor schnell's, so nothing is declared.
    static = parsed(make_tiny_flux(tmp_path / "static", dynamic_shift=False))
    assert recipe(static) == ("base", 16, "static", 3.5, 28, paper)
    assert static.recipe_reason.endswith("neither FLUX.1-dev's grid nor FLUX.1-schnell's; "
                                         "assumed a base model: give --recipe distilled if it "
                                         "is step-distilled")
    # Nothing declares it: the base recipe, and the reason says it was assumed and what to give.
    sd3 = make_tiny_sd3(tmp_path / "sd3")
    assert recipe(parsed(sd3)) == ("base", 16, "static", 4.5, 28, paper)
    assert parsed(sd3).recipe_reason == (
        "nothing in a StableDiffusion3Pipeline checkpoint declares whether it is step-distilled; "
        "assumed a base model: give --recipe distilled if it is step-distilled, as SD3.5 Large "
        "Turbo is")
    assert recipe(parsed(sd3, "--recipe", "distilled")) == ("distilled", 4, "pipeline", 1.0, 4,
                                                           (0, 1))
    z = make_tiny_z_image(tmp_path / "z")
    assert recipe(parsed(z)) == ("base", 16, "static", 5.0, 50, paper)  # ZImagePipeline's 5
    assert recipe(parsed(z, "--recipe", "distilled")) == ("distilled", 8, "pipeline", 0.0, 8,
                                                         (0, 1, 2, 3))
    # --steps alone picks its own branch steps; what is given wins.
    assert recipe(parsed(sd3, "--steps", "8")) == ("base", 8, "static", 4.5, 28, (0, 1, 2, 3))
    assert recipe(parsed(distilled, "--steps", "6", "--eval-steps", "2", "--branch-steps",
                         "1")) == ("distilled", 6, "pipeline", 1.0, 2, (1,))


def test_every_recipe_takes_distinct_granularities_and_is_shown_before_any_weights_load(
        tmp_path, tiny_clip, capsys, monkeypatch):
    # Each family's base and distilled recipe (T = 16, 8 or 4): the default granularities never
    # repeat one another's completion (g2rpo.Config refuses that), and at T = 4 the line says
    # which were dropped and why.
    for key, case in EVERY.items():
        folder = case.make(tmp_path / key)
        for recipe in ("base", "distilled"):
            args = flags.parse_args(["--model", folder, "--clip-model", tiny_clip, "--recipe",
                                     recipe, "--output-dir", str(tmp_path / "out"), "--height",
                                     "32", "--width", "32"])
            assert g2rpo.repeated_granularity(args.steps, args.branch_steps,
                                              args.granularities) is None, (key, recipe)
            out = capsys.readouterr().out
            assert out.startswith(f"recipe {recipe} (") and (
                f"granularities {flags.csv(args.granularities)}") in out, out
            assert f"T = {args.steps} on the" in out and f"text {args.max_sequence_length} " \
                "tokens; evaluation: " in out
            if args.steps == 4:
                assert args.granularities == (1,) and "(2,3 would repeat its completions at " \
                    "T = 4)" in out, out
            else:
                assert args.granularities == (1, 2, 3)
    # Given granularities that repeat one another are refused, with the ones that would do.
    assert ("--granularities: granularities 1 and 2 finish branch step 1 on the same grid points "
            "[2, 3, 4] at T = 4") in parse_error(["--model", folder, "--clip-model", tiny_clip,
                                                  "--recipe", "distilled", "--steps", "4",
                                                  "--granularities", "1,2", "--height", "32",
                                                  "--width", "32"], capsys)
    # The line is printed when the flags are checked: before any weights load.
    def not_yet(*a, **k):
        raise RuntimeError("weights would load here")

    monkeypatch.setattr(trainer, "load_pipeline", not_yet)
    with pytest.raises(RuntimeError, match="weights would load here"):
        trainer.main(["--model", folder, "--clip-model", tiny_clip, "--output-dir",
                      str(tmp_path / "run"), "--height", "32", "--width", "32"])
    assert "recipe base (" in capsys.readouterr().out


def test_flux1_edges_guidance_before_the_transformer_config_and_schnells_log(
        tmp_path, tiny_clip, capsys, monkeypatch):
    import huggingface_hub

    from test_rewards import in_hub_cache

    dev = make_tiny_flux(tmp_path / "dev")
    # A Hub checkpoint whose model_index.json is in the cache but not yet its transformer's
    # config: the guidance check is not made on an empty config ("no guidance embedding"); the
    # file is named instead.
    in_hub_cache(tmp_path / "hub", "org/flux", {"model_index.json": f"{dev}/model_index.json"})
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    argv = ["--model", "org/flux", "--clip-model", tiny_clip, "--guidance", "3.5"]
    err = parse_error(argv, capsys)
    assert "no guidance embedding" not in err
    assert ("transformer/config.json of 'org/flux' is not in the Hugging Face cache and "
            "HF_HUB_OFFLINE is set") in err
    # One default output directory, whatever the checkpoint's name: runs/<family>; for a Hub id
    # whose configs are not in the cache yet too (fetched, a few KB, before anything loads).
    monkeypatch.chdir(tmp_path)
    assert flags.parse_args(["--model", dev, "--clip-model", tiny_clip]).output_dir == "runs/flux"
    fetched = []
    with monkeypatch.context() as online:
        online.setattr("huggingface_hub.hf_hub_download",
                       lambda repo, name, **k: fetched.append(name) or f"{dev}/{name}")
        assert flags.parse_args(["--model", "org/not-cached", "--clip-model", tiny_clip,
                                 "--plan"]).output_dir == "runs/flux"
    assert "model_index.json" in fetched and "transformer/config.json" in fetched
    # A checkpoint without a guidance embedding (FLUX.1-schnell) is not logged with one.
    schnell = make_tiny_flux(tmp_path / "schnell", guidance_embeds=False)
    capsys.readouterr()
    trainer.main(train_args(schnell, tiny_clip, tmp_path / "run", "--iterations", "1",
                            "--lora-rank", "4"))
    out = capsys.readouterr().out
    assert "no guidance embedding (1 transformer row per sample)" in out
    assert "guidance 3.5" not in out
    assert ("recipe distilled (scheduler/scheduler_config.json: use_dynamic_shifting false, "
            "shift 1, as the timestep-distilled FLUX.1-schnell)") in out


def test_gradient_checkpointing_defaults_per_family_and_can_be_turned_off(tmp_path, tiny_clip):
    qwen = make_tiny_qwen_image(tmp_path / "qwen")
    base = ["--model", qwen, "--clip-model", tiny_clip, "--height", "32", "--width", "32",
            "--output-dir", str(tmp_path / "out")]
    assert flags.parse_args(base).gradient_checkpointing is True
    assert flags.parse_args(base + ["--no-gradient-checkpointing"]).gradient_checkpointing is False
    flux = flags.parse_args(base[2:] + ["--model", make_tiny_flux(tmp_path / "flux")])
    assert flux.gradient_checkpointing is False


def test_abbreviated_flags_are_refused(tiny_flux, tiny_clip, tmp_path, capsys):
    """A prefix of a flag is not that flag (a typo could otherwise pick another one)."""
    args = train_args(tiny_flux, tiny_clip, tmp_path, "--iterations", "1")
    assert "unrecognized arguments: --iter 1" in parse_error(
        [a for a in args if a not in ("--iterations", "1")] + ["--iter", "1"], capsys)
    assert "unrecognized arguments: --cfg 2" in parse_error(args + ["--cfg", "2"], capsys)
    assert not (tmp_path / "checkpoint").exists()


# ----------------------------------------------------------------------------------------------
# Training through the shared trainer.


def family_args(folder, clip, out, key, *extra):
    case = EVERY[key]
    return train_args(folder, clip, out, "--guidance", str(case.guidance),
                      "--max-sequence-length", str(case.max_len), *extra)


@pytest.mark.parametrize("lora_rank", ["4", "0"], ids=["lora", "full"])
def test_a_short_run_trains_with_guidance_rows(tiny, tiny_clip, tmp_path, lora_rank, capsys):
    key, folder = tiny
    history, evals = trainer.main(family_args(folder, tiny_clip, tmp_path, key, "--iterations",
                                              "2", "--lora-rank", lora_rank, "--eval"))
    out = capsys.readouterr().out
    assert "(2 transformer rows per sample)" in out
    # Qwen-Image (20 B parameters) recomputes activations by default; the others store them.
    assert (", gradient checkpointing)" in out) == (key == "qwen-image")
    for m in history:
        for k in ("reward", "reward_std", "loss", "clip_frac", "approx_kl", "grad_norm"):
            assert math.isfinite(m[k]), (k, m[k])
        assert m["ratio_dev_first"] < 1e-5  # log π_old and log π: the same guided velocity
    assert history[0]["reward_std"] > 0  # rewards computed on decoded images, and they differ
    assert [e["iteration"] for e in evals] == [0, 2]
    saved = checkpoint(tmp_path / "checkpoint")
    original = dict(loading.load_pipeline(folder).transformer.named_parameters())
    if lora_rank == "4":
        assert saved["model"] and all("lora" in k for k in saved["model"])
        assert any(v.abs().max() > 0 for k, v in saved["model"].items() if "lora_B" in k)
    else:
        assert set(saved["model"]) == set(original)
        assert any(not torch.equal(v, original[k]) for k, v in saved["model"].items())
    assert saved["fingerprint"]["guidance"] == FAMILIES[key].guidance


def trained(folder, ckpt, lora_rank):
    pipe = loading.load_pipeline(folder)
    trainer.setup_trainable(pipe.transformer, lora_rank, max(lora_rank, 1),
                            lora_targets=families.family_of(pipe).lora_targets)
    assert not pipe.transformer.load_state_dict(checkpoint(ckpt)["model"],
                                                strict=False).unexpected_keys
    return pipe


def assert_same_samples(loaded, rebuilt, base, guidance):
    """The pipeline loaded from the export samples (through its own __call__) what our sampler
    gives with the trained weights, and not what the base model gives."""
    prompts = ["a red fox", "a lighthouse"]
    ref = pipeline_call(loaded, prompts, guidance, output_type="latent").float()
    torch.testing.assert_close(ours(rebuilt, prompts, guidance)[0], ref, rtol=1e-4, atol=1e-5)
    assert (ours(base, prompts, guidance)[0] - ref).abs().max() > 1e-6


def test_exported_lora_loads_with_the_pipelines_load_lora_weights(tiny, tiny_clip, tmp_path):
    key, folder = tiny
    trainer.main(family_args(folder, tiny_clip, tmp_path, key, "--iterations", "1",
                             "--lora-rank", "4", "--lr", "3e-2"))
    loaded = loading.load_pipeline(folder)
    loaded.load_lora_weights(str(tmp_path / "lora"))
    assert_same_samples(loaded, trained(folder, tmp_path / "checkpoint", 4),
                        loading.load_pipeline(folder), FAMILIES[key].guidance)


def test_exported_full_transformer_loads_with_the_familys_transformer_class(tiny, tiny_clip,
                                                                            tmp_path):
    import diffusers

    key, folder = tiny
    trainer.main(family_args(folder, tiny_clip, tmp_path, key, "--iterations", "1",
                             "--lora-rank", "0"))
    index = json.loads((tmp_path / "transformer" / "config.json").read_text())
    cls = getattr(diffusers, index["_class_name"])
    loaded = loading.load_pipeline(folder)
    loaded.transformer = cls.from_pretrained(str(tmp_path / "transformer")).eval()
    assert_same_samples(loaded, trained(folder, tmp_path / "checkpoint", 0),
                        loading.load_pipeline(folder), FAMILIES[key].guidance)


def test_resume_is_bit_exact(tiny, tiny_clip, tmp_path):
    key, folder = tiny
    case = FAMILIES[key]
    assert_resume_is_bit_exact(folder, tiny_clip, tmp_path, "--guidance", str(case.guidance),
                               "--max-sequence-length", str(case.max_len), "--lora-rank", "0",
                               "--kl-beta", "0.1")


def test_resume_with_another_guidance_or_negative_prompt_is_refused(tiny, tiny_clip, tmp_path,
                                                                    capsys):
    key, folder = tiny
    args = family_args(folder, tiny_clip, tmp_path, key, "--iterations", "1", "--lora-rank", "4")
    trainer.main(args)
    capsys.readouterr()
    resume = ["--iterations", "2", "--resume", str(tmp_path / "checkpoint")]
    takes_negative = families.family_of(loading.load_pipeline(folder)).guidance.negative_prompt
    for extra, message in ((["--guidance", "2"], "differs in: guidance"),
                           (["--negative-prompt", "blurry"], "differs in: negative_prompt"
                            if takes_negative else "--negative-prompt: FLUX.2 [klein]'s "
                            "pipeline takes none")):
        with pytest.raises(SystemExit):
            trainer.main(args + extra + resume)
        assert message in capsys.readouterr().err


# Every family on two processes with DDP and LoRA (two_processes: torchrun's launcher, forked);
# FSDP2's full fine-tune for Qwen-Image, whose last block's text-stream weights never get a
# gradient, the case DDP must be told about.
TWO_PROCESSES = [(key, "4") for key in sorted(EVERY)] + [("qwen-image", "0")]


@pytest.mark.parametrize("key, lora_rank", TWO_PROCESSES, ids=[
    f"{k}-{'ddp-lora' if r == '4' else 'fsdp2-full'}" for k, r in TWO_PROCESSES])
def test_two_processes_keep_ranks_identical(key, lora_rank, tiny_clip, tmp_path):
    folder, out = EVERY[key].make(tmp_path / key), tmp_path / "run"
    two_processes(family_args(folder, tiny_clip, out, key, "--iterations", "2", "--lora-rank",
                              lora_rank), tmp_path)
    sums = json.loads((out / "rank_checksums.json").read_text())
    assert len(sums) == 2 and sums[0] == sums[1]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["iteration"] for m in metrics] == [0, 1]
    assert all(math.isfinite(m["loss"]) and m["ratio_dev_first"] < 1e-5 for m in metrics)
    assert len(sorted((out / "checkpoint").glob("*.distcp"))) == 2


# ----------------------------------------------------------------------------------------------
# The benchmark takes every family.


@pytest.mark.parametrize("name", ["sd3.5-medium", "qwen-image", "flux2-klein-4b",
                                  "z-image-turbo"])
def test_the_benchmark_runs_each_family_tiny(name, capsys):
    from benchmarks import image_iteration

    image_iteration.main(["--tiny", "--family", name, "--batches", "1,2", "--repeats", "1",
                          "--group-size", "2", "--skip-loop"])
    out = capsys.readouterr().out
    assert f"{name} transformer (tiny)" in out and "batched iteration (G=2" in out
    assert "train row (1)" in out


def test_the_benchmark_counts_each_familys_real_size_flops(capsys):
    from benchmarks import image_iteration

    image_iteration.main(["--flops"])
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[1:]}
    assert set(rows) == set(image_iteration.ARCHS)
    # FLUX.1-dev: 11.9 B parameters, 21.5 TFLOPs per row at 512² (the figure of the H200 page).
    assert rows["flux.1-dev"][1:3] == ["11.9", "B"] and rows["flux.1-dev"][3] == "21.5"
    for name, cells in rows.items():  # 4× the image tokens (the text's stay): > 3× the work
        small, large = float(cells[3]), float(cells[5])
        assert 3 * small < large < 5 * small, (name, cells)


# ----------------------------------------------------------------------------------------------
# The smoke test a user runs after installing.


def test_the_smoke_test_builds_a_tiny_pipeline_and_trains_on_it(tmp_path, capsys):
    from image_flow import tiny

    assert set(tiny.PIPELINES) == {f.slug for f in families.all_families()}  # every family
    tiny.main(["sd3", str(tmp_path), "--train"])
    out = capsys.readouterr().out
    assert f"python -m image_flow --model {tmp_path / 'sd3'}" in out
    assert "SD3 (StableDiffusion3Pipeline); 1 process(es)" in out
    run = tmp_path / "runs" / "sd3"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1]
    assert all(math.isfinite(r["reward"]) for r in rows)
    assert (run / "lora" / "pytorch_lora_weights.safetensors").is_file()



# ----------------------------------------------------------------------------------------------
# The memory benchmarks.


def test_the_memory_plan_of_released_checkpoints_counts_their_text_encoders(capsys):
    """SD3.5's text encoders, built from the hyper-parameters written in the benchmark, have the
    published sizes: CLIP-L 123 M + CLIP-G 695 M + T5-XXL encoder 4.76 B parameters, 11.2 GB in
    bf16."""
    from benchmarks import memory_plan

    (row,) = memory_plan.main(["--checkpoints", "SD3.5-Medium"])
    name, transformer, encoders, lora, lora_setup, full, full_setup, prompt = row
    assert prompt == ((77 + 256) * 4096 + 2048) * 2  # CLIP's 77 and T5's 256 tokens, pooled
    assert encoders / 2 == pytest.approx(0.123e9 + 0.695e9 + 4.76e9, rel=0.01)
    assert transformer / 2 == pytest.approx(2.24e9, rel=0.01)  # the FLOPs table's count
    assert lora < lora_setup and full < full_setup  # the text encoders are freed
    assert "SD3.5-Medium" in capsys.readouterr().out


def test_the_prompt_cache_benchmark_reads_what_it_encoded(tmp_path):
    from benchmarks import prompt_cache

    folder = make_tiny_flux(tmp_path / "flux")
    disk = prompt_cache.child("disk", 6, folder, str(tmp_path / "cache"))
    memory = prompt_cache.child("memory", 6, folder, str(tmp_path / "cache"))
    assert (disk["encoded"], memory["encoded"]) == (6, 0)
    assert disk["row_kb"] == pytest.approx(512 * 32 * 4 / 1024 + 32 * 4 / 1024)
