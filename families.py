"""The seam between the shared image trainer (image_flow.py) and one diffusers model family.

A family answers a short list of questions, each as its own pipeline answers it, and nothing
else; everything else (loading, the prompt cache, the η = 0 sampler, decoding, rewards, LoRA,
sharding, checkpoints, export, the command line) is written once in image_flow.py:

    encode          prompts → conditioning rows (one per prompt), through the pipeline's own
                    encode_prompt
    collate         rows of several prompts → one batch (padding text of unequal lengths)
    latent_shape    the state the sampler moves (packed or not), and noise: the pipeline's draw
    pipeline_sigmas the σ grid the pipeline's __call__ uses (static or resolution-dependent shift)
    forward         what the transformer is called with: timestep convention, ids, guidance input
    guide           how a conditional and an unconditional velocity combine (classifier-free
                    guidance), when uses_negative says a second row is needed
    to_vae, decode  sampler state → what the VAE decodes (its own scaling and shift), decoded
    check_image_size, check_guidance, default_guidance
                    what this checkpoint can take, before any weights load where possible
    lora_targets    the linear layers LoRA adapts by default

Velocity turns a family into g2rpo's velocity_fn: the trained model computes both guidance rows
in one batched call, in the rollout, the training pass and the KL reference alike, so log π_old
and log π use the same velocity. FAMILIES maps model_index.json's pipeline class to the module
that holds its family.
"""

import contextlib
import importlib

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

# model_index.json's _class_name → the module whose FAMILY handles it.
FAMILIES = {"FluxPipeline": "flux_flow", "StableDiffusion3Pipeline": "sd3_flow",
            "QwenImagePipeline": "qwen_image_flow", "Flux2KleinPipeline": "flux2_klein_flow",
            "ZImagePipeline": "z_image_flow"}


def family_for(pipeline_class):
    """The Family for a pipeline class name (a ValueError names the supported ones)."""
    if pipeline_class not in FAMILIES:
        raise ValueError(f"a {pipeline_class} checkpoint; image_flow.py trains {supported()}")
    return importlib.import_module(FAMILIES[pipeline_class]).FAMILY


def family_of(pipe):
    """The Family of a loaded pipeline."""
    return family_for(type(pipe).__name__)


def rounded_timestep(sigma, dtype):
    """σ as FluxPipeline (and Qwen-Image's, FLUX.2's) pass it: t = 1000·σ cast to the latents'
    dtype, then t / 1000."""
    return (sigma * 1000).to(dtype) / 1000


def weightless_pipeline(pipeline_class, **models):
    """The pipeline class built around `models` (e.g. a transformer and VAE on the meta device),
    every other component None: what a family's questions about sizes and ids can be asked of
    before any weights load."""
    import diffusers

    cls = getattr(diffusers, pipeline_class)
    components = {k: None for k in cls._get_signature_keys(cls)[0]}
    return cls(**{**components, "scheduler": diffusers.FlowMatchEulerDiscreteScheduler(),
                  **models})


def supported():
    """'FluxPipeline (FLUX.1), StableDiffusion3Pipeline (SD3)': for error messages and --help."""
    return ", ".join(f"{c} ({family_for(c).name})" for c in FAMILIES)


