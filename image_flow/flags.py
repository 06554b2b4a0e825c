"""The image trainer's command line: flags built from g2rpo.Config and the families, their checks
before any model loads, and what they mean (the g2rpo.Config, the settings a checkpoint must
match). A family's own flags (its guidance options) and help come from its module.
"""

import argparse
import math
import os
import sys

import g2rpo
# '0,1,2' → (0, 1, 2) for argparse; empty or non-integer: refused (the CPU worlds' parser).
from worlds.studies import int_tuple as int_list

from . import checkpoints, rewards as reward_models, runs
from .attention import DEFAULT_ATTENTION, sdpa_backends
from .families import all_families, supported
from .families.seam import Family
from .loading import (BUILTIN_EVAL_PROMPTS, BUILTIN_PROMPTS, check_lora_targets,
                      check_pipeline_class, model_index, pipeline_on_meta, read_prompts)
from .prompts import default_cache


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
    """The description (the package docstring) as written; each flag's default once, in the form
    the flag takes. A help text that states its default itself, a None default (filled in from
    other flags) and on/off switches get no suffix."""

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


def guidance_flags():
    """{option: (the families whose guidance takes it, its help)}: the flags families declare."""
    flags = {}
    for family in all_families():
        for option, help in family.guidance.options.items():
            names, _ = flags.get(option, ((), help))
            flags[option] = ((*names, family.name), help)
    return flags


def make_config(args, rank=0):
    """The g2rpo.Config of these arguments; each rank draws its own prompts and noise."""
    return g2rpo.Config(num_steps=args.steps, shift=args.shift, eta=args.eta,
                        sde_kind=args.sde_kind,
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
            **({"sde_kind": args.sde_kind} if args.sde_kind != g2rpo.Config.sde_kind else {}),
            **({"lora_targets": None if args.lora_targets is None else list(args.lora_targets)}
               if args.lora_rank and tuple(args.lora_targets or ()) != Family.lora_targets
               else {}),
            **({"negative_prompt": args.negative_prompt} if args.negative_prompt else {}),
            **guidance_options(args),
            **({k: getattr(args, k) for k in ("window_size", "window_stride", "window_every")}
               if args.method == "mixgrpo" else {})}


def parse_args(argv=None):
    """The command line, checked (check_args) before any model loads."""
    # No abbreviations: a typo must not silently pick another flag (--cfg: --cfg-normalization).
    p = argparse.ArgumentParser(prog="python -m image_flow",
                                description=sys.modules[__package__].__doc__,
                                formatter_class=HelpFormatter, allow_abbrev=False)
    d, families = g2rpo.Config(), all_families()
    _model_flags(p.add_argument, d, families)
    _algorithm_flags(p.add_argument, d)
    _reward_flags(p.add_argument)
    _training_flags(p.add_argument, d, families)
    _run_flags(p.add_argument, d, families)
    args = p.parse_args(argv)
    try:
        check_args(args)
    except (ValueError, OSError, ImportError) as e:
        p.error(str(e))
    if os.environ.get("RANK", "0") == "0":  # before any weights load (and with --plan)
        print(args.recipe_line, flush=True)
    return args


