"""G²RPO on the diffusers flow-matching image models: one trainer for every family.

The η = 0 sampler, decoding and rewards, the trainable weights (LoRA or the whole transformer),
evaluation, and the run itself: models built, prompts encoded (prompts.py), velocities, the
callback that logs, checkpoints, exports and evaluates, then g2rpo.train. What a family does differently is in
families/; g2rpo.py stays model-agnostic. Latents are kept in float32 between steps, in the
family's layout; the transformer runs in --dtype (bf16 autocast on GPU) and log-probabilities
are computed in float32.
"""

import contextlib
import gc
import json
import os
import sys

import torch
import torch.distributed as dist

import g2rpo

from . import checkpoints, rewards as reward_models, runs
from .attention import checkpoint_keeping_attention
from .families import family_of
from .families.seam import Family
from .flags import (guidance_options, make_config, parse_args, settings,
                    unconditional_prompt)
from .loading import (BUILTIN_EVAL_PROMPTS, check_lora_targets, checkpoint_file, load_pipeline,
                      read_prompts)
from .parallel import (adapters_disabled, all_reduce_metrics, check_ranks_in_sync,
                       frozen_reference, init_distributed, wrap_distributed)
from .prompts import (CacheError, DiskStore, PromptEncoder, encode_up_front, library_versions,
                      release_text_encoders, text_encoder_identity)
from .velocity import Velocity


# ----------------------------------------------------------------------------------------------
# The flow: σ grid, noise, decoding (what differs per family: families/).


def check_image_size(pipe, height, width):
    family_of(pipe).check_image_size(pipe, height, width)


def latent_shape(pipe, height, width):
    """The shape of one sampler state in the family's layout (FLUX.1: packed (S, C))."""
    check_image_size(pipe, height, width)
    return tuple(family_of(pipe).latent_shape(pipe, height, width))


def sigma_grid(pipe, num_steps, height, width, schedule="static", shift=3.0):
    """(T+1,) σ grid: "static" is the official recipe (g2rpo.sigma_schedule), "pipeline" is the
    grid the family's pipeline itself uses at this size (a copy of its scheduler, asked as its
    __call__ asks it)."""
    if schedule == "static":
        return g2rpo.sigma_schedule(num_steps, shift)
    if schedule != "pipeline":
        raise ValueError(f"schedule must be 'static' or 'pipeline', got {schedule!r}")
    return family_of(pipe).pipeline_sigmas(pipe, num_steps, height, width).float().cpu()


@torch.no_grad()
def decode(pipe, latents, height, width, batch=None):
    """Sampler states (B, *D) → images in [0, 1], (B, 3, H, W) float32, as the pipeline decodes
    them (the family's unpacking and the VAE config's scaling and shift), `batch` at a time."""
    batch = batch or len(latents)
    images = [family_of(pipe).decode(pipe, latents[i : i + batch], height, width)
              for i in range(0, len(latents), batch)]
    return (torch.cat(images).float() / 2 + 0.5).clamp(0, 1)


@torch.no_grad()
def sample(pipe, velocity, encoder, prompts, height, width, sigmas, generator, batch=None,
           decode_batch=None):
    """Deterministic sampling (η = 0) with g2rpo.ode_step: the pipeline's loop, our steps,
    `batch` prompts per transformer call (default: all), `decode_batch` images per decode.

    Initial noise is the pipeline's own draw (its prepare_latents) for all the prompts at once
    with the caller's generator, so for the same generator the result equals the pipeline's on
    the same σ grid, whatever the batches. Returns (latents (B, *D) float32, images
    (B, 3, H, W) in [0, 1]).
    """
    check_image_size(pipe, height, width)
    prompts, batch = list(prompts), batch or len(prompts)
    noise, out = None, []
    for i in range(0, len(prompts), batch):
        cond = encoder(prompts[i : i + batch])
        if noise is None:  # drawn in the text rows' dtype, as the pipeline does
            rows = cond["cond"] if isinstance(cond, dict) else cond
            noise = family_of(pipe).noise(pipe, len(prompts), height, width, rows[0].dtype,
                                          generator).float()
        x, steps = noise[i : i + batch], sigmas.to(noise.device)
        for k in range(len(steps) - 1):
            v = velocity(x, steps[k].expand(len(x)), cond)
            x = g2rpo.ode_step(x, v, steps[k], steps[k + 1])
        out.append(x)
    x = torch.cat(out)
    return x, decode(pipe, x, height, width, decode_batch)


# ----------------------------------------------------------------------------------------------
# Rewards (the models themselves: rewards.py).


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
# Trainable weights (processes, FSDP2 / DDP and the KL's reference: parallel.py).


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


