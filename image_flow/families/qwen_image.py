"""Qwen-Image (QwenImagePipeline): what Qwen-Image does differently.

    python -m image_flow --model Qwen/Qwen-Image --guidance 4 --negative-prompt " " ...

What Qwen-Image does differently: the prompt is wrapped in a chat template and encoded by
Qwen2.5-VL (the last hidden layer, the template's first tokens dropped), so prompts have
different lengths: rows are padded and carry a mask; latents are FLUX-like packed 2×2 patches of
a video VAE's single frame, decoded with the VAE's per-channel mean and std; the transformer
takes σ (as 1000·σ rounded to the compute dtype, then / 1000) and the image's patch grid;
guidance is the pipeline's true CFG, v_u + w·(v_c − v_u) rescaled per token to the norm of v_c,
on for w > 1; the σ grid is linspace(1, 1/T, T) with the resolution-dependent shift.
"""

import torch

from .seam import Family, Guidance, pad_text, rounded_timestep


class RescaledGuidance(Guidance):
    """The pipeline's true CFG (do_true_cfg: w > 1 with a negative prompt, ours), rescaled per
    token to the norm of v_c."""

    def combine(self, v_cond, v_uncond, scale, sigma):
        v = super().combine(v_cond, v_uncond, scale, sigma)
        return v * (v_cond.norm(dim=-1, keepdim=True) / v.norm(dim=-1, keepdim=True))


class QwenImage(Family):
    name, pipeline, slug = "Qwen-Image", "QwenImagePipeline", "qwen-image"
    # QwenImagePipeline's default true_cfg_scale.
    guidance = RescaledGuidance(4.0, "true CFG w: v_u + w·(v_c − v_u) against --negative-prompt, "
                                     "rescaled per token to the norm of v_c, two transformer "
                                     "rows per sample; w <= 1 turns it off")
    # QwenImagePipeline's num_inference_steps; Qwen-Image-Lightning's 8 steps when distilled.
    inference_steps, distilled_steps = 50, 8
    own_text_length = True  # rows keep each prompt's own tokens
    # 20 B parameters: 41 GB of bf16 weights leave an 80 GB GPU too little for 60 blocks of
    # activations at 512² and above, so they are recomputed in backward by default.
    gradient_checkpointing = True
    # The last block's text stream feeds nothing: its output projection and MLP get no gradient.
    unused_parameters = True

    def encode(self, pipe, prompts, max_sequence_length):
        embeds, mask = pipe.encode_prompt(prompt=prompts, device=pipe._execution_device,
                                          max_sequence_length=max_sequence_length)
        lengths = [embeds.shape[1]] * len(prompts) if mask is None else mask.sum(1).tolist()
        return [(e[:n],) for e, n in zip(embeds, lengths)]  # each prompt: its own tokens only

    def collate(self, rows):
        return pad_text(rows)  # text of unequal lengths: padded, then masked in forward

    def constant_inputs(self, pipe, height, width, device, dtype):
        f = self.image_multiple(pipe)
        return {"img_shape": (1, height // f, width // f)}  # frames, patch rows, patch columns

    def forward(self, transformer, x, sigma, rows, constant, guidance, dtype):
        embeds, lengths = rows
        # No mask when nothing is padded, as in the pipeline.
        padded = not bool((lengths == embeds.shape[1]).all())
        mask = torch.arange(embeds.shape[1], device=x.device) < lengths.to(x.device)[:, None]
        timestep = rounded_timestep(sigma, dtype)
        return transformer(hidden_states=x.to(dtype), timestep=timestep,
                           encoder_hidden_states=embeds.to(dtype),
                           encoder_hidden_states_mask=mask.long() if padded else None,
                           img_shapes=[[constant["img_shape"]]] * len(x), return_dict=False)[0]

    def decode(self, pipe, x, height, width):
        x = pipe._unpack_latents(x, height, width, pipe.vae_scale_factor)  # (B, C, 1, h, w)
        c = pipe.vae.config
        mean = torch.tensor(c.latents_mean).view(1, c.z_dim, 1, 1, 1).to(x)
        std = torch.tensor(c.latents_std).view(1, c.z_dim, 1, 1, 1).to(x)
        x = (x * std + mean).to(pipe.vae.dtype)
        return pipe.vae.decode(x, return_dict=False)[0][:, :, 0]  # the one frame


FAMILY = QwenImage()