def _model_flags(a, d, families):
    """The checkpoint, the images, the σ grid, guidance and text."""
    a("--model", default="black-forest-labs/FLUX.1-dev",
      help=f"a diffusers checkpoint (folder or Hub id) of {supported()}; its model_index.json "
           f"says which")
    a("--prompts",
      help=f"training prompts, UTF-8, one per line (default: {len(BUILTIN_PROMPTS)} built-in)")
    a("--eval-prompts", help="held-out prompts, one per line (default: 4 built-in)")
    a("--height", type=int, default=512, help="image height, a multiple of 16")
    a("--width", type=int, default=512, help="image width, a multiple of 16")
    a("--recipe", choices=["auto", "base", "distilled"], default="auto",
      help="the defaults of --steps, --schedule, --branch-steps, --guidance and --eval-steps: "
           f"'base' is the paper's (T = {d.num_steps} on the static grid, the family's guidance, "
           "evaluation at the pipeline's own steps); 'distilled' a step-distilled checkpoint's "
           "(its few steps on its pipeline's grid for training and evaluation, guidance off); "
           "'auto' reads which from the checkpoint (FLUX.2 [klein]'s is_distilled, FLUX.1's "
           "guidance_embeds) and takes 'base' where nothing declares it, saying so (SD3, "
           "Qwen-Image, Z-Image: give 'distilled' for SD3.5 Large Turbo, Z-Image-Turbo)")
    a("--steps", type=int, default=None,
      help=f"T sampling steps (default: {d.num_steps} for 'base'; for 'distilled' the "
           f"checkpoint's own: " + ", ".join(f"{f.name} {f.distilled_steps}" for f in families)
           + ")")
    a("--schedule", choices=["static", "pipeline"], default=None,
      help="static shift (the official recipe; default for 'base') or the grid the model's "
           "pipeline uses at this size (default for 'distilled')")
    a("--eval-steps", type=int, default=None,
      help="steps of evaluation's samples, on the pipeline's own grid (default: the pipeline's "
           "inference steps, " + ", ".join(f"{f.name} {f.inference_steps}" for f in families)
           + "; a distilled checkpoint's: --steps)")
    a("--shift", type=float, default=d.shift, help="static shift of the σ grid")
    a("--guidance", type=float, default=None,
      help="guidance scale, in the model's own form (default per family): " + "; ".join(
          f"{f.name}: {f.guidance.help} (default {f.guidance.default:g})" for f in families))
    takes = [f.name for f in families if f.guidance.negative_prompt]
    a("--negative-prompt", default="",
      help=f"the unconditional row's prompt, for guidance that has one ({', '.join(takes)})")
    for option, (names, help) in guidance_flags().items():  # each family's own guidance flags
        a(flag_of(option), type=float, default=None, help=f"{' and '.join(names)}: {help}")
    a("--max-sequence-length", type=int, default=None,
      help="text-encoder tokens per prompt (default: the pipeline's, " + ", ".join(
          f"{f.name} {f.max_sequence_length}" for f in families) + ")")


def _algorithm_flags(a, d):
    """The method and g2rpo.Config's fields."""
    a("--method", choices=g2rpo.METHODS, default=d.method,
      help="G²RPO, or a baseline: full-SDE GRPO (SDE at every branch step) or MixGRPO (SDE in "
           "a window of steps that slides as training goes on)")
    a("--eta", type=float, default=d.eta,
      help="η, SDE noise level (with --sde-kind cps: the step's std is σ'·sin(η·π/2), η <= 1)")
    a("--sde-kind", choices=g2rpo.SDE_KINDS, default=d.sde_kind,
      help="the SDE step: flow_grpo (the paper's) or cps (Coefficients-Preserving Sampling, "
           "arXiv 2509.05952; docs/algorithm.md)")
    a("--group-size", type=int, default=d.group_size, help="G, members per prompt")
    a("--branch-steps", type=int_list, default=None,
      help=f"comma-separated k, the steps that branch (g2rpo) or take an SDE step (full_sde) "
           f"(default: the first half of the T steps, 0..T/2 − 1: {csv(d.branch_steps)} for "
           f"T = {d.num_steps}, 0,1 for T = 4)")
    a("--granularities", type=int_list, default=None,
      help=f"comma-separated λ, ODE strides that finish a branch (g2rpo) (default: "
           f"{csv(d.granularities)}, less those whose completion repeats another's at some "
           f"branch step: 1 at T = 4)")
    a("--window-size", type=int, default=None,
      help=f"mixgrpo: steps in the SDE window (default: {d.window_size})")
    a("--window-stride", type=int, default=None,
      help=f"mixgrpo: steps the window moves at a time (default: {d.window_stride})")
    a("--window-every", type=int, default=None,
      help=f"mixgrpo: iterations between two moves of the window (default: {d.window_every}, "
           f"for {d.num_iterations} iterations; rescale it with --iterations)")


