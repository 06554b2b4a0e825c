"""FLUX.2 [klein] (Flux2KleinPipeline): what FLUX.2 [klein] does differently.

    python -m image_flow --model black-forest-labs/FLUX.2-klein-4B ...   # distilled: no CFG

What FLUX.2 [klein] does differently from FLUX.1: the prompt goes through the tokenizer's chat
template and a Qwen3 encoder, whose hidden states at three layers are concatenated (a fixed
length, padded); the VAE latent is patchified 2×2, normalised by the VAE's batch-norm running
statistics and packed into tokens with 4-D position ids, so the sampler's state is that
normalised packed latent (the pipeline's output_type="latent" is the decoded side of it:
unpacked, denormalised, unpatchified); the transformer takes σ (as 1000·σ rounded to the compute
dtype, then / 1000) and no guidance embedding; guidance is classifier-free against the empty
prompt, v_u + w·(v_c − v_u), on for w > 1 and ignored by the step-distilled checkpoints (refused
here); the σ grid is linspace(1, 1/T, T) shifted by the pipeline's empirical mu.
"""

import torch

from .seam import Family, Guidance, rounded_timestep


class EmptyPromptGuidance(Guidance):
    """CFG against the empty prompt; the step-distilled checkpoints (is_distilled) take none."""

    negative_prompt = False  # the pipeline's unconditional row is always ""

    def default_for(self, index):
        return 1.0 if index.get("is_distilled") else self.default

    def check(self, index, transformer_config, scale):
        if scale is not None and scale > 1 and index.get("is_distilled"):
            raise ValueError(f"--guidance {scale:g}: this FLUX.2 [klein] checkpoint is "
                             f"step-distilled (is_distilled), its pipeline ignores guidance; "
                             f"leave --guidance out")


class Flux2Klein(Family):
    name, pipeline, slug = "FLUX.2 [klein]", "Flux2KleinPipeline", "flux2-klein"
    # Double-stream attention as FLUX.1 names it, and the single-stream blocks' fused QKV + MLP
    # input projection.
    lora_targets = (*Family.lora_targets, "to_qkv_mlp_proj")
    # Flux2KleinPipeline's default, for the base checkpoints.
    guidance = EmptyPromptGuidance(4.0, "CFG w: v_u + w·(v_c − v_u) against the empty prompt, two "
                                        "transformer rows per sample; w <= 1 turns it off; the "
                                        "distilled checkpoints take none (default 1 for them)")
    inference_steps = 50  # Flux2KleinPipeline's num_inference_steps (base checkpoints)

    def distilled(self, index, transformer_config, scheduler_config):
        if "is_distilled" not in index:
            return False, "model_index.json has no is_distilled (the pipeline's default: false)"
        return bool(index["is_distilled"]), (f"model_index.json: is_distilled "
                                             f"{str(bool(index['is_distilled'])).lower()}")

    def encode(self, pipe, prompts, max_sequence_length):
        embeds, _ = pipe.encode_prompt(prompt=prompts, device=pipe._execution_device,
                                       max_sequence_length=max_sequence_length)
        return [(e,) for e in embeds]  # (L, 3·D) each, padded to max_sequence_length

    def pipeline_sigmas(self, pipe, num_steps, height, width):
        """Flux2KleinPipeline.__call__'s grid: linspace(1, 1/T, T) (or the scheduler's own flow
        sigmas), shifted by compute_empirical_mu(tokens, T)."""
        import numpy as np
        from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

        sched = type(pipe.scheduler).from_config(pipe.scheduler.config)
        sigmas = (None if sched.config.get("use_flow_sigmas") else
                  np.linspace(1.0, 1 / num_steps, num_steps))
        mu = compute_empirical_mu(self.latent_shape(pipe, height, width)[0], num_steps)
        sched.set_timesteps(num_steps, sigmas=sigmas, mu=mu)
        return sched.sigmas

    def _latent_grid(self, pipe, height, width):
        f = self.image_multiple(pipe)
        return height // f, width // f

    def constant_inputs(self, pipe, height, width, device, dtype):
        h, w = self._latent_grid(pipe, height, width)
        grid = torch.zeros(1, 1, h, w)
        return {"img_ids": pipe._prepare_latent_ids(grid).to(device),  # (1, S, 4)
                "text_ids": type(pipe)._prepare_text_ids}

    def forward(self, transformer, x, sigma, rows, constant, guidance, dtype):
        (embeds,) = rows
        n = len(x)
        timestep = rounded_timestep(sigma, dtype)
        return transformer(hidden_states=x.to(dtype), timestep=timestep, guidance=None,
                           encoder_hidden_states=embeds.to(dtype),
                           txt_ids=constant["text_ids"](embeds).to(x.device),
                           img_ids=constant["img_ids"].expand(n, -1, -1),
                           return_dict=False)[0]

    def to_vae(self, pipe, x, height, width):
        """Unpack by position ids, undo the batch norm, unpatchify (the pipeline's latents)."""
        h, w = self._latent_grid(pipe, height, width)
        ids = pipe._prepare_latent_ids(torch.zeros(1, 1, h, w)).to(x.device)
        x = pipe._unpack_latents_with_ids(x, ids.expand(len(x), -1, -1), h, w)  # (B, 4C, h, w)
        bn = pipe.vae.bn
        mean = bn.running_mean.view(1, -1, 1, 1).to(x)
        std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + pipe.vae.config.batch_norm_eps).to(x)
        return pipe._unpatchify_latents(x * std + mean)


FAMILY = Flux2Klein()
