"""The seam between the shared image trainer and one diffusers model family.

A family answers the questions below, each as its own pipeline answers it, and nothing else;
loading, the prompt cache, the η = 0 sampler, rewards, LoRA, sharding, checkpoints, export and
the command line are written once in the trainer. The defaults here are what several
pipelines share; a family overrides only what its pipeline does differently.

    name, pipeline, slug    what it is called, the pipeline class that holds it (model_index.json's
                            _class_name), its default output directory runs/<slug>
    encode                  prompts → conditioning rows (one per prompt), through the pipeline's
                            own encode_prompt
    collate                 rows of several prompts → one batch (default: stacked; pad_text for
                            text of unequal lengths)
    max_sequence_length     the pipeline's default text length
    text_tokens, own_text_length
                            text tokens in one prompt's rows at a text length (SD3: CLIP's 77
                            before T5's), and whether rows keep each prompt's own length
    packed, latent_shape    the state the sampler moves: FLUX-style packed 2×2 patches (S, 4·C)
                            (default) or the VAE's own layout (C, H/f, W/f)
    image_multiple, check_image_size
                            the image sizes the checkpoint takes, before any weights load
    noise, noise_dtype      the pipeline's own initial noise (its prepare_latents), drawn in
                            noise_dtype (default: the text rows' dtype)
    pipeline_sigmas         the σ grid the pipeline's __call__ uses (default: linspace(1, 1/T, T)
                            shifted by calculate_shift(image_tokens), as FluxPipeline; its parts
                            image_tokens and linspace)
    constant_inputs, forward
                            what the transformer is called with: timestep convention, ids,
                            guidance input
    guidance                a Guidance: how the pipeline guides (below)
    to_vae, decode          sampler state → what the VAE decodes (its own scaling and shift),
                            → images
    lora_targets            the linear layers LoRA adapts by default
    unused_parameters       True when some trainable weights never get a gradient (DDP must know)
    gradient_checkpointing  whether activations are recomputed by default (the largest models)
    distilled               whether a checkpoint declares itself step-distilled (True / False /
                            None: it does not say), and where it says so; distilled_example: a
                            released distilled checkpoint that declares nothing (for the
                            console's hint)
    inference_steps, distilled_steps, distilled_max_sequence_length
                            the pipeline's default number of steps, and a step-distilled
                            checkpoint's (its model card's); its text length where it has its own

A Guidance answers:

    default, default_for, check
                            its scale's default (for a checkpoint), and a scale it cannot take
    needs_uncond            whether a second, unconditional row is needed at a scale (default:
                            classifier-free guidance, on above 1)
    combine, uncond_first   how the two rows' velocities combine (default: v_u + w·(v_c − v_u)),
                            and their order in the batched call
    negative_prompt         whether it takes --negative-prompt (False: a fixed empty prompt)
    options, help           the flags only it takes ({name: help}), and what its scale means
    off, describe           a scale that turns it off (what distilled checkpoints sample with),
                            and the console's words for a scale

Methods take the loaded pipeline, so a family holds no state.
"""

import numpy as np
import torch


class Guidance:
    """Classifier-free guidance as most pipelines do it: v_u + w·(v_c − v_u) against a negative
    prompt, on for w > 1 (the pipelines' do_classifier_free_guidance), unconditional row first.

    default: --guidance's default; help: what the scale means, for --help; options: {Config-style
    name: help} of the flags only this guidance takes (float, >= 0, off when not given).
    """

    negative_prompt = True  # False: the pipeline's unconditional prompt is fixed ("")
    uncond_first = True  # the order of the two halves of a guided call, as the pipeline has it
    options = {}
    off = 1.0  # w <= 1: one row, no guidance

    def __init__(self, default, help):
        self.default, self.help = default, help

    def default_for(self, index):
        """The scale's default for this checkpoint (index: its model_index.json)."""
        return self.default

    def check(self, index, transformer_config, scale):
        """A ValueError when `scale` (None: not given) means nothing for this checkpoint."""

    def needs_uncond(self, scale, **options):
        """Whether the velocity needs a second, unconditional row per prompt."""
        return scale > 1

    def describe(self, scale, transformer_config, **options):
        """'guidance 4.5 (2 transformer rows per sample)': the run's console words."""
        return f"guidance {scale:g} ({rows_per_sample(self.needs_uncond(scale, **options))})"

    def combine(self, v_cond, v_uncond, scale, sigma, **options):
        """The guided velocity (float32) from the two rows' velocities at σ (N,)."""
        return v_uncond + scale * (v_cond - v_uncond)