def fingerprint(args, transformer):
    """Every setting that changes the model or the algorithm; a resume must match all of them.
    The learning rate is left out: a changed one is applied on resume (and logged)."""
    cfg = dict(transformer.config)
    return {"transformer_config": json.loads(json.dumps(cfg, default=str)), **settings(args)}


# ----------------------------------------------------------------------------------------------
# Evaluation.


def evaluate(pipe, velocity, encoder, rewards, prompts, height, width, sigmas, seeds, batch=None,
             decode_batch=None):
    """ODE samples (η = 0) for each prompt at fixed seeds, `batch` prompts per transformer call
    and `decode_batch` images per decode and reward call (default: all) → (mean reward per
    reward model, images (seeds, prompts, 3, H, W) on the CPU)."""
    scores, images = {n: [] for n in rewards}, []
    for seed in seeds:
        g = torch.Generator(pipe.transformer.device).manual_seed(seed)
        _, img = sample(pipe, velocity, encoder, prompts, height, width, sigmas, g, batch,
                        decode_batch)
        images.append(img.cpu())
        step = decode_batch or len(prompts)
        for n, r in rewards.items():
            scores[n] += [r(img[i : i + step], prompts[i : i + step]).float().cpu()
                          for i in range(0, len(prompts), step)]
    return {n: torch.cat(s).mean().item() for n, s in scores.items()}, torch.stack(images)


# ----------------------------------------------------------------------------------------------
# The run: the models, the velocities, the callback, then g2rpo.train.


def main(argv=None):
    """Parse, train (and evaluate); under torchrun, tear the process group down cleanly."""
    args = parse_args(argv)
    if args.plan is not None:
        from .plan import print_plan

        return print_plan(args, args.plan or int(os.environ.get("WORLD_SIZE", "1")))
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
    run = runs.RunDirectory(args.output_dir, resume=args.resume is not None,
                            overwrite=args.overwrite, is_main=rank == 0)
    try:
        return _run_training(args, rank, world, device, run)
    finally:
        run.close()


