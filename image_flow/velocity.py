"""g2rpo's velocity_fn for any family: the trained transformer computes both guidance rows in
one batched call, in the rollout, the training pass and the KL reference alike, so log π_old
and log π use the same velocity."""

import torch

from .attention import DEFAULT_ATTENTION, attention_context, sdpa_backends
from .families import family_of


class Velocity:
    """g2rpo's velocity_fn for any family: (x (N, *D), sigma (N,), cond) → v (N, *D) float32.

    cond holds one row per sample: a tuple of tensors (family.encode's), or, with guidance
    that needs an unconditional row, {"cond": rows, "uncond": rows}; both go through the
    transformer in one call of 2N rows. attention: the scaled_dot_product_attention backends
    the transformer may use (sdpa_backends' names; None lets PyTorch choose); the gradients of a
    training pass use the same ones. dtype: the compute dtype (autocast when not float32).
    """

    def __init__(self, transformer, family, constant, guidance, dtype=torch.float32,
                 attention=DEFAULT_ATTENTION, device_type=None, guidance_options=None):
        self.transformer, self.family, self.constant = transformer, family, constant
        self.guidance, self.dtype = guidance, dtype  # the scale, in the family's own form
        self.guidance_options = guidance_options or {}
        # Whether a second, unconditional row exists: the guidance's answer, which the trainer
        # also asks before it encodes the negative prompt; cond of the other kind is refused.
        self.needs_uncond = family.guidance.needs_uncond(guidance, **self.guidance_options)
        self.device_type = device_type or next(transformer.parameters()).device.type
        self.autocast = dtype != torch.float32  # bf16 compute, fp32 weights/latents (CPU too)
        self.attention = sdpa_backends(attention)

    @classmethod
    def from_pipe(cls, transformer, pipe, height, width, guidance=None, dtype=torch.float32,
                  attention=DEFAULT_ATTENTION, guidance_options=None):
        """For `transformer` (the pipeline's own, or a DDP / FSDP wrapper of it) at H × W;
        guidance None: the family's default for this checkpoint."""
        family = family_of(pipe)
        device = pipe.transformer.device
        if guidance is None:
            guidance = family.guidance.default_for(dict(pipe.config))
        return Velocity(transformer, family,
                        family.constant_inputs(pipe, height, width, device, dtype), guidance,
                        dtype, attention, device.type, guidance_options)

    def __call__(self, x, sigma, cond):
        if self.needs_uncond != isinstance(cond, dict):
            raise ValueError("guidance with an unconditional row needs cond = {'cond', 'uncond'} "
                             "(PromptEncoder with a negative prompt), and only then")
        rows, n = cond, len(x)
        uncond_first = self.family.guidance.uncond_first
        if self.needs_uncond:  # in the order the family's pipeline stacks them
            first, second = ("uncond", "cond") if uncond_first else ("cond", "uncond")
            rows = tuple(torch.cat([a, b]) for a, b in zip(cond[first], cond[second]))
            x, sigma = torch.cat([x, x]), torch.cat([sigma, sigma])
        # The autograd graph records the backend chosen here, so backward() uses it as well.
        with attention_context(self.attention), \
                torch.autocast(self.device_type, dtype=self.dtype, enabled=self.autocast):
            v = self.family.forward(self.transformer, x, sigma, rows, self.constant,
                                    self.guidance, self.dtype).float()
        if self.needs_uncond:
            v_uncond, v_cond = (v[:n], v[n:]) if uncond_first else (v[n:], v[:n])
            v = self.family.guidance.combine(v_cond, v_uncond, self.guidance, sigma[:n],
                                             **self.guidance_options)
        return v