class Family:
    """Defaults that several families share; each family overrides what its pipeline does
    differently. Methods take the loaded pipeline, so a family holds no state."""

    name = pipeline = None  # "FLUX.1", "FluxPipeline"
    slug = None  # the default output directory is runs/<slug>
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj",
                    "add_v_proj", "to_add_out")  # joint attention's projections (MM-DiT)
    guidance = None  # --guidance's default
    guidance_help = ""  # what --guidance means for this family
    max_sequence_length = 512  # the pipeline's default text length
    unused_parameters = False  # True: some weights never get a gradient (DDP must know)

    negative_prompt = True  # False: the pipeline's unconditional prompt is fixed

    def default_guidance(self, index):
        """--guidance's default for this checkpoint (index: its model_index.json)."""
        return self.guidance

    def check_guidance(self, index, transformer_config, guidance):
        """A ValueError when `guidance` (None: not given) means nothing for this checkpoint."""

    def uses_negative(self, guidance, **options):
        """Whether the velocity needs a second, unconditional row per prompt (CFG), at this
        scale and with these guidance options."""
        return False

    guidance_options = ()  # flags (Config-style names) that only this family's guidance takes
    uncond_first = True  # the order of the two halves of a guided call, as the pipeline has it

    def guide(self, v_cond, v_uncond, guidance, sigma, **options):
        """The guided velocity (float32) from the two rows' velocities at σ (N,)."""
        raise NotImplementedError(f"{self.name} has no classifier-free guidance")

    def image_multiple(self, pipe):
        """Height and width must be multiples of this (VAE downsampling × patch size)."""
        return pipe.vae_scale_factor * 2

    def check_image_size(self, pipe, height, width):
        multiple = self.image_multiple(pipe)
        for flag, value in (("height", height), ("width", width)):
            if value <= 0 or value % multiple:
                raise ValueError(f"{flag} must be a positive multiple of {multiple}, got {value}")

    def latent_shape(self, pipe, height, width):
        """FLUX-style packing, the default: (S, C), S = (H/16)·(W/16) tokens of the
        transformer's in_channels (4 latent channels per 2×2 patch)."""
        f = self.image_multiple(pipe)
        return ((height // f) * (width // f), pipe.transformer.config.in_channels)

    def pipeline_sigmas(self, pipe, num_steps, height, width):
        """The default grid (FluxPipeline's, and pipelines that copy it): linspace(1, 1/T, T),
        shifted by mu = calculate_shift(image tokens) from the scheduler config."""
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        sched = type(pipe.scheduler).from_config(pipe.scheduler.config)
        c = sched.config
        mu = calculate_shift(self.image_tokens(pipe, height, width),
                             c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                             c.get("base_shift", 0.5), c.get("max_shift", 1.15))
        sched.set_timesteps(sigmas=self.linspace(num_steps), mu=mu)
        return sched.sigmas

    def image_tokens(self, pipe, height, width):
        return self.latent_shape(pipe, height, width)[0]

    def linspace(self, num_steps):
        import numpy as np

        return np.linspace(1.0, 1 / num_steps, num_steps)

    def constant_inputs(self, pipe, height, width, device, dtype):
        """Transformer inputs that depend on the image size only (position ids …)."""
        return {}

    def collate(self, rows):
        """Per-prompt rows (tuples of tensors, as encode gives them) → one tuple of (P, ...)
        tensors. Rows of equal shapes are stacked."""
        return tuple(torch.stack(parts) for parts in zip(*rows))

    def to_vae(self, pipe, x, height, width):
        """Sampler state → VAE latents: the VAE config's scaling and shift undone."""
        return x / pipe.vae.config.scaling_factor + (pipe.vae.config.shift_factor or 0.0)

    def decode(self, pipe, x, height, width):
        """Sampler states → images in [-1, 1] (B, 3, H, W), as the pipeline decodes them."""
        return pipe.vae.decode(self.to_vae(pipe, x, height, width).to(pipe.vae.dtype),
                               return_dict=False)[0]


def pad_text(rows):
    """Rows (embeds (L_i, D),) of unequal lengths → (embeds (P, L_max, D) zero-padded at the end,
    lengths (P,)): a collate for pipelines whose prompts keep their own lengths."""
    lengths = torch.tensor([r[0].shape[0] for r in rows])
    longest = int(lengths.max())
    embeds = torch.stack([torch.nn.functional.pad(r[0], (0, 0, 0, longest - r[0].shape[0]))
                          for r in rows])
    return embeds, lengths


# ----------------------------------------------------------------------------------------------
# Attention backends. cuDNN fused attention's bf16 backward gives NaN/inf gradients or illegal
# memory accesses on Hopper GPUs (seen on an H200, torch 2.11.0+cu130; pytorch/pytorch#196678):
# transformers run without it by default.

DEFAULT_ATTENTION = ("flash", "efficient", "math")
SDPA_BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                 "math": SDPBackend.MATH, "cudnn": SDPBackend.CUDNN_ATTENTION}


def sdpa_backends(spec):
    """'flash,efficient,math' → that tuple of names; 'all' → None (PyTorch's pick, cuDNN too)."""
    if spec is None or spec == "all":
        return None
    chosen = [n.strip() for n in spec.split(",") if n.strip()] if isinstance(spec, str) else spec
    if not chosen:
        raise ValueError("--attention-backends needs at least one of flash, efficient, math, "
                         "cudnn (or 'all')")
    for n in chosen:
        if n not in SDPA_BACKENDS:
            raise ValueError(f"unknown attention backend {n!r}; choose from "
                             f"{', '.join(SDPA_BACKENDS)} or 'all'")
    return tuple(dict.fromkeys(chosen))


def attention_context(backends):
    """A context in which scaled_dot_product_attention may use only `backends`, names already
    checked by sdpa_backends (None: any).

    torch restores the previous flags on exit, so nothing outside the context (VAE, rewards,
    other code in the process) sees the choice.
    """
    if backends is None:
        return contextlib.nullcontext()
    return sdpa_kernel([SDPA_BACKENDS[n] for n in backends])


def _enabled_sdpa_backends():
    """The backend names scaled_dot_product_attention may use right now (public torch flags)."""
    flags = {"flash": torch.backends.cuda.flash_sdp_enabled(),
             "efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
             "math": torch.backends.cuda.math_sdp_enabled(),
             "cudnn": torch.backends.cuda.cudnn_sdp_enabled()}
    return tuple(n for n, on in flags.items() if on)


def checkpoint_keeping_attention(module, *args):
    """diffusers' gradient_checkpointing_func: the recomputation in backward() runs outside
    Velocity's attention context, so it re-enters the backends the forward pass used."""
    backends = _enabled_sdpa_backends()

    def run(*a):
        with attention_context(backends):
            return module(*a)

    return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False)