class Run:
    """What one run holds: the settings, the models and what trains them (filled in by
    build_models and build_velocities)."""

    def __init__(self, args, rank, world, device, directory):
        self.args, self.rank, self.world, self.device = args, rank, world, device
        self.directory, self.is_main = directory, rank == 0
        self.say = print if self.is_main else (lambda *a, **k: None)
        self.dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[
            args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
        self.cfg = make_config(args, rank)
        self.prompts = read_prompts(args.prompts)
        self.eval_prompts = read_prompts(args.eval_prompts, BUILTIN_EVAL_PROMPTS)


def build_models(r):
    """Rewards, the pipeline, every prompt encoded (then the text encoders freed), the trainable
    weights (wrapped for DDP / FSDP2), the KL's reference, the optimizer and the EMA."""
    args, dtype = r.args, r.dtype
    # Rewards first: a missing reward model is found before the image model loads (minutes at
    # full size). Each is loaded once, whether it trains, evaluates or both.
    r.train_names = reward_models.reward_names(args.rewards)
    eval_names = reward_models.reward_names(args.eval_rewards or r.train_names, "--eval-rewards")
    loaded = reward_models.load_rewards(
        list(dict.fromkeys(r.train_names + eval_names)), r.device, clip_model=args.clip_model,
        pickscore_model=args.pickscore_model, pickscore_processor=args.pickscore_processor,
        hps_checkpoint=args.hps_checkpoint, hps_model=args.hps_model)
    r.rewards = {n: loaded[n] for n in r.train_names}
    r.eval_rewards = {n: loaded[n] for n in eval_names}
    r.pipe = pipe = load_pipeline(args.model, r.device, dtype)
    r.family = family_of(pipe)
    r.encoder = encode_prompts(r)
    check_image_size(pipe, args.height, args.width)
    r.sigmas = sigma_grid(pipe, args.steps, args.height, args.width, args.schedule, args.shift)
    # Evaluation samples as the pipeline does: its own grid at --eval-steps.
    r.eval_sigmas = sigma_grid(pipe, args.eval_steps, args.height, args.width, "pipeline")
    r.raw = raw = pipe.transformer
    full_reference = r.cfg.kl_beta > 0 and not args.lora_rank  # LoRA's: the adapter switched off
    sharded = dist.is_initialized()  # torchrun, even with one process: FSDP2 shards the policy
    r.reference = frozen_reference(raw, dtype) if full_reference and not sharded else None
    torch.manual_seed(args.seed)  # LoRA's initialisation: same seed, same adapters (all ranks)
    setup_trainable(raw, args.lora_rank, args.lora_alpha, args.gradient_checkpointing,
                    upcast=r.world == 1, lora_targets=args.lora_targets)
    r.model = wrap_distributed(raw, args.lora_rank, r.device, r.family.unused_parameters)
    if full_reference and sharded:
        r.reference = frozen_reference(raw, dtype)  # from the policy's shards
    r.params = [p for p in r.model.parameters() if p.requires_grad]  # FSDP2 swaps in DTensors
    r.optimizer = torch.optim.AdamW(r.params, lr=r.cfg.lr, weight_decay=r.cfg.weight_decay)
    r.ema = g2rpo.EMA(raw, r.cfg.ema_decay) if r.cfg.ema_decay > 0 else None  # sharded too
    # Evaluation and export use the EMA weights when there is one.
    r.averaged = r.ema.applied if r.ema is not None else contextlib.nullcontext
    r.generator = torch.Generator(r.device).manual_seed(r.cfg.seed)


def encode_prompts(r):
    """Every prompt the run uses, encoded before training into the on-disk cache (what is there
    already is read back), the negative prompt only when guidance needs an unconditional row;
    then the text encoders are freed."""
    args, pipe = r.args, r.pipe
    identity = {"text_encoders": text_encoder_identity(
        checkpoint_file(args.model, "model_index.json").parent), "family": r.family.name,
        "max_sequence_length": args.max_sequence_length, "dtype": str(r.dtype),
        **library_versions()}
    encoder = PromptEncoder(pipe, args.max_sequence_length, unconditional_prompt(args, r.family),
                            DiskStore(args.prompt_cache, identity, checkpoint=args.model))
    n = encode_up_front(encoder, r.prompts + r.eval_prompts, r.rank, r.world, r.is_main)
    release_text_encoders(pipe)  # every rank has checked every entry it will read
    r.say(f"prompts: {n} encoded, the rest read from {args.prompt_cache}; text encoders freed")
    return encoder


def build_velocities(r):
    """The policy's velocity (through DDP / FSDP2), evaluation's (without DDP: no gradient, no
    collectives; FSDP2 needs every rank's forward) and the KL reference's."""
    args, pipe = r.args, r.pipe
    size = (args.height, args.width)
    r.velocity = Velocity.from_pipe(r.model, pipe, *size, args.guidance, r.dtype,
                                    args.attention_backends, guidance_options(args))
    r.eval_velocity = Velocity.from_pipe(getattr(r.model, "module", r.model), pipe, *size,
                                         args.guidance, r.dtype, args.attention_backends,
                                         guidance_options(args))
    r.ref_velocity = (reference_velocity(r.raw, r.reference, pipe, args, r.dtype)
                      if r.cfg.kl_beta else None)


def describe(r):
    """The run's console lines: family, processes, weights, guidance, guard rails (the recipe's
    line was printed when the flags were checked)."""
    args, cfg = r.args, r.cfg
    n_train = sum(p.numel() for p in r.params)
    trained = f"LoRA r={args.lora_rank}" if args.lora_rank else "full fine-tune"
    backend = f" ({dist.get_backend()})" if dist.is_initialized() else ""
    r.say(f"{r.family.name} ({type(r.pipe).__name__}); {r.world} process(es){backend} on "
          f"{r.device}, {r.dtype}; {trained} ({n_train / 1e6:.2f} M trainable"
          f"{', gradient checkpointing' if args.gradient_checkpointing else ''}); "
          f"{len(r.prompts)} prompts")
    if cfg.kl_beta:
        r.say(f"KL penalty β = {cfg.kl_beta:g} to the reference: " + (
            "the transformer with its LoRA switched off" if args.lora_rank else
            f"a frozen copy of the pretrained transformer ({r.dtype}"
            + (", sharded)" if dist.is_initialized() else ")")))
    if r.ema is not None:
        r.say(f"EMA of the trainable weights, decay {cfg.ema_decay:g}: evaluations and exports "
              f"use the averages; checkpoints keep both")


class Hooks:
    """What runs beside training: evaluations (eval.json, a captioned grid, the tracker) and,
    after every iteration, the metrics, checkpoints, exports and a stop on a signal. None of it
    changes what is trained."""

    def __init__(self, r, fp, start):
        self.r, self.fp, self.evaluations = r, fp, []
        args = r.args
        self.which = f" (EMA weights, decay {r.cfg.ema_decay:g})" if r.ema is not None else ""
        self.tracker = runs.Tracker(args.report_to, r.directory.path, vars(args),
                                    args.branch_steps, args.granularities, start, r.is_main)
        self.stopper = runs.GracefulStop(log=r.say)
        self.checkpoint = r.directory.path / checkpoints.CHECKPOINT
        self.checkpointer = checkpoints.Checkpointer(self.checkpoint, args.async_save, log=r.say)
        self.max_shard = checkpoints.parse_size(args.max_shard_size)

    def evaluate(self, iteration):
        """Evaluate after `iteration` iterations."""
        r, args = self.r, self.r.args
        with r.averaged():
            scores, images = evaluate(r.pipe, r.eval_velocity, r.encoder, r.eval_rewards,
                                      r.eval_prompts, args.height, args.width, r.eval_sigmas,
                                      args.eval_seeds, args.batch_size, args.decode_batch)
        scores = runs.by_domain(scores, r.train_names)
        grid = runs.captioned_grid(images, r.eval_prompts, args.eval_seeds,
                                   f"after {iteration} iterations")
        path = r.directory.record_eval(iteration, scores, grid)
        self.tracker.evaluation(iteration, scores, grid)
        self.evaluations.append({"iteration": iteration, **scores})
        r.say(f"eval after {iteration} iterations{self.which}: {runs.domain_text(scores)}  "
              f"({path})")

    def __call__(self, it, metrics):
        """g2rpo.train's callback after iteration `it`; True stops training."""
        r, args = self.r, self.r.args
        metrics.update(all_reduce_metrics(metrics, r.world))  # train's history sees them
        r.directory.log_metrics(metrics)  # rows after the last checkpoint are dropped on resume
        self.tracker.scalars(metrics)
        stop = self.stopper.should_stop(r.world)
        end = it + 1 == r.cfg.num_iterations
        saved = stop or (it + 1) % args.save_every == 0 or end
        if saved:
            self.checkpointer.save(r.model, r.optimizer, r.generator, it, self.fp, r.ema)
        # A LoRA is small: exported with every checkpoint. A full transformer (24 GB in bf16 at
        # FLUX.1-dev's size): at the end and every --export-every iterations only.
        if end or (saved and args.lora_rank) or (args.export_every
                                                 and (it + 1) % args.export_every == 0):
            with r.averaged():
                path = checkpoints.export_weights(r.directory.path, r.model, r.raw,
                                                  args.lora_rank, type(r.pipe), r.dtype,
                                                  self.max_shard)
            if path is not None and not args.lora_rank:
                r.say(f"exported the transformer after {it + 1} iterations ({r.dtype})"
                      f"{self.which}: {path}")
        if args.eval_every and (it + 1) % args.eval_every == 0 and not stop:
            self.evaluate(it + 1)
        return stop


def _run_training(args, rank, world, device, directory):
    r = Run(args, rank, world, device, directory)
    build_models(r)
    build_velocities(r)
    fp = fingerprint(args, r.raw)
    start = 0
    if args.resume:
        start = checkpoints.load_checkpoint(args.resume, r.model, r.optimizer, r.generator, fp,
                                            args.seed, lr=r.cfg.lr, log=r.say, ema=r.ema)
        r.say(f"resumed from {args.resume} at iteration {start}")
    directory.start(start)  # metrics.jsonl keeps only the iterations before `start`
    describe(r)
    hooks = Hooks(r, fp, start)
    reward_fn = make_reward_fn(r.pipe, r.rewards, args.height, args.width, args.decode_batch)
    history = []
    try:
        if args.eval:
            hooks.evaluate(start)
        if args.resume and start >= r.cfg.num_iterations:
            r.say(f"checkpoint is at iteration {start} of {r.cfg.num_iterations}: nothing to "
                  f"train")
        else:
            with hooks.stopper:
                history = g2rpo.train(
                    r.model, r.velocity, reward_fn, r.prompts, r.cfg,
                    latent_shape(r.pipe, args.height, args.width), encode_prompts=r.encoder,
                    optimizer=r.optimizer, generator=r.generator, start_iteration=start,
                    callback=hooks, log=print if r.is_main else None, progress=r.is_main,
                    sigmas=r.sigmas, ema=r.ema, ref_velocity_fn=r.ref_velocity)
        hooks.checkpointer.close()  # an asynchronous save in flight is finished and moved
        end = history[-1]["iteration"] + 1 if history else start
        if hooks.stopper.requested:
            r.say(f"stopped by {hooks.stopper.requested} after iteration {end - 1}; checkpoint "
                  f"written to {hooks.checkpoint}. To continue, rerun the same command with "
                  f"--resume {hooks.checkpoint}")
        elif args.eval and end not in {e["iteration"] for e in hooks.evaluations}:
            hooks.evaluate(end)
    finally:
        hooks.tracker.close()
        hooks.checkpointer.close()  # no-op unless training raised with a save in flight
    if dist.is_initialized():
        check_ranks_in_sync(r.params, directory.path, r.is_main)
    return history, hooks.evaluations


def cli():
    """The command line: main(), with a refused resume or a prompt-cache entry that cannot be
    replaced as one line instead of a traceback."""
    try:
        main()
    except (checkpoints.CheckpointError, CacheError) as e:
        if os.environ.get("RANK", "0") == "0" or isinstance(e, CacheError):  # one rank's own
            print(f"python -m image_flow: error: {e}", file=sys.stderr)
        sys.exit(1)
