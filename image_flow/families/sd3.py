"""Stable Diffusion 3 / 3.5 (StableDiffusion3Pipeline): what SD3 does differently.

    python -m image_flow --model stabilityai/stable-diffusion-3.5-medium --guidance 4.5 ...

What SD3 does differently from FLUX.1: latents stay in the VAE's layout (N, C, H/8, W/8) (the
transformer patchifies them itself); the transformer takes the timestep 1000·σ (the scheduler's
`timesteps`, float32); conditioning is CLIP-L + CLIP-G + T5 (a joint sequence and a pooled
vector); guidance is classifier-free, v_u + w·(v_c − v_u) against a negative prompt ("" by
default), on for w > 1 as in the pipeline; the σ grid is the scheduler's static shift (3.0 for
SD3.5), or a resolution-dependent one when its config asks for dynamic shifting.
"""

from .seam import Family, Guidance


class SD3(Family):
    name, pipeline, slug = "SD3", "StableDiffusion3Pipeline", "sd3"
    distilled_example = "SD3.5 Large Turbo"
    # Flow-GRPO trains SD3.5-M with CFG 4.5 (and offers a faster no-CFG variant): the default.
    guidance = Guidance(4.5, "classifier-free guidance w: v_u + w·(v_c − v_u) against "
                             "--negative-prompt, two transformer rows per sample; w <= 1 turns "
                             "it off (one row)")
    max_sequence_length = 256  # StableDiffusion3Pipeline's default T5 length
    packed = False

    def text_tokens(self, max_sequence_length):
        return 77 + max_sequence_length  # CLIP's 77 tokens, then T5's

    def encode(self, pipe, prompts, max_sequence_length):
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=pipe._execution_device,
            do_classifier_free_guidance=False, max_sequence_length=max_sequence_length)
        return list(zip(embeds, pooled))  # per prompt: CLIP-L/G ⊕ T5 (77 + S_t5, D), pooled

    def image_multiple(self, pipe):
        return pipe.vae_scale_factor * pipe.patch_size

    def check_image_size(self, pipe, height, width):
        super().check_image_size(pipe, height, width)
        cap = pipe.transformer.config.pos_embed_max_size
        if cap is not None:  # PatchEmbed crops a learned position grid of cap × cap patches
            largest = cap * self.image_multiple(pipe)
            for flag, value in (("height", height), ("width", width)):
                if value > largest:
                    raise ValueError(f"{flag} {value} is larger than this SD3 transformer takes "
                                     f"({largest}: pos_embed_max_size {cap} patches)")

    def pipeline_sigmas(self, pipe, num_steps, height, width):
        """StableDiffusion3Pipeline.__call__'s grid: the scheduler's own T steps, shifted
        statically, or by mu from the token count when the config is dynamic."""
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import (
            calculate_shift)

        sched = type(pipe.scheduler).from_config(pipe.scheduler.config)
        c, kwargs = sched.config, {}
        if c.get("use_dynamic_shifting", None):
            _, h, w = self.latent_shape(pipe, height, width)
            p = pipe.transformer.config.patch_size
            kwargs["mu"] = calculate_shift((h // p) * (w // p), c.get("base_image_seq_len", 256),
                                           c.get("max_image_seq_len", 4096),
                                           c.get("base_shift", 0.5), c.get("max_shift", 1.16))
        sched.set_timesteps(num_steps, **kwargs)
        return sched.sigmas

    def constant_inputs(self, pipe, height, width, device, dtype):
        return {"num_train_timesteps": pipe.scheduler.config.num_train_timesteps}

    def forward(self, transformer, x, sigma, rows, constant, guidance, dtype):
        embeds, pooled = rows
        # The pipeline passes the scheduler's timesteps = σ·num_train_timesteps in float32.
        timestep = sigma.float() * constant["num_train_timesteps"]
        return transformer(hidden_states=x.to(dtype), timestep=timestep,
                           encoder_hidden_states=embeds.to(dtype),
                           pooled_projections=pooled.to(dtype), return_dict=False)[0]


FAMILY = SD3()
