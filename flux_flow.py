"""G²RPO on FLUX.1 through diffusers: the same g2rpo.py trainer, a FLUX velocity and image rewards.

    # one GPU, LoRA
    python flux_flow.py --model black-forest-labs/FLUX.1-dev --lora-rank 64 --rewards clip,pickscore
    # the official recipe: full fine-tune, FSDP2, one prompt per GPU
    torchrun --nproc_per_node 8 flux_flow.py --model /path/FLUX.1-dev --lora-rank 0 --height 720 --width 720
    # evaluation only: ODE samples for the held-out prompts, mean rewards, an image grid
    python flux_flow.py --model ... --eval --iterations 0

Everything FLUX-specific lives here; g2rpo.py stays model-agnostic; the reward models are in
rewards.py; run directories, checkpoints, export and signals in flux_run.py. Latents are kept
in FLUX's packed layout (N, S, 64) in float32 between steps; the transformer runs in --dtype
(bf16 autocast on GPU) and log-probabilities are computed in float32.
"""

import argparse
import contextlib
import gc
import json
import math
import os
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.attention import SDPBackend, sdpa_kernel

import flux_run
import g2rpo
from flux_parallel import (adapters_disabled, frozen_reference, init_distributed,
                           wrap_distributed)
import rewards as reward_models

BUILTIN_PROMPTS = [
    "a red fox sitting in fresh snow, golden hour",
    "a lighthouse on a cliff during a storm, dramatic clouds",
    "a bowl of ramen with a soft-boiled egg, studio lighting",
    "an astronaut riding a horse on the moon, photorealistic",
    "a cozy reading nook with a cat asleep on a pile of books",
    "a watercolor painting of a venetian canal at dawn",
    "a futuristic city skyline at night with flying cars",
    "a close-up portrait of an old fisherman, film grain",
    "a hummingbird drinking from a purple flower, macro photo",
    "a medieval castle on a hill surrounded by autumn forest",
    "a glass of iced coffee on a wooden table, morning light",
    "an origami crane made of newspaper, soft shadows",
    "a snowy mountain lake reflecting the milky way",
    "a vintage red bicycle leaning against a blue door",
    "a steampunk owl made of brass gears",
    "a field of sunflowers under a thunderstorm sky",
]
BUILTIN_EVAL_PROMPTS = [
    "a corgi wearing a tiny wizard hat, digital art",
    "a tranquil japanese garden with a red bridge",
    "a plate of colorful macarons on a marble counter",
    "a polar bear walking across an ice floe at sunset",
]
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                "to_add_out"]
# cuDNN fused attention's bf16 backward gives NaN/inf gradients or illegal memory accesses on
# Hopper GPUs (seen on an H200, torch 2.11.0+cu130; pytorch/pytorch#196678): the transformer
# runs without it by default.
DEFAULT_ATTENTION = ("flash", "efficient", "math")
SDPA_BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                 "math": SDPBackend.MATH, "cudnn": SDPBackend.CUDNN_ATTENTION}


# ----------------------------------------------------------------------------------------------
# Loading the pipeline and prompts.


# The diffusers pipeline classes (model_index.json's _class_name) this trainer handles.
PIPELINES = {"FluxPipeline": "FLUX.1"}


def checkpoint_file(path, name):
    """A file of a diffusers checkpoint (a local folder, or a Hub id already in the cache), or
    None when it is not on this machine yet (load_pipeline then names what is missing)."""
    if Path(path).is_dir():
        f = Path(path) / name
        return f if f.is_file() else None
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(path, name) if path.count("/") == 1 else None
    return Path(cached) if isinstance(cached, str) else None


def check_pipeline_class(path):
    """Refuse a checkpoint of another pipeline class (its model_index.json's _class_name)
    before any weights load."""
    index = checkpoint_file(path, "model_index.json")
    if index is None:
        return
    name = json.loads(index.read_text()).get("_class_name")
    if name not in PIPELINES:
        supported = ", ".join(f"{c} ({f})" for c, f in PIPELINES.items())
        raise ValueError(f"--model {path}: a {name} checkpoint; flux_flow.py trains {supported}")


def load_pipeline(path, device="cpu", dtype=torch.float32):
    """FluxPipeline.from_pretrained(path) with VAE and text encoders frozen and in eval mode."""
    from diffusers import FluxPipeline

    try:
        with warnings.catch_warnings():  # newer diffusers renames torch_dtype to dtype
            warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
            pipe = FluxPipeline.from_pretrained(path, torch_dtype=dtype)
    except (OSError, ValueError) as e:
        raise OSError(f"could not load a FLUX pipeline from {path!r}: {e}. Pass a local folder "
                      f"(save_pretrained layout) or a Hub id that is already downloaded.") from e
    pipe.to(device)
    for m in (pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.transformer):
        m.requires_grad_(False).eval()  # the trainer never switches modes: sampling == training
    pipe.set_progress_bar_config(disable=True)
    return pipe


