"""G²RPO on the diffusers flow-matching image models: one trainer for every family.

    # one GPU, LoRA (the family comes from the checkpoint's model_index.json)
    python image_flow.py --model black-forest-labs/FLUX.1-dev --lora-rank 64 --rewards clip,pickscore
    python image_flow.py --model stabilityai/stable-diffusion-3.5-medium --lora-rank 64
    # the official recipe: full fine-tune, FSDP2, one prompt per GPU
    torchrun --nproc_per_node 8 image_flow.py --model /path/FLUX.1-dev --lora-rank 0 --height 720 --width 720
    # evaluation only: ODE samples for the held-out prompts, mean rewards, an image grid
    python image_flow.py --model ... --eval --iterations 0

What a family does differently (prompt encoding, latent layout, σ grid, timestep convention,
guidance, decoding, LoRA targets) is in its own file (flux_flow.py, sd3_flow.py,
qwen_image_flow.py, flux2_klein_flow.py, z_image_flow.py), behind the seam in families.py; g2rpo.py stays model-agnostic; the reward models are in rewards.py; run
directories, checkpoints, export and signals in flux_run.py. Latents are kept in float32 between
steps, in the family's layout; the transformer runs in --dtype (bf16 autocast on GPU) and
log-probabilities are computed in float32.
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

import flux_run
import g2rpo
from families import (DEFAULT_ATTENTION, FAMILIES, Family, Velocity, _enabled_sdpa_backends,
                      attention_context, checkpoint_keeping_attention, family_for, family_of,
                      sdpa_backends, supported, weightless_pipeline)
from flux_parallel import (adapters_disabled, frozen_reference, init_distributed,
                           wrap_distributed)
import rewards as reward_models
import studies

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


# ----------------------------------------------------------------------------------------------
# Loading the pipeline and prompts.


def checkpoint_file(path, name):
    """A file of a diffusers checkpoint (a local folder, or a Hub id already in the cache), or
    None when it is not on this machine yet (load_pipeline then names what is missing)."""
    if Path(path).is_dir():
        f = Path(path) / name
        return f if f.is_file() else None
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(path, name) if path.count("/") == 1 else None
    return Path(cached) if isinstance(cached, str) else None


def model_index(path):
    """The checkpoint's model_index.json as a dict, or None when it is not on this machine."""
    index = checkpoint_file(path, "model_index.json")
    return None if index is None else json.loads(index.read_text())


def check_pipeline_class(path):
    """The Family of the checkpoint's pipeline class (model_index.json's _class_name), or None
    when that file is not on this machine yet; another class is refused before any weights
    load."""
    index = model_index(path)
    if index is None:
        return None
    try:
        return family_for(index.get("_class_name"))
    except ValueError as e:
        raise ValueError(f"--model {path}: {e}") from None


def load_pipeline(path, device="cpu", dtype=torch.float32):
    """The family's pipeline class .from_pretrained(path), every model in it frozen and in eval
    mode (the trainer never switches modes: sampling == training)."""
    import diffusers

    family = check_pipeline_class(path)
    cls = getattr(diffusers, family.pipeline) if family else diffusers.DiffusionPipeline
    what = family.pipeline if family else f"a diffusers pipeline ({supported()})"
    try:
        with warnings.catch_warnings():  # newer diffusers renames torch_dtype to dtype
            warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
            pipe = cls.from_pretrained(path, torch_dtype=dtype)
    except (OSError, ValueError) as e:
        raise OSError(f"could not load {what} from {path!r}: {e}. Pass a local folder "
                      f"(save_pretrained layout) or a Hub id that is already downloaded.") from e
    family_of(pipe)  # a Hub checkpoint of another class, read without its model_index first
    pipe.to(device)
    for m in pipe.components.values():
        if isinstance(m, torch.nn.Module):
            m.requires_grad_(False).eval()
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
    """Encodes prompts once under no_grad, through the family's encode (the pipeline's own
    encode_prompt), and caches each prompt's rows on the CPU.

    With a negative prompt (guidance that needs an unconditional row) it returns
    {"cond": rows, "uncond": the negative prompt's rows, repeated}; otherwise the rows.
    """

    def __init__(self, pipe, max_sequence_length=None, negative_prompt=None):
        self.pipe, self.family, self.cache = pipe, family_of(pipe), {}
        self.max_len = max_sequence_length or self.family.max_sequence_length
        self.negative_prompt = negative_prompt

    @torch.no_grad()
    def rows(self, prompts):
        """list of P prompts → a tuple of (P, ...) tensors on the transformer's device."""
        # One prompt at a time: its rows then do not depend on which prompts shared its batch
        # (last bits of batched matmuls do), so a resumed run encodes what the first run did.
        for p in dict.fromkeys(prompts):
            if p not in self.cache:  # a fresh list: some pipelines rewrite the one they are given
                (row,) = self.family.encode(self.pipe, [p], self.max_len)
                self.cache[p] = tuple(t.cpu() for t in row)
        device = self.pipe.transformer.device
        return tuple(t.to(device) for t in self.family.collate([self.cache[p] for p in prompts]))

    def __call__(self, prompts):
        prompts = list(prompts)
        if self.negative_prompt is None:
            return self.rows(prompts)
        # One collated batch, so that both halves share a text length (padded where they differ).
        both = self.rows(prompts + [self.negative_prompt] * len(prompts))
        return {"cond": tuple(t[: len(prompts)] for t in both),
                "uncond": tuple(t[len(prompts) :] for t in both)}


