"""FLUX.1 (FluxPipeline): what FLUX.1 does differently from the seam's defaults.

    python -m image_flow --model black-forest-labs/FLUX.1-dev ...

Latents are packed: 2×2 patches of the VAE latent become (N, S, 4·C) tokens with position ids;
the transformer takes σ (as 1000·σ rounded to the compute dtype, then / 1000) and, in the
guidance-distilled checkpoints (FLUX.1-dev), the guidance scale as an embedding; the pipeline's
optional true CFG (--true-cfg s > 1) adds an unconditional row for --negative-prompt,
v_u + s·(v_c − v_u). The σ grid of FluxPipeline shifts with the image size.
"""

import torch

from .seam import Family, Guidance, rounded_timestep, rows_per_sample


class EmbeddedGuidance(Guidance):
    """The distilled guidance embedding (one row); FluxPipeline's true_cfg_scale adds a second."""

    options = {"true_cfg": "true classifier-free guidance v_u + s·(v_c − v_u) against "
                           "--negative-prompt besides the distilled embedding, on for s > 1 (the "
                           "pipeline's true_cfg_scale; default off)"}

    def check(self, index, transformer_config, scale):
        if scale is not None and not transformer_config.get("guidance_embeds", False):
            raise ValueError(f"--guidance {scale:g}: this FLUX.1 checkpoint has no guidance "
                             f"embedding (guidance_embeds is false); leave --guidance out")

    def describe(self, scale, transformer_config, true_cfg=1.0):
        guided = self.needs_uncond(scale, true_cfg)
        embedded = (f"guidance {scale:g}" if transformer_config.get("guidance_embeds")
                    else "no guidance embedding")
        cfg = f", true CFG {true_cfg:g}" if guided else ""
        return f"{embedded}{cfg} ({rows_per_sample(guided)})"

    def needs_uncond(self, scale, true_cfg=1.0):
        return true_cfg > 1  # the pipeline's do_true_cfg (with a negative prompt: ours)

    def combine(self, v_cond, v_uncond, scale, sigma, true_cfg=1.0):
        return super().combine(v_cond, v_uncond, true_cfg, sigma)


class Flux1(Family):
    name, pipeline, slug = "FLUX.1", "FluxPipeline", "flux"
    guidance = EmbeddedGuidance(3.5, "the distilled guidance embedding (FLUX.1-dev; "
                                     "FLUX.1-schnell has none), one transformer row per sample "
                                     "(--true-cfg adds a second)")

    distilled_max_sequence_length = 256  # FLUX.1-schnell's reference code and model card

    def distilled(self, index, transformer_config, scheduler_config):
        """What the scheduler config says: FLUX.1-dev's shifts its grid with the image size
        (use_dynamic_shifting true); the timestep-distilled FLUX.1-schnell's samples its few steps
        unshifted (use_dynamic_shifting false, shift 1.0). Anything else declares nothing."""
        dynamic, shift = scheduler_config.get("use_dynamic_shifting"), scheduler_config.get("shift")
        where = (f"scheduler/scheduler_config.json: use_dynamic_shifting "
                 f"{str(dynamic).lower()}, shift {shift:g}")
        if dynamic:
            return False, where + ", as FLUX.1-dev"
        if dynamic is False and shift == 1.0:
            return True, where + ", as the timestep-distilled FLUX.1-schnell"
        return None, where + ", neither FLUX.1-dev's grid nor FLUX.1-schnell's"

    def encode(self, pipe, prompts, max_sequence_length):
        embeds, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None,
                                               device=pipe._execution_device,
                                               max_sequence_length=max_sequence_length)
        return list(zip(embeds, pooled))  # per prompt: T5 (S_txt, D_txt), CLIP pooled (D_pool,)

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