class Family:
    """The answers several families share (the module docstring lists the questions)."""

    name = pipeline = slug = None  # "FLUX.1", "FluxPipeline", "flux"
    guidance = None  # a Guidance
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj",
                    "add_v_proj", "to_add_out")  # joint attention's projections (MM-DiT)
    max_sequence_length = 512
    unused_parameters = False
    gradient_checkpointing = False
    packed = True
    noise_dtype = None
    inference_steps = 28  # FluxPipeline's and StableDiffusion3Pipeline's num_inference_steps
    distilled_steps = 4  # FLUX.1-schnell's, FLUX.2 [klein] 4B / 9B's, SD3.5 Large Turbo's
    distilled_max_sequence_length = None  # a step-distilled checkpoint's text length, if its own
    own_text_length = False  # True: each prompt's rows keep its own length (pad_text)

    def text_tokens(self, max_sequence_length):
        """Text tokens in one prompt's rows at this text length (at most, own_text_length)."""
        return max_sequence_length
    distilled_example = None  # a released step-distilled checkpoint that declares nothing

    def distilled(self, index, transformer_config, scheduler_config):
        """(True / False / None, where the checkpoint says so): whether it is step-distilled.
        index: its model_index.json; None: nothing in its files declares it."""
        return None, (f"nothing in a {self.pipeline} checkpoint declares whether it is "
                      f"step-distilled")

    def collate(self, rows):
        """Per-prompt rows (tuples of tensors, as encode gives them) → one tuple of (P, ...)
        tensors. Rows of equal shapes are stacked."""
        return tuple(torch.stack(parts) for parts in zip(*rows))

    def image_multiple(self, pipe):
        """Height and width must be multiples of this (VAE downsampling × 2×2 patches)."""
        return pipe.vae_scale_factor * 2

    def check_image_size(self, pipe, height, width):
        multiple = self.image_multiple(pipe)
        for flag, value in (("height", height), ("width", width)):
            if value <= 0 or value % multiple:
                raise ValueError(f"{flag} must be a positive multiple of {multiple}, got {value}")

    def latent_shape(self, pipe, height, width):
        """Packed: (S, C), S = (H/16)·(W/16) tokens of the transformer's in_channels (4 latent
        channels per 2×2 patch); unpacked: the VAE's layout (C, H/f, W/f)."""
        channels = pipe.transformer.config.in_channels
        if not self.packed:
            f = pipe.vae_scale_factor
            return (channels, height // f, width // f)
        f = self.image_multiple(pipe)
        return ((height // f) * (width // f), channels)

    def noise(self, pipe, n, height, width, dtype, generator):
        """The pipeline's own initial noise (its prepare_latents), in the sampler's layout."""
        channels = pipe.transformer.config.in_channels // (4 if self.packed else 1)
        x = pipe.prepare_latents(n, channels, height, width, self.noise_dtype or dtype,
                                 pipe.transformer.device, generator)
        return x[0] if isinstance(x, tuple) else x  # some also return the position ids

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
        return np.linspace(1.0, 1 / num_steps, num_steps)

    def constant_inputs(self, pipe, height, width, device, dtype):
        """Transformer inputs that depend on the image size only (position ids …)."""
        return {}

    def to_vae(self, pipe, x, height, width):
        """Sampler state → VAE latents: the VAE config's scaling and shift undone."""
        return x / pipe.vae.config.scaling_factor + (pipe.vae.config.shift_factor or 0.0)

    def decode(self, pipe, x, height, width):
        """Sampler states → images in [-1, 1] (B, 3, H, W), as the pipeline decodes them."""
        return pipe.vae.decode(self.to_vae(pipe, x, height, width).to(pipe.vae.dtype),
                               return_dict=False)[0]


def rows_per_sample(guided):
    """'2 transformer rows per sample' when guidance adds an unconditional row, else 1."""
    return "2 transformer rows per sample" if guided else "1 transformer row per sample"


def rounded_timestep(sigma, dtype):
    """σ as FluxPipeline (and Qwen-Image's, FLUX.2's) pass it: t = 1000·σ cast to the latents'
    dtype, then t / 1000."""
    return (sigma * 1000).to(dtype) / 1000


def pad_text(rows):
    """Rows (embeds (L_i, D),) of unequal lengths → (embeds (P, L_max, D) zero-padded at the end,
    lengths (P,)): a collate for pipelines whose prompts keep their own lengths."""
    lengths = torch.tensor([r[0].shape[0] for r in rows])
    longest = int(lengths.max())
    embeds = torch.stack([torch.nn.functional.pad(r[0], (0, 0, 0, longest - r[0].shape[0]))
                          for r in rows])
    return embeds, lengths