# ----------------------------------------------------------------------------------------------
# The flow: σ grid, noise, decoding (what differs per family: families.py and its modules).


def check_image_size(pipe, height, width):
    family_of(pipe).check_image_size(pipe, height, width)


def latent_shape(pipe, height, width):
    """The shape of one sampler state in the family's layout (FLUX.1: packed (S, C))."""
    check_image_size(pipe, height, width)
    return tuple(family_of(pipe).latent_shape(pipe, height, width))


def sigma_grid(pipe, num_steps, height, width, schedule="static", shift=3.0):
    """(T+1,) σ grid: "static" is the official recipe (SPEC §1), "pipeline" is the grid the
    family's pipeline itself uses at this size (a copy of its scheduler, asked as its __call__
    asks it)."""
    if schedule == "static":
        return g2rpo.sigma_schedule(num_steps, shift)
    if schedule != "pipeline":
        raise ValueError(f"schedule must be 'static' or 'pipeline', got {schedule!r}")
    return family_of(pipe).pipeline_sigmas(pipe, num_steps, height, width).float().cpu()


@torch.no_grad()
def decode(pipe, latents, height, width):
    """Sampler states (B, *D) → images in [0, 1], (B, 3, H, W) float32, as the pipeline decodes
    them (the family's unpacking and the VAE config's scaling and shift)."""
    image = family_of(pipe).decode(pipe, latents, height, width)
    return (image.float() / 2 + 0.5).clamp(0, 1)


@torch.no_grad()
def sample(pipe, velocity, encoder, prompts, height, width, sigmas, generator):
    """Deterministic sampling (η = 0) with g2rpo.ode_step: the pipeline's loop, our steps.

    Initial noise is the pipeline's own draw (its prepare_latents) with the caller's generator,
    so for the same generator the result equals the pipeline's on the same σ grid.
    Returns (latents (B, *D) float32, images (B, 3, H, W) in [0, 1]).
    """
    check_image_size(pipe, height, width)
    cond = encoder(list(prompts))
    rows = cond["cond"] if isinstance(cond, dict) else cond
    x = family_of(pipe).noise(pipe, len(prompts), height, width, rows[0].dtype, generator).float()
    sigmas = sigmas.to(x.device)
    for i in range(len(sigmas) - 1):
        v = velocity(x, sigmas[i].expand(len(x)), cond)
        x = g2rpo.ode_step(x, v, sigmas[i], sigmas[i + 1])
    return x, decode(pipe, x, height, width)


# ----------------------------------------------------------------------------------------------
# Rewards (the models themselves: rewards.py, shared by every adapter).


def make_reward_fn(pipe, rewards, height, width, decode_batch=4):
    """g2rpo's reward_fn: sampler states (n, *D), prompts → (n, R), decoding in small chunks."""

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