def read_prompts(path=None, builtin=BUILTIN_PROMPTS):
    """Prompts from a UTF-8 text file (one per line, blank lines skipped, a BOM dropped), or the
    built-in list."""
    if path is None:
        return list(builtin)
    p = Path(path)
    if p.is_dir():
        raise IsADirectoryError(f"prompt file {str(path)!r} is a directory, not a text file")
    if not p.is_file():
        raise FileNotFoundError(f"prompt file {str(path)!r} does not exist")
    try:
        text = p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"prompt file {str(path)!r} is not UTF-8 text (byte {e.start}: "
                         f"{e.reason})") from None
    except OSError as e:
        raise OSError(f"prompt file {str(path)!r} cannot be read: {e.strerror or e}") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"prompt file {str(path)!r} holds no prompts (one per line expected)")
    return prompts


class PromptEncoder:
    """Encodes prompts once under no_grad (CLIP pooled + T5 sequence) and caches them on the CPU."""

    def __init__(self, pipe, max_sequence_length=512):
        self.pipe, self.max_len, self.cache = pipe, max_sequence_length, {}

    @torch.no_grad()
    def __call__(self, prompts):
        """list of P prompts → (prompt_embeds (P, S_txt, D_txt), pooled (P, D_pool)) on device."""
        new = [p for p in dict.fromkeys(prompts) if p not in self.cache]
        if new:
            embeds, pooled, _ = self.pipe.encode_prompt(
                prompt=new, prompt_2=None, device=self.pipe._execution_device,
                max_sequence_length=self.max_len)
            for p, e, q in zip(new, embeds, pooled):
                self.cache[p] = (e.cpu(), q.cpu())
        device = self.pipe.transformer.device
        return (torch.stack([self.cache[p][0] for p in prompts]).to(device),
                torch.stack([self.cache[p][1] for p in prompts]).to(device))


# ----------------------------------------------------------------------------------------------
# The FLUX flow: σ grid, velocity, noise, decoding.


def check_image_size(pipe, height, width):
    multiple = pipe.vae_scale_factor * 2  # VAE downsampling, then 2×2 packing (16 for FLUX.1)
    for name, value in (("height", height), ("width", width)):
        if value <= 0 or value % multiple:
            raise ValueError(f"{name} must be a positive multiple of {multiple}, got {value}")


def latent_shape(pipe, height, width):
    """(S, C) of one packed latent: S = (H/16)·(W/16) tokens of C = 4·latent_channels."""
    check_image_size(pipe, height, width)
    f = pipe.vae_scale_factor * 2
    return ((height // f) * (width // f), pipe.transformer.config.in_channels)


def flux_sigmas(pipe, num_steps, height, width, schedule="static", shift=3.0):
    """(T+1,) σ grid: "static" is the official recipe (SPEC §1), "pipeline" is FluxPipeline's own.

    "pipeline" asks a copy of the pipeline's scheduler exactly as FluxPipeline.__call__ does:
    sigmas = linspace(1, 1/T, T) with the resolution-dependent shift mu (dynamic configs).
    """
    if schedule == "static":
        return g2rpo.sigma_schedule(num_steps, shift)
    if schedule != "pipeline":
        raise ValueError(f"schedule must be 'static' or 'pipeline', got {schedule!r}")
    import numpy as np
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    sched = type(pipe.scheduler).from_config(pipe.scheduler.config)
    c = sched.config
    mu = calculate_shift(latent_shape(pipe, height, width)[0], c.get("base_image_seq_len", 256),
                         c.get("max_image_seq_len", 4096), c.get("base_shift", 0.5),
                         c.get("max_shift", 1.15))
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=mu)
    return sched.sigmas.float().cpu()


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
    FluxVelocity's attention context, so it re-enters the backends the forward pass used."""
    backends = _enabled_sdpa_backends()

    def run(*a):
        with attention_context(backends):
            return module(*a)

    return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False)


class FluxVelocity:
    """g2rpo's velocity_fn for FLUX: (x (N, S, C), sigma (N,), (embeds, pooled)) → v (N, S, C).

    attention: the scaled_dot_product_attention backends the transformer may use (names as in
    sdpa_backends; None lets PyTorch choose); the gradients of a training pass use the same ones.
    """

    def __init__(self, transformer, img_ids, guidance_embeds, guidance=3.5, dtype=torch.float32,
                 attention=DEFAULT_ATTENTION):
        self.transformer, self.img_ids, self.dtype = transformer, img_ids, dtype
        self.guidance = guidance if guidance_embeds else None  # distilled guidance, no true CFG
        self.device_type = img_ids.device.type
        self.autocast = dtype != torch.float32  # bf16 compute, fp32 weights/latents (CPU too)
        self.attention = sdpa_backends(attention)

    @classmethod
    def from_pipe(cls, transformer, pipe, height, width, guidance=3.5, dtype=torch.float32,
                  attention=DEFAULT_ATTENTION):
        """For `transformer` (the pipeline's own, or a DDP / FSDP wrapper of it) at H × W."""
        f = pipe.vae_scale_factor * 2
        img_ids = pipe._prepare_latent_image_ids(1, height // f, width // f,
                                                 pipe.transformer.device, dtype)
        return cls(transformer, img_ids, pipe.transformer.config.guidance_embeds, guidance, dtype,
                   attention)

    def __call__(self, x, sigma, cond):
        embeds, pooled = cond
        n = x.shape[0]
        # FluxPipeline passes t/1000 with t = 1000·σ cast to the latents' dtype: do the same.
        timestep = (sigma * 1000).to(self.dtype) / 1000
        txt_ids = torch.zeros(embeds.shape[1], 3, device=x.device, dtype=self.dtype)
        guidance = (None if self.guidance is None
                    else torch.full((n,), self.guidance, device=x.device, dtype=torch.float32))
        # The autograd graph records the backend chosen here, so backward() uses it as well.
        with attention_context(self.attention), \
                torch.autocast(self.device_type, dtype=self.dtype, enabled=self.autocast):
            v = self.transformer(
                hidden_states=x.to(self.dtype), timestep=timestep, guidance=guidance,
                pooled_projections=pooled.to(self.dtype), encoder_hidden_states=embeds.to(self.dtype),
                txt_ids=txt_ids, img_ids=self.img_ids, return_dict=False)[0]
        return v.float()