def _reward_flags(a):
    """What the samples are scored with (image_flow/rewards.py)."""
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
           "hf-hub:apple/DFN5B-CLIP-ViT-H-14-378)")
    a("--pickscore-model", default=rd["pickscore_model"], help="PickScore reward model")
    a("--pickscore-processor", default=rd["pickscore_processor"],
      help="PickScore's tokenizer and image processor")
    a("--hps-checkpoint", default=rd["hps_checkpoint"],
      help="HPS-v2.1 weights: a local file, or org/repo/filename in the Hugging Face cache")
    a("--hps-model", default=rd["hps_model"],
      help="the OpenCLIP architecture the HPS checkpoint is for (a name or a JSON config)")


def _training_flags(a, d, families):
    """The weights trained, the optimizer, the guard rails, batches, dtype, attention."""
    a("--lora-rank", type=int, default=64, help="0 = full fine-tune of the transformer")
    a("--lora-alpha", type=float, default=None, help="LoRA alpha (default: the rank)")
    a("--lora-targets", type=name_list, default=None,
      help="comma-separated linear layers LoRA adapts, by name or dotted ending as peft "
           "matches them (default: the family's; " + "; ".join(
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
    a("--batch-size", type=int, default=8,
      help="samples per transformer call while sampling (a guided call holds 2 rows per sample)")
    a("--decode-batch", type=int, default=4, help="images per VAE decode while scoring")
    large = ", ".join(f.name for f in families if f.gradient_checkpointing) or "none"
    a("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
      help=f"recompute activations in backward (default: on for {large}, whose size leaves an "
           f"80 GB GPU too little room for stored activations; off for the others)")
    a("--dtype", choices=["bf16", "fp32"], default=None,
      help="compute dtype (default: bf16 on GPU, fp32 on CPU)")
    a("--attention-backends", default=",".join(DEFAULT_ATTENTION),
      help="scaled_dot_product_attention backends the transformer may use: comma-separated of "
           "flash, efficient, math, cudnn, or 'all' (PyTorch's own pick). The default leaves out "
           "cuDNN, whose bf16 backward fails on Hopper GPUs (docs/gpu.md)")


def _run_flags(a, d, families):
    """The output directory, checkpoints, exports, evaluation, tracking, seeds."""
    a("--output-dir", default=None,
      help="checkpoint, metrics.jsonl, eval images (default: runs/<family>: " + ", ".join(
          f"runs/{f.slug}" for f in families) + ")")
    a("--prompt-cache", default=None,
      help="folder of the encoded prompts, shared by runs and accounts: a folder per text "
           "encoders' content, family, text length, dtype and library versions, a verified "
           "safetensors file per prompt; `python -m image_flow.prompts` lists and prunes it "
           "(default: $G2RPO_PROMPT_CACHE, else ~/.cache/g2rpo/prompt-embeddings)")
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
    a("--report-to", choices=runs.REPORT_TO, default="none",
      help="experiment tracking: TensorBoard events in <output-dir>/tensorboard, or wandb")
    a("--eval-seeds", type=int_list, default=(0, 1), help="comma-separated evaluation seeds")
    a("--seed", type=int, default=d.seed, help="seeds LoRA's initialisation, prompts and noise")
    a("--plan", type=int, nargs="?", const=0, default=None, metavar="PROCESSES",
      help="print what each process will hold (weights, gradients, optimizer state, EMA, KL "
           "reference, text encoders, rewards, prompt rows) from the configs alone, for "
           "PROCESSES processes (default: $WORLD_SIZE or 1), and exit without loading weights")


def check_args(args):
    """Every flag, before any model loads: fill the defaults that depend on others and raise
    ValueError / OSError naming the flag (or file) and the value."""
    _check_values(args)
    names = reward_models.reward_names(args.rewards)
    if args.eval_rewards is not None:
        names += reward_models.reward_names(args.eval_rewards, "--eval-rewards")
    if "hps" in names and args.plan is None:  # found (or named missing) before any model loads
        reward_models.resolve_file(args.hps_checkpoint, "--hps-checkpoint")
    read_prompts(args.prompts)
    read_prompts(args.eval_prompts, BUILTIN_EVAL_PROMPTS)
    family, shell = _check_checkpoint(args)  # fills in the family's and the recipe's defaults
    try:
        make_config(args)
    except g2rpo.ConfigError as e:
        raise ValueError(f"{flag_of(e.field)}: {e}") from None
    args.recipe_line = recipe_line(args, family, shell)
    if args.resume is not None:
        _check_resume(args)
    runs.check_writable_dir(args.output_dir)
    args.prompt_cache = args.prompt_cache or default_cache()
    runs.check_writable_dir(args.prompt_cache)


def _check_values(args):
    """The flags whose values can be checked alone (or against each other)."""
    d = g2rpo.Config()
    for field in METHOD_FIELDS:
        if field in g2rpo.UNUSED_FIELDS[args.method] and getattr(args, field) is not None:
            raise ValueError(f"{flag_of(field)} is not used by --method {args.method}")
        if getattr(args, field) is None and field not in ("branch_steps", "granularities"):
            setattr(args, field, getattr(d, field))  # those two: the recipe's (apply_recipe)
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
    runs.check_report_to(args.report_to)
    if args.export_every < 0:
        raise ValueError(f"--export-every must be >= 0 (0: at the end only), got "
                         f"{args.export_every}")
    try:
        checkpoints.parse_size(args.max_shard_size)
    except ValueError as e:
        raise ValueError(f"--max-shard-size: {e}") from None
    for flag, value in (("--save-every", args.save_every), ("--decode-batch", args.decode_batch),
                        ("--max-sequence-length", args.max_sequence_length),
                        ("--eval-steps", args.eval_steps)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    if args.guidance is not None and not math.isfinite(args.guidance):
        raise ValueError(f"--guidance must be finite, got {args.guidance}")
    for option, value in guidance_options(args).items():
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{flag_of(option)} must be >= 0 and finite, got {value}")
    sdpa_backends(args.attention_backends)


def _check_checkpoint(args):
    """What the checkpoint's files say before any weights load: its family, whether it is
    step-distilled, and the flags that depend on them; the image size it takes, the LoRA targets
    its transformer has."""
    family = check_pipeline_class(args.model)
    shell = pipeline_on_meta(args.model)
    apply_family(args, family, model_index(args.model), shell.transformer.config,
                 shell.scheduler.config)
    try:  # the family's own limits (SD3: its position table), with the VAE's real factor
        family.check_image_size(shell, args.height, args.width)
    except ValueError as e:
        raise ValueError(f"--{e}") from None
    if args.lora_rank > 0:
        check_lora_targets(shell.transformer, args.lora_targets)
    return family, shell


def _check_resume(args):
    """--resume: its files, and every setting known now (the rest is checked once loaded)."""
    if args.overwrite:
        raise ValueError("--resume and --overwrite exclude each other")
    try:
        path, saved, _ = checkpoints.read_checkpoint(args.resume)
        now = settings(args)
        checkpoints.check_fingerprint(path, saved["fingerprint"], now, ignore=(
            "transformer_config", *[k for k, v in now.items() if v is None]))
    except checkpoints.CheckpointError as e:
        raise ValueError(f"--resume: {e}") from None


def unconditional_prompt(args, family):
    """--negative-prompt when `family`'s guidance needs an unconditional row at these flags, else
    None: what the prompt cache holds besides the prompts."""
    return args.negative_prompt if family.guidance.needs_uncond(
        args.guidance, **guidance_options(args)) else None


def guidance_options(args):
    """The family-specific guidance flags that were given, by name (e.g. FLUX.1's true_cfg)."""
    return {k: getattr(args, k) for k in guidance_flags() if getattr(args, k, None) is not None}


def apply_family(args, family, index, transformer_config, scheduler_config):
    """Check the flags whose meaning depends on the family and fill in their defaults (the
    recipe's: apply_recipe). index: the checkpoint's model_index.json (the pipeline's config)."""
    family.guidance.check(dict(index), dict(transformer_config), args.guidance)
    if args.negative_prompt and not family.guidance.negative_prompt:
        raise ValueError(f"--negative-prompt: {family.name}'s pipeline takes none (its "
                         f"unconditional row is the empty prompt)")
    for option in guidance_options(args):
        if option not in family.guidance.options:
            raise ValueError(f"{flag_of(option)} is not an option of {family.name}'s guidance")
    args.family = family.name
    apply_recipe(args, family, dict(index), dict(transformer_config), dict(scheduler_config))
    if args.max_sequence_length is None:
        args.max_sequence_length = (family.distilled_max_sequence_length if args.recipe ==
                                    "distilled" else None) or family.max_sequence_length
    if args.lora_targets is None:
        args.lora_targets = family.lora_targets
    if args.gradient_checkpointing is None:
        args.gradient_checkpointing = family.gradient_checkpointing
    if args.output_dir is None:
        args.output_dir = f"runs/{family.slug}"


def apply_recipe(args, family, index, transformer_config, scheduler_config):
    """--recipe: the defaults of steps, grid, branch steps, guidance and evaluation steps for a
    base checkpoint (the paper's recipe) or a step-distilled one (its own few steps on its
    pipeline's grid, guidance off). args.recipe becomes the one taken and args.recipe_reason
    says why, for the console."""
    declared, where = family.distilled(index, transformer_config, scheduler_config)
    if args.recipe == "auto":
        args.recipe = "distilled" if declared else "base"
        example = (f", as {family.distilled_example} is" if family.distilled_example else "")
        args.recipe_reason = where + ("" if declared is not None else
                                      f"; assumed a base model: give --recipe distilled if it is "
                                      f"step-distilled{example}")
    else:
        args.recipe_reason = "--recipe " + args.recipe
    distilled = args.recipe == "distilled"
    if args.steps is None:
        args.steps = family.distilled_steps if distilled else g2rpo.Config.num_steps
    if args.schedule is None:
        args.schedule = "pipeline" if distilled else "static"
    if args.branch_steps is None:
        args.branch_steps = default_branch_steps(args.steps)
    args.dropped_granularities = ()
    if args.granularities is None and "granularities" not in g2rpo.UNUSED_FIELDS[args.method]:
        # The paper's Λ, less those that repeat another's completion at these steps (at T = 4,
        # 2 and 3 finish like 1): g2rpo.Config refuses repeated granularities.
        paper = g2rpo.Config.granularities
        args.granularities = g2rpo.distinct_granularities(args.steps, args.branch_steps, paper)
        args.dropped_granularities = tuple(g for g in paper if g not in args.granularities)
    elif args.granularities is None:
        args.granularities = g2rpo.Config.granularities
    if args.guidance is None:
        args.guidance = family.guidance.off if distilled else family.guidance.default_for(index)
    if args.eval_steps is None:
        args.eval_steps = args.steps if distilled else family.inference_steps


def recipe_line(args, family, shell):
    """The console's words for the recipe, before any weights load: which one and why, T and its
    σ grid, branch steps, granularities, guidance, text length and evaluation steps."""
    from .trainer import sigma_grid

    sigmas = sigma_grid(shell, args.steps, args.height, args.width, args.schedule, args.shift)
    grid = f"static (shift {args.shift:g})" if args.schedule == "static" else "pipeline's"
    method = ("branch steps " + csv(args.branch_steps) if args.method != "mixgrpo" else
              f"MixGRPO's window of {args.window_size}")
    if "granularities" not in g2rpo.UNUSED_FIELDS[args.method]:
        dropped = args.dropped_granularities
        method += f", granularities {csv(args.granularities)}" + (
            f" ({csv(dropped)} would repeat {'its' if len(args.granularities) == 1 else 'their'} "
            f"completions at T = {args.steps})" if dropped else "")
    guidance = family.guidance.describe(args.guidance, shell.transformer.config,
                                        **guidance_options(args))
    return (f"recipe {args.recipe} ({args.recipe_reason}): T = {args.steps} on the {grid} σ grid "
            f"{[round(s, 3) for s in sigmas.tolist()]}, {method}; {guidance}; text "
            f"{args.max_sequence_length} tokens; evaluation: {args.eval_steps} steps on the "
            f"pipeline's grid")


def default_branch_steps(num_steps):
    """The first half of the T steps (the paper's 0..7 of 16): 4 → (0, 1)."""
    return tuple(range(max(1, num_steps // 2)))
