"""Z-Image (ZImagePipeline): what Z-Image does differently.

    python -m image_flow --model Tongyi-MAI/Z-Image-Turbo --recipe distilled ...

What Z-Image does differently: the prompt goes through the tokenizer's chat template and a Qwen3
encoder (its second-to-last hidden layer, padding dropped), so prompts keep their own lengths;
the transformer takes lists (one latent (C, 1, h, w) and one caption per sample), the timestep
1 − σ, computed as the pipeline does, (1000 − 1000·σ) / 1000, and returns the negated velocity;
latents are the VAE's (C, H/8, W/8), drawn in float32; guidance is pos + w·(pos − neg), on for
w > 0 (so its w is the usual w − 1: 1 is not off), with the pipeline's optional norm clamp
(--cfg-normalization) and truncation at late steps (--cfg-truncation).
"""

import torch

from .seam import Family, Guidance, pad_text


class ExtrapolatedGuidance(Guidance):
    """pos + w·(pos − neg), on for w > 0, with the pipeline's optional norm clamp and
    truncation."""

    off = 0.0  # on for w > 0
    uncond_first = False  # ZImagePipeline stacks the prompts, then the negative prompts
    options = {"cfg_normalization": "clamp the guided velocity's norm to this multiple of the "
                                    "conditional one's (the pipeline's cfg_normalization; "
                                    "default off)",
               "cfg_truncation": "no guidance at steps where 1 − σ exceeds this (the pipeline's "
                                 "cfg_truncation; default 1: never)"}

    def needs_uncond(self, scale, **options):
        return scale > 0  # the pipeline's do_classifier_free_guidance

    def combine(self, v_cond, v_uncond, scale, sigma, cfg_normalization=0.0,
                cfg_truncation=1.0):
        v = v_cond + scale * (v_cond - v_uncond)
        if cfg_normalization > 0:  # at most cfg_normalization × |v_cond|, over the whole sample
            dims = tuple(range(1, v.ndim))
            cap = cfg_normalization * torch.linalg.vector_norm(v_cond, dim=dims, keepdim=True)
            norm = torch.linalg.vector_norm(v, dim=dims, keepdim=True)
            v = torch.where(norm > cap, v * (cap / norm), v)
        if cfg_truncation <= 1:  # no guidance where the pipeline's t_norm exceeds it
            t_norm = (1000 - sigma.float() * 1000) / 1000
            off = (t_norm > cfg_truncation).view(-1, *[1] * (v.ndim - 1))
            v = torch.where(off, v_cond, v)
        return v


class ZImage(Family):
    name, pipeline, slug = "Z-Image", "ZImagePipeline", "z-image"
    distilled_example = "Z-Image-Turbo"
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0")  # single-stream attention
    # ZImagePipeline's default guidance_scale, for the base model; Z-Image-Turbo, which nothing
    # in its files tells apart, samples without guidance (its model card: 0, ~8 steps).
    guidance = ExtrapolatedGuidance(5.0, "CFG pos + w·(pos − neg) against --negative-prompt, two "
                                         "transformer rows per sample; w <= 0 turns it off, w = 1 "
                                         "is the usual scale 2")
    inference_steps, distilled_steps = 50, 8
    own_text_length = True  # rows keep each prompt's own tokens
    packed = False
    noise_dtype = torch.float32  # ZImagePipeline draws its noise in float32 whatever the model's

    def encode(self, pipe, prompts, max_sequence_length):
        embeds = pipe.encode_prompt(prompt=prompts, device=pipe._execution_device,
                                    do_classifier_free_guidance=False,
                                    max_sequence_length=max_sequence_length)[0]
        return [(e,) for e in embeds]  # a list of (L_i, D): each prompt its own length

    def collate(self, rows):
        return pad_text(rows)

    def image_tokens(self, pipe, height, width):  # the pipeline's mu: 2×2 latent patches
        _, h, w = self.latent_shape(pipe, height, width)
        return (h // 2) * (w // 2)

    def linspace(self, num_steps):  # ZImagePipeline's default sigmas, built with torch
        return torch.linspace(1.0, 1 / num_steps, num_steps).tolist()

    def forward(self, transformer, x, sigma, rows, constant, guidance, dtype):
        embeds, lengths = rows
        # The pipeline: t = 1000·σ (the scheduler's, float32), then (1000 − t) / 1000.
        timestep = (1000 - sigma.float() * 1000) / 1000
        captions = [e[:n] for e, n in zip(embeds.to(dtype), lengths.tolist())]
        out = transformer(list(x.to(dtype).unsqueeze(2).unbind(0)), timestep, captions,
                          return_dict=False)[0]
        return -torch.stack(out).squeeze(2)  # the transformer predicts −v


FAMILY = ZImage()