@torch.no_grad()
def decode(pipe, latents, height, width):
    """Packed latents (B, S, C) → images in [0, 1], (B, 3, H, W) float32 (FluxPipeline's decode)."""
    x = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)
    x = x / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
    image = pipe.vae.decode(x.to(pipe.vae.dtype), return_dict=False)[0]
    return (image.float() / 2 + 0.5).clamp(0, 1)


@torch.no_grad()
def sample(pipe, velocity, encoder, prompts, height, width, sigmas, generator):
    """Deterministic sampling (η = 0) with g2rpo.ode_step: FluxPipeline's loop, our steps.

    Initial noise comes from pipe.prepare_latents with the caller's generator, so for the same
    generator the result equals FluxPipeline(...) on the same σ grid.
    Returns (latents (B, S, C) float32, images (B, 3, H, W) in [0, 1]).
    """
    check_image_size(pipe, height, width)
    cond = encoder(list(prompts))
    x, _ = pipe.prepare_latents(len(prompts), pipe.transformer.config.in_channels // 4, height,
                                width, cond[0].dtype, pipe.transformer.device, generator)
    x = x.float()
    sigmas = sigmas.to(x.device)
    for i in range(len(sigmas) - 1):
        v = velocity(x, sigmas[i].expand(len(x)), cond)
        x = g2rpo.ode_step(x, v, sigmas[i], sigmas[i + 1])
    return x, decode(pipe, x, height, width)


# ----------------------------------------------------------------------------------------------
# Rewards (the models themselves: rewards.py, shared by every adapter).


def make_reward_fn(pipe, rewards, height, width, decode_batch=4):
    """g2rpo's reward_fn: packed latents (n, S, C), prompts → (n, R), decoding in small chunks."""

    def reward_fn(latents, prompts):
        out = []
        for i in range(0, len(latents), decode_batch):
            images = decode(pipe, latents[i : i + decode_batch], height, width)
            p = prompts[i : i + decode_batch]
            out.append(torch.stack([r(images, p).float().cpu() for r in rewards.values()], -1))
        return torch.cat(out)

    return reward_fn


# ----------------------------------------------------------------------------------------------
# Trainable weights (processes, FSDP2 / DDP and the KL's reference: flux_parallel.py).


def check_lora_targets(transformer, targets):
    """Each target must name (as peft matches it: the module's name or its dotted ending) a
    linear layer of the transformer; a ValueError lists the names there are."""
    linear = [n for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)]
    for t in targets:
        if not any(n == t or n.endswith("." + t) for n in linear):
            ends = sorted({".".join(n.split(".")[-2:]) if n.split(".")[-1].isdigit()
                           else n.split(".")[-1] for n in linear})
            raise ValueError(f"--lora-targets: {t!r} names no linear layer of the "
                             f"{type(transformer).__name__}; its linear layers end in "
                             f"{', '.join(ends)}")


def transformer_on_meta(path):
    """The checkpoint's transformer built from its config on the meta device (no weights), or
    None when its config is not on this machine yet."""
    config = checkpoint_file(path, "transformer/config.json")
    if config is None:
        return None
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        return FluxTransformer2DModel.from_config(json.loads(config.read_text()))


def setup_trainable(transformer, lora_rank, lora_alpha, gradient_checkpointing=False,
                    upcast=True, lora_targets=LORA_TARGETS):
    """LoRA adapters (float32) on `lora_targets` (default: the attention projections), or the
    whole transformer.

    A full fine-tune keeps float32 master weights: upcast now, or (upcast=False) after FSDP2 has
    sharded the model, so that no process ever holds a full float32 copy.
    """
    transformer.requires_grad_(False)
    if lora_rank > 0:
        from peft import LoraConfig

        check_lora_targets(transformer, lora_targets)
        transformer.add_adapter(LoraConfig(r=lora_rank, lora_alpha=lora_alpha,
                                           target_modules=list(lora_targets),
                                           init_lora_weights=True))
        for p in transformer.parameters():
            if p.requires_grad:
                p.data = p.data.float()  # fp32 adapters under bf16 autocast
    else:
        transformer.requires_grad_(True)
        if upcast:
            transformer.float()
    if gradient_checkpointing:
        transformer.enable_gradient_checkpointing(checkpoint_keeping_attention)
    return [p for p in transformer.parameters() if p.requires_grad]