# ----------------------------------------------------------------------------------------------
# The velocity g2rpo trains.


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
        self.guidance, self.dtype = guidance, dtype
        self.guidance_options = guidance_options or {}
        self.cfg = family.uses_negative(guidance, **self.guidance_options)
        self.device_type = device_type or next(transformer.parameters()).device.type
        self.autocast = dtype != torch.float32  # bf16 compute, fp32 weights/latents (CPU too)
        self.attention = sdpa_backends(attention)

    @classmethod
    def from_pipe(cls, transformer, pipe, height, width, guidance=None, dtype=torch.float32,
                  attention=DEFAULT_ATTENTION, guidance_options=None):
        """For `transformer` (the pipeline's own, or a DDP / FSDP wrapper of it) at H × W;
        guidance None: the family's default."""
        family = family_of(pipe)
        device = pipe.transformer.device
        return Velocity(transformer, family,
                        family.constant_inputs(pipe, height, width, device, dtype),
                        family.default_guidance(dict(pipe.config)) if guidance is None
                        else guidance, dtype, attention,
                        device.type, guidance_options)

    def __call__(self, x, sigma, cond):
        if self.cfg != isinstance(cond, dict):
            raise ValueError("guidance with an unconditional row needs cond = {'cond', 'uncond'} "
                             "(PromptEncoder with a negative prompt), and only then")
        rows, n = cond, len(x)
        if self.cfg:  # in the order the family's pipeline stacks them
            first, second = ("uncond", "cond") if self.family.uncond_first else ("cond", "uncond")
            rows = tuple(torch.cat([a, b]) for a, b in zip(cond[first], cond[second]))
            x, sigma = torch.cat([x, x]), torch.cat([sigma, sigma])
        # The autograd graph records the backend chosen here, so backward() uses it as well.
        with attention_context(self.attention), \
                torch.autocast(self.device_type, dtype=self.dtype, enabled=self.autocast):
            v = self.family.forward(self.transformer, x, sigma, rows, self.constant,
                                    self.guidance, self.dtype).float()
        if self.cfg:
            v_uncond, v_cond = (v[:n], v[n:]) if self.family.uncond_first else (v[n:], v[:n])
            v = self.family.guide(v_cond, v_uncond, self.guidance, sigma[:n],
                                  **self.guidance_options)
        return v
