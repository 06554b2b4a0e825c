"""FLUX.1 (FluxPipeline) for the shared image trainer: what FLUX.1 does differently.

    python flux_flow.py --model black-forest-labs/FLUX.1-dev ...   # = python image_flow.py ...

Latents are packed: 2×2 patches of the VAE latent become (N, S, 4·C) tokens with position ids;
the transformer takes σ (as 1000·σ rounded to the compute dtype, then / 1000) and, in the
guidance-distilled checkpoints (FLUX.1-dev), the guidance scale as an embedding; the pipeline's
optional true CFG (--true-cfg s > 1) adds an unconditional row for --negative-prompt,
v_u + s·(v_c − v_u). The σ grid of FluxPipeline shifts with the image size.

The trainer's names (main, load_pipeline, sample, PromptEncoder …) are reachable from here too,
so `flux_flow.main(argv)` and `python flux_flow.py` keep working.
"""

import torch

from families import DEFAULT_ATTENTION, Family, Velocity, rounded_timestep

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                "to_add_out"]


class Flux1(Family):
    name, pipeline, slug = "FLUX.1", "FluxPipeline", "flux"
    lora_targets = tuple(LORA_TARGETS)
    guidance = 3.5
    guidance_help = ("the distilled guidance embedding (FLUX.1-dev; FLUX.1-schnell has none), one "
                     "transformer row per sample (--true-cfg adds a second)")

    guidance_options = ("true_cfg",)  # FluxPipeline's true_cfg_scale, besides the embedding

    def uses_negative(self, guidance, true_cfg=1.0):
        return true_cfg > 1  # the pipeline's do_true_cfg (with a negative prompt: ours)

    def guide(self, v_cond, v_uncond, guidance, sigma, true_cfg=1.0):
        return v_uncond + true_cfg * (v_cond - v_uncond)

    def check_guidance(self, index, transformer_config, guidance):
        if guidance is not None and not transformer_config.get("guidance_embeds", False):
            raise ValueError(f"--guidance {guidance:g}: this FLUX.1 checkpoint has no guidance "
                             f"embedding (guidance_embeds is false); leave --guidance out")

    def encode(self, pipe, prompts, max_sequence_length):
        embeds, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None,
                                               device=pipe._execution_device,
                                               max_sequence_length=max_sequence_length)
        return list(zip(embeds, pooled))  # per prompt: T5 (S_txt, D_txt), CLIP pooled (D_pool,)

    def noise(self, pipe, n, height, width, dtype, generator):
        x, _ = pipe.prepare_latents(n, pipe.transformer.config.in_channels // 4, height, width,
                                    dtype, pipe.transformer.device, generator)
        return x  # already packed

    def constant_inputs(self, pipe, height, width, device, dtype):
        f = self.image_multiple(pipe)
        return {"img_ids": pipe._prepare_latent_image_ids(1, height // f, width // f, device,
                                                          dtype),
                "guidance_embeds": pipe.transformer.config.guidance_embeds}

    def forward(self, transformer, x, sigma, rows, constant, guidance, dtype):
        embeds, pooled = rows
        timestep = rounded_timestep(sigma, dtype)
        txt_ids = torch.zeros(embeds.shape[1], 3, device=x.device, dtype=dtype)
        g = (torch.full((len(x),), guidance, device=x.device, dtype=torch.float32)
             if constant["guidance_embeds"] else None)
        return transformer(hidden_states=x.to(dtype), timestep=timestep, guidance=g,
                           pooled_projections=pooled.to(dtype),
                           encoder_hidden_states=embeds.to(dtype), txt_ids=txt_ids,
                           img_ids=constant["img_ids"], return_dict=False)[0]

    def to_vae(self, pipe, x, height, width):
        x = pipe._unpack_latents(x, height, width, pipe.vae_scale_factor)
        return super().to_vae(pipe, x, height, width)


FAMILY = Flux1()


class FluxVelocity(Velocity):
    """A FLUX.1 velocity from its position ids (what benchmarks build without a pipeline);
    Velocity.from_pipe builds one from a loaded pipeline."""

    def __init__(self, transformer, img_ids, guidance_embeds, guidance=3.5, dtype=torch.float32,
                 attention=DEFAULT_ATTENTION):
        super().__init__(transformer, FAMILY, {"img_ids": img_ids,
                                               "guidance_embeds": guidance_embeds},
                         guidance, dtype, attention, img_ids.device.type)


def __getattr__(name):
    """The shared trainer's names (flux_flow.main, flux_flow.sample …), and its older ones."""
    import image_flow

    return getattr(image_flow, {"flux_sigmas": "sigma_grid"}.get(name, name))


if __name__ == "__main__":
    import image_flow

    image_flow.cli()