def reference_velocity(raw, reference, pipe, args, dtype):
    """g2rpo's ref_velocity_fn: the frozen copy's velocity (full fine-tune), or the policy's
    own transformer with its adapters off (LoRA), without DDP (no gradient, no collectives)."""
    velocity = FluxVelocity.from_pipe(reference if reference is not None else raw, pipe,
                                      args.height, args.width, args.guidance, dtype,
                                      args.attention_backends)
    if reference is not None:
        return velocity

    def lora_off(x, sigma, cond):
        with adapters_disabled(raw):
            return velocity(x, sigma, cond)

    return lora_off


# ----------------------------------------------------------------------------------------------
# What a checkpoint must match (checkpoints, run directories and stops: flux_run.py).


def fingerprint(args, transformer):
    """Every setting that changes the model or the algorithm; a resume must match all of them.
    The learning rate is left out: a changed one is applied on resume (and logged)."""
    cfg = dict(transformer.config)
    return {"transformer_config": json.loads(json.dumps(cfg, default=str)), **settings(args)}


def settings(args):
    """The fingerprint's part that the flags alone give: checked at --resume before any model
    loads (the transformer's config is checked once it has)."""
    return {"lora_rank": args.lora_rank, "lora_alpha": args.lora_alpha, "method": args.method,
            "granularities": list(args.granularities), "branch_steps": list(args.branch_steps),
            "group_size": args.group_size, "num_steps": args.steps, "height": args.height,
            "width": args.width, "eta": args.eta, "shift": args.shift, "schedule": args.schedule,
            "clip_range": args.clip_range, "adv_clip": args.adv_clip,
            "max_grad_norm": args.max_grad_norm, "weight_decay": args.weight_decay,
            "step_per_iteration": args.step_per_iteration, "guidance": args.guidance,
            "prompts_per_gpu": args.prompts_per_gpu,
            "rewards": reward_models.reward_names(args.rewards),
            "max_sequence_length": args.max_sequence_length,
            # Only when on: checkpoints from before these settings existed resume unchanged.
            **{k: getattr(args, k) for k in ("kl_beta", "ema_decay") if getattr(args, k) > 0},
            **({"lora_targets": list(args.lora_targets)}
               if args.lora_rank and list(args.lora_targets) != LORA_TARGETS else {}),
            **({k: getattr(args, k) for k in ("window_size", "window_stride", "window_every")}
               if args.method == "mixgrpo" else {})}


# ----------------------------------------------------------------------------------------------
# Evaluation and the command line.


def evaluate(pipe, velocity, encoder, rewards, prompts, height, width, sigmas, seeds):
    """ODE samples (η = 0) for each prompt at fixed seeds → (mean reward per reward model,
    images (seeds, prompts, 3, H, W) on the CPU)."""
    scores, images = {n: [] for n in rewards}, []
    for seed in seeds:
        g = torch.Generator(pipe.transformer.device).manual_seed(seed)
        _, img = sample(pipe, velocity, encoder, prompts, height, width, sigmas, g)
        images.append(img.cpu())
        for n, r in rewards.items():
            scores[n].append(r(img, prompts).float().cpu())
    return {n: torch.cat(s).mean().item() for n, s in scores.items()}, torch.stack(images)