def pipeline_on_meta(path):
    """The checkpoint's pipeline class around its transformer and VAE built from their configs
    on the meta device (no weights; the text encoders left out), or None when those configs are
    not on this machine yet: sizes, ids and LoRA targets can be checked before loading."""
    index = model_index(path)
    configs = {k: checkpoint_file(path, f"{k}/config.json") for k in ("transformer", "vae")}
    if index is None or None in configs.values():
        return None
    import diffusers

    models = {}
    with torch.device("meta"):
        for name, config in configs.items():  # model_index: {"vae": ["diffusers", "<class>"]}
            cls = getattr(diffusers, index[name][1])
            models[name] = cls.from_config(json.loads(config.read_text()))
    return weightless_pipeline(index["_class_name"], **models)


def setup_trainable(transformer, lora_rank, lora_alpha, gradient_checkpointing=False,
                    upcast=True, lora_targets=Family.lora_targets):
    """LoRA adapters (float32) on `lora_targets` (default: joint attention's projections, as
    FLUX.1 and SD3 name them), or the whole transformer.

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
    velocity = Velocity.from_pipe(reference if reference is not None else raw, pipe,
                                  args.height, args.width, args.guidance, dtype,
                                  args.attention_backends, guidance_options(args))
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
            **({"lora_targets": None if args.lora_targets is None else list(args.lora_targets)}
               if args.lora_rank and tuple(args.lora_targets or ()) != Family.lora_targets
               else {}),
            **({"negative_prompt": args.negative_prompt} if args.negative_prompt else {}),
            **guidance_options(args),
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


int_list = studies.int_tuple  # '0,1,2' → (0, 1, 2) for argparse; empty or non-integer: refused


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


# Guidance flags that only some families take (families.Family.guidance_options).
GUIDANCE_OPTIONS = ("true_cfg", "cfg_normalization", "cfg_truncation")


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
    # "flux_flow.py: error: …" when run as flux_flow.py; image_flow.py from other callers.
    prog = Path(sys.argv[0]).name if sys.argv[0].endswith("_flow.py") else "image_flow.py"
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=HelpFormatter)
    a = p.add_argument
    families = [family_for(c) for c in FAMILIES]
    a("--model", default="black-forest-labs/FLUX.1-dev",
      help=f"a diffusers checkpoint (folder or Hub id) of {supported()}; its model_index.json "
           f"says which")
    a("--prompts",
      help=f"training prompts, UTF-8, one per line (default: {len(BUILTIN_PROMPTS)} built-in)")
    a("--eval-prompts", help="held-out prompts, one per line (default: 4 built-in)")
    a("--height", type=int, default=512, help="image height, a multiple of 16")
    a("--width", type=int, default=512, help="image width, a multiple of 16")
    a("--steps", type=int, default=d.num_steps, help="T sampling steps")
    a("--schedule", choices=["static", "pipeline"], default="static",
      help="static shift (official recipe) or the grid the model's pipeline uses at this size")
    a("--shift", type=float, default=d.shift, help="static shift of the σ grid")
    a("--guidance", type=float, default=None,
      help="guidance scale, in the model's own form (default per family): " + "; ".join(
          f"{f.name}: {f.guidance_help} (default {f.guidance:g})" for f in families))
    a("--negative-prompt", default="",
      help="the unconditional row's prompt, for guidance that has one (FLUX.1's --true-cfg, SD3, "
           "Qwen-Image, Z-Image)")
    a("--true-cfg", type=float, default=None,
      help="FLUX.1: true classifier-free guidance v_u + s·(v_c − v_u) against --negative-prompt "
           "besides the distilled embedding, on for s > 1 (the pipeline's true_cfg_scale; "
           "default off)")
    a("--cfg-normalization", type=float, default=None,
      help="Z-Image: clamp the guided velocity's norm to this multiple of the conditional one's "
           "(the pipeline's cfg_normalization; default off)")
    a("--cfg-truncation", type=float, default=None,
      help="Z-Image: no guidance at steps where 1 − σ exceeds this (the pipeline's "
           "cfg_truncation; default 1: never)")
    a("--max-sequence-length", type=int, default=None,
      help="text-encoder tokens per prompt (default: the pipeline's, " + ", ".join(
          f"{f.name} {f.max_sequence_length}" for f in families) + ")")
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
           f"matches them (default: the family's; " + "; ".join(
               f"{f.name}: {csv(f.lora_targets)}" for f in families) + ")")
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
    a("--output-dir", default=None,
      help="checkpoint, metrics.jsonl, eval images (default: runs/<family>: " + ", ".join(
          f"runs/{f.slug}" for f in families) + ")")
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
    if args.lora_alpha is None:
        args.lora_alpha = float(max(args.lora_rank, 1))
    elif not (math.isfinite(args.lora_alpha) and args.lora_alpha > 0):
        raise ValueError(f"--lora-alpha must be > 0 and finite, got {args.lora_alpha}")
    if args.lr is None:
        args.lr = 1e-4 if args.lora_rank > 0 else g2rpo.Config.lr
    for flag, value in (("--height", args.height), ("--width", args.width)):
        if value <= 0 or value % 16:
            raise ValueError(f"{flag} must be a positive multiple of 16 (an 8x VAE, then 2x2 "
                             f"patches), got {value}")
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
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    if args.guidance is not None and not math.isfinite(args.guidance):
        raise ValueError(f"--guidance must be finite, got {args.guidance}")
    for option, value in guidance_options(args).items():
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{flag_of(option)} must be >= 0 and finite, got {value}")
    sdpa_backends(args.attention_backends)
    names = reward_models.reward_names(args.rewards)
    if args.eval_rewards is not None:
        names += reward_models.reward_names(args.eval_rewards, "--eval-rewards")
    if "hps" in names:  # a file: found (or named missing) now; rewards load before the model
        reward_models.resolve_file(args.hps_checkpoint, "--hps-checkpoint")
    try:
        make_config(args)
    except g2rpo.ConfigError as e:
        raise ValueError(f"{flag_of(e.field)}: {e}") from None
    read_prompts(args.prompts)
    read_prompts(args.eval_prompts, BUILTIN_EVAL_PROMPTS)
    # The family, from the checkpoint's model_index.json when it is on this machine (a Hub
    # checkpoint not downloaded yet: its defaults are filled in once it has loaded).
    args.family = None
    family = check_pipeline_class(args.model)
    shell = pipeline_on_meta(args.model) if family is not None else None
    meta = shell.transformer if shell is not None else None
    if family is not None:
        apply_family(args, family, model_index(args.model),
                     meta.config if meta is not None else {})
    if shell is not None:
        try:  # the family's own limits (SD3: its position table), with the VAE's real factor
            family.check_image_size(shell, args.height, args.width)
        except ValueError as e:
            raise ValueError(f"--{e}") from None
    if args.output_dir is None:  # needed now: the run directory is locked before loading
        args.output_dir = f"runs/{Path(args.model).name.lower()}"
    if args.resume is not None:
        if args.overwrite:
            raise ValueError("--resume and --overwrite exclude each other")
        try:  # its files, and every setting known now (the rest is checked once loaded)
            path, saved, _ = flux_run.read_checkpoint(args.resume)
            now = settings(args)
            flux_run.check_fingerprint(path, saved["fingerprint"], now, ignore=(
                "transformer_config", *[k for k, v in now.items() if v is None]))
        except flux_run.CheckpointError as e:
            raise ValueError(f"--resume: {e}") from None
    if args.lora_rank > 0 and meta is not None:
        check_lora_targets(meta, args.lora_targets)
    flux_run.check_writable_dir(args.output_dir)


def guidance_options(args):
    """The family-specific guidance flags that were given, by name (Z-Image's norm clamp and
    truncation)."""
    return {k: getattr(args, k) for k in GUIDANCE_OPTIONS if getattr(args, k, None) is not None}


def apply_family(args, family, index, transformer_config):
    """Check the flags whose meaning depends on the family and fill in their defaults; once,
    when the family is known (args.family then names it). index: the checkpoint's
    model_index.json (the pipeline's config)."""
    family.check_guidance(dict(index), dict(transformer_config), args.guidance)
    if args.negative_prompt and not family.negative_prompt:
        raise ValueError(f"--negative-prompt: {family.name}'s pipeline takes none (its "
                         f"unconditional row is the empty prompt)")
    for option in guidance_options(args):
        if option not in family.guidance_options:
            raise ValueError(f"{flag_of(option)} is not an option of {family.name}'s guidance")
    args.family = family.name
    if args.guidance is None:
        args.guidance = family.default_guidance(dict(index))
    if args.max_sequence_length is None:
        args.max_sequence_length = family.max_sequence_length
    if args.lora_targets is None:
        args.lora_targets = family.lora_targets
    if args.output_dir is None:
        args.output_dir = f"runs/{family.slug}"


def main(argv=None):
    """Parse, train (and evaluate); under torchrun, tear the process group down cleanly."""
    args = parse_args(argv)
    rank, world, device = init_distributed()
    try:
        result = run_training(args, rank, world, device)
        if dist.is_initialized():
            gc.collect()  # free DDP / FSDP state (closures hold it) before its process group goes
            dist.barrier()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return result


def run_training(args, rank, world, device):
    """Everything main does between process-group set-up and tear-down; the output directory
    is locked for the whole run."""
    run = flux_run.RunDirectory(args.output_dir, resume=args.resume is not None,
                                overwrite=args.overwrite, is_main=rank == 0)
    try:
        return _run_training(args, rank, world, device, run)
    finally:
        run.close()


def _run_training(args, rank, world, device, run):
    is_main = rank == 0
    say = print if is_main else (lambda *a, **k: None)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[
        args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    cfg = make_config(args, rank)
    prompts = read_prompts(args.prompts)
    eval_prompts = read_prompts(args.eval_prompts, BUILTIN_EVAL_PROMPTS)
    # Rewards first: a missing reward model is found before the image model loads (minutes at
    # full size).
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
    family = family_of(pipe)
    if args.family is None:  # a Hub checkpoint that was not on this machine at check_args
        apply_family(args, family, pipe.config, pipe.transformer.config)
    check_image_size(pipe, args.height, args.width)
    encoder = PromptEncoder(pipe, args.max_sequence_length,
                            args.negative_prompt
                            if family.uses_negative(args.guidance, **guidance_options(args))
                            else None)
    sigmas = sigma_grid(pipe, args.steps, args.height, args.width, args.schedule, args.shift)
    raw = pipe.transformer
    full_reference = cfg.kl_beta > 0 and not args.lora_rank  # LoRA's: the adapter switched off
    sharded = dist.is_initialized()  # torchrun, even with one process: FSDP2 shards the policy
    reference = frozen_reference(raw, dtype) if full_reference and not sharded else None
    torch.manual_seed(args.seed)  # LoRA's initialisation: same seed, same adapters (all ranks)
    setup_trainable(raw, args.lora_rank, args.lora_alpha, args.gradient_checkpointing,
                    upcast=world == 1, lora_targets=args.lora_targets)
    model = wrap_distributed(raw, args.lora_rank, device, family.unused_parameters)
    if full_reference and sharded:
        reference = frozen_reference(raw, dtype)  # from the policy's shards
    params = [p for p in model.parameters() if p.requires_grad]  # FSDP2 swaps in DTensors
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    ema = g2rpo.EMA(raw, cfg.ema_decay) if cfg.ema_decay > 0 else None  # sharded like params
    # Evaluation and export use the EMA weights when there is one.
    averaged = ema.applied if ema is not None else contextlib.nullcontext
    which = f" (EMA weights, decay {cfg.ema_decay:g})" if ema is not None else ""
    generator = torch.Generator(device).manual_seed(cfg.seed)
    velocity = Velocity.from_pipe(model, pipe, args.height, args.width, args.guidance, dtype,
                                  args.attention_backends, guidance_options(args))
    # Evaluation bypasses DDP (no gradient, no collectives); FSDP2 needs every rank's forward.
    eval_velocity = Velocity.from_pipe(getattr(model, "module", model), pipe, args.height,
                                       args.width, args.guidance, dtype, args.attention_backends,
                                       guidance_options(args))
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
    rows = "2 transformer rows per sample" if velocity.cfg else "1 transformer row per sample"
    say(f"{family.name} ({type(pipe).__name__}); {world} process(es){backend} on {device}, "
        f"{dtype}; {trained} ({n_train / 1e6:.2f} M trainable); {len(prompts)} prompts; "
        f"guidance {args.guidance:g} ({rows}); σ grid {[round(s, 3) for s in sigmas.tolist()]}")
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
                path = flux_run.export_weights(out, model, raw, args.lora_rank, dtype, max_shard,
                                               type(pipe))
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


def cli():
    """The command line: main(), with a refused resume as one line instead of a traceback."""
    try:
        main()
    except flux_run.CheckpointError as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"{Path(sys.argv[0]).name}: error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    cli()