def int_list(s):
    """'0,1,2' → (0, 1, 2), for argparse; empty or non-integer lists are refused."""
    try:
        values = tuple(int(x) for x in s.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None
    if not values:
        raise argparse.ArgumentTypeError(f"expected at least one integer, got {s!r}")
    return values


def name_list(s):
    """'to_q, to_k' → ('to_q', 'to_k'), for argparse; empty or repeated names are refused."""
    names = tuple(n.strip() for n in s.split(",") if n.strip())
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {s!r}")
    if len(set(names)) < len(names):
        raise argparse.ArgumentTypeError(f"a name is listed twice in {s!r}")
    return names


def csv(values):
    """(0, 1, 2) → '0,1,2': a list in the form its flag takes."""
    return ",".join(map(str, values))


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The module docstring as written; each flag's default once, in the form the flag takes.
    A help text that states its default itself, a None default (filled in from other flags)
    and on/off switches get no suffix."""

    def _get_help_string(self, action):
        text, default = action.help or "", action.default
        if "(default" in text or default in (None, argparse.SUPPRESS) or action.nargs == 0:
            return text
        shown = csv(default) if isinstance(default, (tuple, list)) else default
        return f"{text} (default: {str(shown).replace('%', '%%')})"


# Config fields whose flag is not "--" + the field with dashes.
FLAGS = {"num_steps": "--steps", "prompts_per_iteration": "--prompts-per-gpu",
         "num_iterations": "--iterations", "step_per_branch": "--step-per-iteration"}
# Config fields whose flag defaults to None, so that check_args can tell whether it was given:
# a flag for a field that --method does not use is refused, not silently ignored.
METHOD_FIELDS = ("branch_steps", "granularities", "window_size", "window_stride", "window_every")


def flag_of(field):
    return FLAGS.get(field, "--" + field.replace("_", "-"))


def make_config(args, rank=0):
    """The g2rpo.Config of these arguments; each rank draws its own prompts and noise."""
    return g2rpo.Config(num_steps=args.steps, shift=args.shift, eta=args.eta,
                        branch_steps=args.branch_steps, group_size=args.group_size,
                        granularities=args.granularities, clip_range=args.clip_range,
                        adv_clip=args.adv_clip, lr=args.lr, weight_decay=args.weight_decay,
                        max_grad_norm=args.max_grad_norm,
                        step_per_branch=not args.step_per_iteration, method=args.method,
                        window_size=args.window_size, window_stride=args.window_stride,
                        window_every=args.window_every,
                        kl_beta=args.kl_beta, ema_decay=args.ema_decay,
                        prompts_per_iteration=args.prompts_per_gpu,
                        num_iterations=args.iterations, batch_size=args.batch_size,
                        seed=args.seed + rank)


def parse_args(argv=None):
    d = g2rpo.Config()
    p = argparse.ArgumentParser(prog="flux_flow.py", description=__doc__,
                                formatter_class=HelpFormatter)
    a = p.add_argument
    a("--model", default="black-forest-labs/FLUX.1-dev", help="FluxPipeline folder or Hub id")
    a("--prompts",
      help=f"training prompts, UTF-8, one per line (default: {len(BUILTIN_PROMPTS)} built-in)")
    a("--eval-prompts", help="held-out prompts, one per line (default: 4 built-in)")
    a("--height", type=int, default=512, help="image height, a multiple of 16")
    a("--width", type=int, default=512, help="image width, a multiple of 16")
    a("--steps", type=int, default=d.num_steps, help="T sampling steps")
    a("--schedule", choices=["static", "pipeline"], default="static",
      help="static shift (official recipe) or the pipeline's dynamic-shift grid")
    a("--shift", type=float, default=d.shift, help="static shift of the σ grid")
    a("--guidance", type=float, default=3.5, help="FLUX-dev distilled guidance embedding")
    a("--max-sequence-length", type=int, default=512, help="T5 tokens per prompt")
    a("--method", choices=g2rpo.METHODS, default=d.method,
      help="G²RPO, or a baseline: full-SDE GRPO (SDE at every branch step) or MixGRPO (SDE in "
           "a window of steps that slides as training goes on)")
    a("--eta", type=float, default=d.eta, help="η, SDE noise level")
    a("--group-size", type=int, default=d.group_size, help="G, members per prompt")
    a("--branch-steps", type=int_list, default=None,
      help=f"comma-separated k, the steps that branch (g2rpo) or take an SDE step (full_sde) "
           f"(default: {csv(d.branch_steps)})")
    a("--granularities", type=int_list, default=None,
      help=f"comma-separated λ, ODE strides that finish a branch (g2rpo) "
           f"(default: {csv(d.granularities)})")
    a("--window-size", type=int, default=None,
      help=f"mixgrpo: steps in the SDE window (default: {d.window_size})")
    a("--window-stride", type=int, default=None,
      help=f"mixgrpo: steps the window moves at a time (default: {d.window_stride})")
    a("--window-every", type=int, default=None,
      help=f"mixgrpo: iterations between two moves of the window (default: {d.window_every}, "
           f"for {d.num_iterations} iterations; rescale it with --iterations)")
    rd = reward_models.DEFAULTS
    a("--rewards", default="clip",
      help="comma-separated rewards to train on: clip, pickscore, hps (advantages summed; the "
           "paper: hps, or hps,clip with the DFN5B --clip-model)")
    a("--eval-rewards", default=None,
      help="comma-separated rewards evaluations score (default: the training rewards); those "
           "not trained on are reported as out-of-domain")
    a("--clip-model", default=rd["clip_model"],
      help="CLIP score model: a transformers CLIP, or an OpenCLIP one ('hf-hub:org/name' or a "
           "folder with open_clip_config.json; the official recipe's: "
           "hf-hub:apple/DFN5B-CLIP-ViT-H-14-384)")
    a("--pickscore-model", default=rd["pickscore_model"], help="PickScore reward model")
    a("--pickscore-processor", default=rd["pickscore_processor"],
      help="PickScore's tokenizer and image processor")
    a("--hps-checkpoint", default=rd["hps_checkpoint"],
      help="HPS-v2.1 weights: a local file, or org/repo/filename in the Hugging Face cache")
    a("--hps-model", default=rd["hps_model"],
      help="the OpenCLIP architecture the HPS checkpoint is for (a name or a JSON config)")
    a("--lora-rank", type=int, default=64, help="0 = full fine-tune of the transformer")
    a("--lora-alpha", type=float, default=None, help="LoRA alpha (default: the rank)")
    a("--lora-targets", type=name_list, default=None,
      help=f"comma-separated linear layers LoRA adapts, by name or dotted ending as peft "
           f"matches them (default: {csv(LORA_TARGETS)})")
    a("--lr", type=float, default=None,
      help=f"AdamW learning rate (default: {d.lr:g} full fine-tune, 1e-4 LoRA)")
    a("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay")
    a("--clip-range", type=float, default=d.clip_range, help="ε of the clipped ratio")
    a("--adv-clip", type=float, default=d.adv_clip, help="clip of the summed advantages")
    a("--max-grad-norm", type=float, default=d.max_grad_norm, help="gradient-norm clip, > 0")
    a("--kl-beta", type=float, default=d.kl_beta,
      help="β of a KL penalty to the reference policy, against reward hacking (LoRA: the "
           "transformer with its adapter switched off; full fine-tune: a frozen copy in --dtype, "
           "sharded under FSDP2); 0: off")
    a("--ema-decay", type=float, default=d.ema_decay,
      help="EMA of the trainable weights, per optimizer step; evaluation and export use the "
           "averages, the checkpoint keeps both; 0: off")
    a("--step-per-iteration", action="store_true",
      help="one optimizer step per iteration (default: one per branch step)")
    a("--iterations", type=int, default=d.num_iterations, help="outer iterations")
    a("--prompts-per-gpu", type=int, default=d.prompts_per_iteration,
      help="prompts per iteration and process")
    a("--batch-size", type=int, default=8, help="rows per transformer call while sampling")
    a("--decode-batch", type=int, default=4, help="images per VAE decode while scoring")
    a("--gradient-checkpointing", action="store_true", help="recompute activations in backward")
    a("--dtype", choices=["bf16", "fp32"], default=None,
      help="compute dtype (default: bf16 on GPU, fp32 on CPU)")
    a("--attention-backends", default=",".join(DEFAULT_ATTENTION),
      help="scaled_dot_product_attention backends the transformer may use: comma-separated of "
           "flash, efficient, math, cudnn, or 'all' (PyTorch's own pick). The default leaves out "
           "cuDNN, whose bf16 backward fails on Hopper GPUs (docs/gpu.md)")
    a("--output-dir", default="runs/flux", help="checkpoint, metrics.jsonl, eval images")
    a("--overwrite", action="store_true",
      help="replace the run already in --output-dir (its files are deleted)")
    a("--save-every", type=int, default=50, help="checkpoint every N iterations (and at the end)")
    a("--async-save", action="store_true",
      help="write checkpoints in the background (dcp.async_save) while training goes on; costs a "
           "host-memory copy of each process's shards")
    a("--export-every", type=int, default=0,
      help="export the weights for diffusers every N iterations (0: at the end of the run only; "
           "a LoRA is also exported with every checkpoint)")
    a("--max-shard-size", default="10GB",
      help="largest safetensors file of a full fine-tune's export (save_pretrained's units)")
    a("--resume", help="checkpoint directory to continue from (<output-dir>/checkpoint); exact on "
                       "the same number of processes, and on another one but for sampling noise")
    a("--eval", action="store_true",
      help="evaluate on the held-out prompts before and after training (with --iterations 0: "
           "once)")
    a("--eval-every", type=int, default=0,
      help="also evaluate every N iterations (0: only before and after; implies --eval)")
    a("--report-to", choices=flux_run.REPORT_TO, default="none",
      help="experiment tracking: TensorBoard events in <output-dir>/tensorboard, or wandb")
    a("--eval-seeds", type=int_list, default=(0, 1), help="comma-separated evaluation seeds")
    a("--seed", type=int, default=d.seed, help="seeds LoRA's initialisation, prompts and noise")
    args = p.parse_args(argv)
    try:
        check_args(args)
    except (ValueError, OSError, ImportError) as e:
        p.error(str(e))
    return args


def check_args(args):
    """Every flag, before any model loads: fill the defaults that depend on others and raise
    ValueError / OSError naming the flag (or file) and the value."""
    d = g2rpo.Config()
    for field in METHOD_FIELDS:
        if field in g2rpo.UNUSED_FIELDS[args.method] and getattr(args, field) is not None:
            raise ValueError(f"{flag_of(field)} is not used by --method {args.method}")
        if getattr(args, field) is None:
            setattr(args, field, getattr(d, field))
    if args.lora_rank < 0:
        raise ValueError(f"--lora-rank must be >= 0, got {args.lora_rank}")
    if args.lora_targets is not None and args.lora_rank == 0:
        raise ValueError("--lora-targets needs --lora-rank > 0 (a full fine-tune trains every "
                         "weight)")
    if args.lora_targets is None:
        args.lora_targets = tuple(LORA_TARGETS)
    if args.lora_alpha is None:
        args.lora_alpha = float(max(args.lora_rank, 1))
    elif not (math.isfinite(args.lora_alpha) and args.lora_alpha > 0):
        raise ValueError(f"--lora-alpha must be > 0 and finite, got {args.lora_alpha}")
    if args.lr is None:
        args.lr = 1e-4 if args.lora_rank > 0 else g2rpo.Config.lr
    for flag, value in (("--height", args.height), ("--width", args.width)):
        if value <= 0 or value % 16:
            raise ValueError(f"{flag} must be a positive multiple of 16 (FLUX.1: 8x VAE, then "
                             f"2x2 packing), got {value}")
    if args.eval_every < 0:
        raise ValueError(f"--eval-every must be >= 0 (0: off), got {args.eval_every}")
    args.eval = args.eval or args.eval_every > 0
    flux_run.check_report_to(args.report_to)
    if args.export_every < 0:
        raise ValueError(f"--export-every must be >= 0 (0: at the end only), got "
                         f"{args.export_every}")
    try:
        flux_run.parse_size(args.max_shard_size)
    except ValueError as e:
        raise ValueError(f"--max-shard-size: {e}") from None
    for flag, value in (("--save-every", args.save_every), ("--decode-batch", args.decode_batch),
                        ("--max-sequence-length", args.max_sequence_length)):
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    if not math.isfinite(args.guidance):
        raise ValueError(f"--guidance must be finite, got {args.guidance}")
    sdpa_backends(args.attention_backends)
    names = reward_models.reward_names(args.rewards)
    if args.eval_rewards is not None:
        names += reward_models.reward_names(args.eval_rewards, "--eval-rewards")
    if "hps" in names:  # a file: found (or named missing) now; the models load before FLUX
        reward_models.resolve_file(args.hps_checkpoint, "--hps-checkpoint")
    try:
        make_config(args)
    except g2rpo.ConfigError as e:
        raise ValueError(f"{flag_of(e.field)}: {e}") from None
    read_prompts(args.prompts)
    read_prompts(args.eval_prompts, BUILTIN_EVAL_PROMPTS)
    if args.resume is not None:
        if args.overwrite:
            raise ValueError("--resume and --overwrite exclude each other")
        try:  # its files, and every setting but the transformer's config (checked once loaded)
            path, meta, _ = flux_run.read_checkpoint(args.resume)
            flux_run.check_fingerprint(path, meta["fingerprint"], settings(args),
                                       ignore=("transformer_config",))
        except flux_run.CheckpointError as e:
            raise ValueError(f"--resume: {e}") from None
    check_pipeline_class(args.model)
    if args.lora_rank > 0 and (meta := transformer_on_meta(args.model)) is not None:
        check_lora_targets(meta, args.lora_targets)
    flux_run.check_writable_dir(args.output_dir)


def main(argv=None):
    """Parse, train (and evaluate); under torchrun, tear the process group down cleanly."""
    args = parse_args(argv)
    rank, world, device = init_distributed()
    try:
        result = train_flux(args, rank, world, device)
        if dist.is_initialized():
            gc.collect()  # free DDP / FSDP state (closures hold it) before its process group goes
            dist.barrier()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return result


def train_flux(args, rank, world, device):
    """Everything main does between process-group set-up and tear-down; the output directory
    is locked for the whole run."""
    run = flux_run.RunDirectory(args.output_dir, resume=args.resume is not None,
                                overwrite=args.overwrite, is_main=rank == 0)
    try:
        return _train_flux(args, rank, world, device, run)
    finally:
        run.close()


def _train_flux(args, rank, world, device, run):
    is_main = rank == 0
    say = print if is_main else (lambda *a, **k: None)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[
        args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    cfg = make_config(args, rank)
    prompts = read_prompts(args.prompts)
    eval_prompts = read_prompts(args.eval_prompts, BUILTIN_EVAL_PROMPTS)
    # Rewards first: a missing reward model is found before FLUX loads (minutes at full size).
    # Each is loaded once, whether it trains, evaluates or both.
    train_names = reward_models.reward_names(args.rewards)
    eval_names = reward_models.reward_names(args.eval_rewards or train_names, "--eval-rewards")
    loaded = reward_models.load_rewards(
        list(dict.fromkeys(train_names + eval_names)), device, clip_model=args.clip_model,
        pickscore_model=args.pickscore_model, pickscore_processor=args.pickscore_processor,
        hps_checkpoint=args.hps_checkpoint, hps_model=args.hps_model)
    rewards = {n: loaded[n] for n in train_names}
    eval_rewards = {n: loaded[n] for n in eval_names}
    pipe = load_pipeline(args.model, device, dtype)
    check_image_size(pipe, args.height, args.width)
    encoder = PromptEncoder(pipe, args.max_sequence_length)
    sigmas = flux_sigmas(pipe, args.steps, args.height, args.width, args.schedule, args.shift)
    raw = pipe.transformer
    full_reference = cfg.kl_beta > 0 and not args.lora_rank  # LoRA's: the adapter switched off
    sharded = dist.is_initialized()  # torchrun, even with one process: FSDP2 shards the policy
    reference = frozen_reference(raw, dtype) if full_reference and not sharded else None
    torch.manual_seed(args.seed)  # LoRA's initialisation: same seed, same adapters (all ranks)
    setup_trainable(raw, args.lora_rank, args.lora_alpha, args.gradient_checkpointing,
                    upcast=world == 1, lora_targets=args.lora_targets)
    model = wrap_distributed(raw, args.lora_rank, device)
    if full_reference and sharded:
        reference = frozen_reference(raw, dtype)  # from the policy's shards
    params = [p for p in model.parameters() if p.requires_grad]  # FSDP2 swaps in DTensors
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    ema = g2rpo.EMA(raw, cfg.ema_decay) if cfg.ema_decay > 0 else None  # sharded like params
    # Evaluation and export use the EMA weights when there is one.
    averaged = ema.applied if ema is not None else contextlib.nullcontext
    which = f" (EMA weights, decay {cfg.ema_decay:g})" if ema is not None else ""
    generator = torch.Generator(device).manual_seed(cfg.seed)
    velocity = FluxVelocity.from_pipe(model, pipe, args.height, args.width, args.guidance, dtype,
                                      args.attention_backends)
    # Evaluation bypasses DDP (no gradient, no collectives); FSDP2 needs every rank's forward.
    eval_velocity = FluxVelocity.from_pipe(getattr(model, "module", model), pipe, args.height,
                                           args.width, args.guidance, dtype,
                                           args.attention_backends)
    ref_velocity = reference_velocity(raw, reference, pipe, args, dtype) if cfg.kl_beta else None
    fp = fingerprint(args, raw)
    out, ckpt_path = run.path, run.path / flux_run.CHECKPOINT
    start = 0
    if args.resume:
        start = flux_run.load_checkpoint(args.resume, model, optimizer, generator, fp, args.seed,
                                         lr=cfg.lr, log=say, ema=ema)
        say(f"resumed from {args.resume} at iteration {start}")
    run.start(start)  # metrics.jsonl keeps only the iterations before `start`
    n_train = sum(p.numel() for p in params)
    trained = f"LoRA r={args.lora_rank}" if args.lora_rank else "full fine-tune"
    backend = f" ({dist.get_backend()})" if dist.is_initialized() else ""
    say(f"{world} process(es){backend} on {device}, {dtype}; {trained} ({n_train / 1e6:.2f} M "
        f"trainable); {len(prompts)} prompts; σ grid {[round(s, 3) for s in sigmas.tolist()]}")
    if cfg.kl_beta:
        say(f"KL penalty β = {cfg.kl_beta:g} to the reference: " + (
            "the transformer with its LoRA switched off" if args.lora_rank else
            f"a frozen copy of the pretrained transformer ({dtype}"
            + (", sharded)" if dist.is_initialized() else ")")))
    if ema is not None:
        say(f"EMA of the trainable weights, decay {cfg.ema_decay:g}: evaluations and exports use "
            f"the averages; checkpoints keep both")

    tracker = flux_run.Tracker(args.report_to, out, vars(args), args.branch_steps,
                               args.granularities, start, is_main)
    evaluations = []

    def run_eval(iteration):
        """Evaluate after `iteration` iterations: eval.json, a captioned grid, the tracker."""
        with averaged():
            scores, images = evaluate(pipe, eval_velocity, encoder, eval_rewards, eval_prompts,
                                      args.height, args.width, sigmas, args.eval_seeds)
        scores = flux_run.by_domain(scores, train_names)
        grid = flux_run.captioned_grid(images, eval_prompts, args.eval_seeds,
                                       f"after {iteration} iterations")
        path = run.record_eval(iteration, scores, grid)
        tracker.evaluation(iteration, scores, grid)
        evaluations.append({"iteration": iteration, **scores})
        say(f"eval after {iteration} iterations{which}: {flux_run.domain_text(scores)}  "
            f"({path})")

    stopper = flux_run.GracefulStop(log=say)
    checkpointer = flux_run.Checkpointer(ckpt_path, args.async_save, log=say)
    max_shard = flux_run.parse_size(args.max_shard_size)

    def callback(it, metrics):
        metrics.update(flux_run.all_reduce_metrics(metrics, world))  # train's history sees them
        run.log_metrics(metrics)  # rows after the last checkpoint are dropped on resume
        tracker.scalars(metrics)
        stop = stopper.should_stop(world)
        end = it + 1 == cfg.num_iterations
        saved = stop or (it + 1) % args.save_every == 0 or end
        if saved:
            checkpointer.save(model, optimizer, generator, it, fp, ema)
        # A LoRA is small: exported with every checkpoint. A full transformer (24 GB in bf16 at
        # FLUX.1-dev's size): at the end and every --export-every iterations only.
        if end or (saved and args.lora_rank) or (args.export_every
                                                 and (it + 1) % args.export_every == 0):
            with averaged():
                path = flux_run.export_weights(out, model, raw, args.lora_rank, dtype, max_shard)
            if path is not None and not args.lora_rank:
                say(f"exported the transformer after {it + 1} iterations ({dtype}){which}: "
                    f"{path}")
        if args.eval_every and (it + 1) % args.eval_every == 0 and not stop:
            run_eval(it + 1)
        return stop

    reward_fn = make_reward_fn(pipe, rewards, args.height, args.width, args.decode_batch)
    history = []
    try:
        if args.eval:
            run_eval(start)
        if args.resume and start >= cfg.num_iterations:
            say(f"checkpoint is at iteration {start} of {cfg.num_iterations}: nothing to train")
        else:
            with stopper:
                history = g2rpo.train(model, velocity, reward_fn, prompts, cfg,
                                      latent_shape(pipe, args.height, args.width),
                                      encode_prompts=encoder, optimizer=optimizer,
                                      generator=generator, start_iteration=start,
                                      callback=callback, log=print if is_main else None,
                                      progress=is_main, sigmas=sigmas, ema=ema,
                                      ref_velocity_fn=ref_velocity)
        checkpointer.close()  # an asynchronous save in flight is finished and moved into place
        end = history[-1]["iteration"] + 1 if history else start
        if stopper.requested:
            say(f"stopped by {stopper.requested} after iteration {end - 1}; checkpoint written "
                f"to {ckpt_path}. To continue, rerun the same command with --resume {ckpt_path}")
        elif args.eval and end not in {e["iteration"] for e in evaluations}:
            run_eval(end)
    finally:
        tracker.close()
        checkpointer.close()  # no-op unless training raised with a save in flight
    if dist.is_initialized():
        flux_run.check_ranks_in_sync(params, out, is_main)
    return history, evaluations


if __name__ == "__main__":
    try:
        main()
    except flux_run.CheckpointError as e:  # a refused resume: one line, not a traceback
        if os.environ.get("RANK", "0") == "0":
            print(f"flux_flow.py: error: {e}", file=sys.stderr)
        sys.exit(1)
