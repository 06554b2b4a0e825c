"""GPU benchmark: G²RPO on a full-size transformer of each family (random bf16 weights), in minutes.

    # on a GPU: FLUX.1-dev, 512², G = 12, 8 branch steps, Λ = {1, 2, 3}
    python -m benchmarks.image_iteration
    # another family's transformer (list: --help)
    python -m benchmarks.image_iteration --family sd3.5-medium
    # model FLOPs per row of every family at 512² and 1024² (meta device: any machine, seconds)
    python -m benchmarks.image_iteration --flops
    # also time the whole per-member loop
    python -m benchmarks.image_iteration --full-loop
    # a tiny transformer, to check the script on a CPU
    python -m benchmarks.image_iteration --tiny

No download is possible on the GPU machines, so the transformer is built from its checkpoint's
architecture config (transformer/config.json) with random weights (speed and memory do not
depend on the values). Text embeddings are random tensors of the shapes the family's
encode_prompt gives one prompt, and the reward is a cheap function of the latents: the
benchmark measures the transformer work of an iteration (rollout + policy update), one
transformer row per sample (guidance off; classifier-free guidance doubles the rows).

What it prints, in order (everything after a warm-up):
  1. model FLOPs per row (counted by torch's FlopCounterMode on the meta device) and the bf16
     matmul throughput this GPU reaches (one large matmul), the yardstick for "fraction of peak";
  2. a per-call table: no-grad forward at batch 1, 4, 8, 16, 32 (ms/row, rows/s, TFLOP/s, % of the
     matmul peak, peak memory), then one training row (forward + backward, LoRA);
  3. one batched G²RPO iteration (g2rpo.rollout + g2rpo.policy_update), timed in full;
  4. the per-member loop of the official code (batch-1 calls, the anchor recomputed per branch
     step, one training forward per member) timed on --loop-steps only; the whole loop's time is
     COMPUTED from its exact call count and the measured per-call costs (--full-loop times it).
"""

import argparse
import time

import torch

import g2rpo
from image_flow import attention, flags, trainer
from image_flow.families import family_for, weightless_pipeline
from image_flow.plan import count
from image_flow.velocity import Velocity

FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38,
                attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
TINY = dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
            attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
            pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 4, 8))
TEXT_TOKENS = 512  # T5 sequence length of the official recipe


class Arch:
    """One family's transformer for the benchmark: its transformer and pipeline classes, the
    released checkpoint's config, a tiny config, and the shapes of one prompt's conditioning
    rows (text: prompt tokens where the family keeps each prompt's own length)."""

    def __init__(self, transformer, pipeline, config, tiny, rows):
        self.transformer, self.pipeline = transformer, pipeline
        self.config, self.tiny, self.rows = config, tiny, rows


def _text(key, tokens, extra=()):
    """Rows of one prompt: embeds (tokens, config[key]) and further vectors (config keys)."""
    return lambda c: [(tokens, c[key]), *[(c[k],) for k in extra]]


def _text_with_length(key, tokens):
    """Rows of one prompt that keeps its own length: embeds (tokens, config[key]) and the length."""
    return lambda c: [(tokens, c[key]), tokens]


ARCHS = {
    "flux.1-dev": Arch("FluxTransformer2DModel", "FluxPipeline", FLUX_DEV, TINY,
                       _text("joint_attention_dim", TEXT_TOKENS, ["pooled_projection_dim"])),
    "sd3.5-medium": Arch(
        "SD3Transformer2DModel", "StableDiffusion3Pipeline",
        dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
             num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
             pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=384,
             dual_attention_layers=list(range(13)), qk_norm="rms_norm"),
        dict(sample_size=32, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=8,
             num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16,
             pooled_projection_dim=32, out_channels=16, pos_embed_max_size=32,
             dual_attention_layers=[0], qk_norm="rms_norm"),
        _text("joint_attention_dim", 77 + 256, ["pooled_projection_dim"])),  # CLIPs + T5 256
    "sd3.5-large": Arch(
        "SD3Transformer2DModel", "StableDiffusion3Pipeline",
        dict(sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64,
             num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432,
             pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192,
             qk_norm="rms_norm"),
        dict(sample_size=32, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=8,
             num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16,
             pooled_projection_dim=32, out_channels=16, pos_embed_max_size=32,
             qk_norm="rms_norm"),
        _text("joint_attention_dim", 77 + 256, ["pooled_projection_dim"])),
    "qwen-image": Arch(
        "QwenImageTransformer2DModel", "QwenImagePipeline",
        dict(patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
             num_attention_heads=24, joint_attention_dim=3584, guidance_embeds=False,
             axes_dims_rope=(16, 56, 56)),
        dict(patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=16,
             num_attention_heads=2, joint_attention_dim=32, guidance_embeds=False,
             axes_dims_rope=(8, 4, 4)),
        _text_with_length("joint_attention_dim", 128)),
    "flux2-klein-4b": Arch(
        "Flux2Transformer2DModel", "Flux2KleinPipeline",
        dict(patch_size=1, in_channels=128, num_layers=5, num_single_layers=20,
             attention_head_dim=128, num_attention_heads=24, joint_attention_dim=7680,
             timestep_guidance_channels=256, mlp_ratio=3.0, axes_dims_rope=(32, 32, 32, 32),
             rope_theta=2000, guidance_embeds=False),
        dict(patch_size=1, in_channels=128, num_layers=1, num_single_layers=1,
             attention_head_dim=16, num_attention_heads=2, joint_attention_dim=48,
             timestep_guidance_channels=256, axes_dims_rope=(4, 4, 4, 4),
             guidance_embeds=False),
        _text("joint_attention_dim", 512)),  # padded to max_sequence_length
    "z-image-turbo": Arch(
        "ZImageTransformer2DModel", "ZImagePipeline",
        dict(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=3840, n_layers=30,
             n_refiner_layers=2, n_heads=30, n_kv_heads=30, norm_eps=1e-5, qk_norm=True,
             cap_feat_dim=2560, rope_theta=256.0, t_scale=1000.0, axes_dims=[32, 48, 48],
             axes_lens=[1536, 512, 512]),
        dict(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=32, n_layers=2,
             n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=16,
             axes_dims=[8, 4, 4], axes_lens=[256, 32, 32]),
        _text_with_length("cap_feat_dim", 128)),
}


def build_transformer(arch, device, dtype, cls="FluxTransformer2DModel"):
    """cls(**arch) with random weights, built directly in dtype on device (default FLUX.1)."""
    import diffusers

    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # no 48 GB float32 copy of FLUX.1-dev on the way
    try:
        with torch.device(device):
            model = getattr(diffusers, cls)(**arch).eval()
    finally:
        torch.set_default_dtype(default)
    for name in ("x_pad_token", "cap_pad_token"):  # Z-Image's pad tokens may start as empty
        if hasattr(model, name) and device != "meta":
            with torch.no_grad():
                getattr(model, name).normal_()
    return model


def random_inputs(arch, resolution, device, generator):
    """img_ids (S, 3) of a resolution² image and random (T5 embeds (1, 512, D), pooled (1, D'))."""
    side = resolution // 16
    img_ids = torch.zeros(side, side, 3, device=device)
    img_ids[..., 1] += torch.arange(side, device=device)[:, None]
    img_ids[..., 2] += torch.arange(side, device=device)[None, :]
    cond = (torch.randn(1, TEXT_TOKENS, arch["joint_attention_dim"], generator=generator,
                        device=device),
            torch.randn(1, arch["pooled_projection_dim"], generator=generator, device=device))
    return img_ids.view(-1, 3), cond


def family_setup(name, transformer, config, resolution, device, generator=None):
    """(velocity pieces) for one Arch: the family, a weightless pipeline of its class around
    `transformer` (what the family's questions are asked of), the latent shape of one sample,
    the constant inputs and one prompt's random conditioning rows (meta tensors on "meta")."""
    arch = ARCHS[name]
    family = family_for(arch.pipeline)
    pipe = weightless_pipeline(arch.pipeline, transformer=transformer)
    shape = tuple(family.latent_shape(pipe, resolution, resolution))
    constant = family.constant_inputs(pipe, resolution, resolution, "cpu", torch.float32)
    constant = {k: v.to(device) if torch.is_tensor(v) else v for k, v in constant.items()}
    rows = []
    for r in arch.rows(config):
        if isinstance(r, int):  # a prompt's own length, read on the host
            rows.append(torch.tensor([r]))
        elif device == "meta":
            rows.append(torch.zeros(1, *r, device="meta"))
        else:
            rows.append(torch.randn(1, *r, generator=generator, device=device))
    return family, shape, constant, tuple(rows)


def model_flops_per_row(arch, tokens=None, text_tokens=TEXT_TOKENS, name="flux.1-dev",
                        resolution=None):
    """(total, attention) FLOPs of one forward on one row, counted on the meta device: FLUX.1 at
    `tokens` image tokens, or family `name` at resolution²."""
    from torch.utils.flop_counter import FlopCounterMode

    if resolution is None:
        resolution = 16 * round(tokens ** 0.5)
    model = build_transformer(arch, "meta", torch.float32, ARCHS[name].transformer)
    family, shape, constant, rows = family_setup(name, model, arch, resolution, "meta")
    x, sigma = torch.zeros(1, *shape, device="meta"), torch.zeros(1, device="meta")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        family.forward(model, x, sigma, rows, constant, 1.0, torch.float32)
    by_op = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    attention = sum(n for op, n in by_op.items() if "bmm" in op or "attention" in op)
    return counter.get_total_flops(), attention


@torch.no_grad()
def official_loop_rollout(velocity_fn, cond, x_T, sigmas, branch_steps, granularities,
                          group_size, eta, generator=None):
    """Singular Stochastic Sampling as the official code runs it, built from g2rpo's steps: every
    model call carries one sample, and the anchor is recomputed for every branch step. Its cost
    is what this benchmark compares with (the tests' reference is g2rpo's Part 1, group_rollout).

    cond: P rows; x_T: (P, *D); the SDE noise is drawn per member from generator.
    Returns x_k (K, P, *D) anchor states, x_next (K, P, G, *D), old_log_prob (K, P, G),
    samples (K, L, P, G, *D), evals.
    """
    P, T, evals = x_T.shape[0], len(sigmas) - 1, 0

    def v_of(x, i, p):
        nonlocal evals
        evals += 1
        return velocity_fn(x[None], sigmas[i].view(1), g2rpo.take_rows(cond, torch.tensor([p])))[0]

    x_ks, x_next, log_probs, samples = [], [], [], []
    for k in branch_steps:
        x0_k, xn_k, lp_k, s_k = [], [], [], []
        for p in range(P):
            # The anchor is recomputed per branch step, as the official code does.
            x = x_T[p]
            for i in range(k):
                x = g2rpo.ode_step(x, v_of(x, i, p), sigmas[i], sigmas[i + 1])
            v = v_of(x, k, p)
            x0_k.append(x)
            xn_p, lp_p, s_p = [], [], []
            for _ in range(group_size):
                x1, lp, _, _ = g2rpo.sde_step(x[None], v[None], sigmas[k], sigmas[k + 1], eta,
                                              generator)
                finals = []
                for lam in granularities:
                    sched = g2rpo.granularity_schedule(T, k, lam)
                    y = x1[0]
                    for a, b in zip(sched[:-1], sched[1:]):
                        y = g2rpo.ode_step(y, v_of(y, a, p), sigmas[a], sigmas[b])
                    finals.append(y)
                xn_p.append(x1[0])
                lp_p.append(lp[0])
                s_p.append(torch.stack(finals))
            xn_k.append(torch.stack(xn_p))
            lp_k.append(torch.stack(lp_p))
            s_k.append(torch.stack(s_p, dim=1))  # (L, G, *D)
        x_ks.append(torch.stack(x0_k))
        x_next.append(torch.stack(xn_k))
        log_probs.append(torch.stack(lp_k))
        samples.append(torch.stack(s_k, dim=1))  # (L, P, G, *D)
    return (torch.stack(x_ks), torch.stack(x_next), torch.stack(log_probs), torch.stack(samples),
            evals)


def per_member_loop_calls(num_steps, branch_steps, granularities, group_size):
    """Model calls (batch 1) of the official-style loop per prompt: for each k the anchor to x_k
    and v(x_k) (k + 1), then every member's completion at every λ."""
    calls = 0
    for k in branch_steps:
        calls += k + 1
        for lam in granularities:
            calls += group_size * (len(g2rpo.granularity_schedule(num_steps, k, lam)) - 1)
    return calls


def per_member_update(params, optimizer, velocity_fn, cond, x_next, sigmas, ks, cfg, x_k,
                      old_log_prob, adv):
    """The official update: for each k, one batch-1 forward per member, one step per k."""
    for j, k in enumerate(ks):
        G = x_next.shape[2]
        for i in range(G):
            v = velocity_fn(x_k[j], sigmas[k].view(1), cond)
            _, lp, _, _ = g2rpo.sde_step(x_k[j], v, sigmas[k], sigmas[k + 1], cfg.eta,
                                         prev_sample=x_next[j, :, i])
            loss, _ = g2rpo.clipped_grpo_loss(lp, old_log_prob[j, :, i], adv[j, :, i],
                                              cfg.clip_range)
            (loss / G).backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


class Timer:
    """Wall seconds and peak device memory (GiB) of a block; memory is 'n/a' on a CPU."""

    def __init__(self, cuda):
        self.cuda = cuda

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self.start
        self.peak = torch.cuda.max_memory_allocated() / 2**30 if self.cuda else None

    def memory(self):
        return f"{self.peak:6.1f} GiB" if self.peak is not None else "   n/a (CPU)"


def matmul_flops(device, dtype, n, repeats=10):
    """Throughput of an n×n×n matmul in dtype (FLOP/s): the reachable peak of this device."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device,
                                                                      dtype=dtype)
    a @ b  # warm-up
    with Timer(device.type == "cuda") as t:
        for _ in range(repeats):
            a @ b
    return 2 * n**3 * repeats / t.seconds


def flop(n):
    """21.5 T / 689 M: FLOPs (or FLOP/s) readable at any size."""
    return count(n, (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)))


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.image_iteration",
                                description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--family", choices=ARCHS, default="flux.1-dev",
      help="whose transformer (the released checkpoint's architecture; default flux.1-dev)")
    a("--flops", action="store_true",
      help="only the model FLOPs per row of every family at 512² and 1024² (meta device)")
    a("--tiny", action="store_true", help="tiny transformer (a CPU check of the script)")
    a("--resolution", type=int, default=None, help="default 512 (64 with --tiny)")
    a("--group-size", type=int, default=12)
    a("--lora-rank", type=int, default=64)
    a("--batch-size", type=int, default=16, help="rows per transformer call in the iteration")
    a("--batches", type=flags.int_list, default=(1, 4, 8, 16, 32),
      help="batch sizes of the per-call table (default 1,4,8,16,32)")
    a("--loop-steps", type=flags.int_list, default=(7,),
      help="branch steps the per-member loop is timed on (default 7)")
    a("--full-loop", action="store_true", help="time the whole per-member loop instead")
    a("--skip-loop", action="store_true", help="leave the per-member loop out")
    a("--repeats", type=int, default=3, help="timed repeats per batch size in the table")
    a("--attention-backends", default=",".join(attention.DEFAULT_ATTENTION),
      help="as python -m image_flow (default: no cuDNN attention)")
    a("--gradient-checkpointing", action="store_true")
    args = p.parse_args(argv)
    args.resolution = args.resolution or (64 if args.tiny else 512)
    if args.resolution <= 0 or args.resolution % 16:
        p.error(f"--resolution must be a positive multiple of 16, got {args.resolution}")
    for name in ("group_size", "batch_size", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not args.batches or min(args.batches) < 1:
        p.error(f"--batches must be positive integers, got {args.batches}")
    try:
        attention.sdpa_backends(args.attention_backends)
        g2rpo.check_branch_steps(args.loop_steps, g2rpo.Config().num_steps)
    except ValueError as e:
        p.error(str(e))
    return args


def flops_table():
    """Model FLOPs per row of every family's released transformer at 512² and 1024²."""
    print(f"{'family':>15s} {'parameters':>11s} {'512²':>9s} {'1024²':>9s}   "
          f"(model FLOPs per transformer row; attention at 1024²)")
    for name, arch in ARCHS.items():
        model = build_transformer(arch.config, "meta", torch.float32, arch.transformer)
        n = sum(p.numel() for p in model.parameters())
        small, _ = model_flops_per_row(arch.config, name=name, resolution=512)
        large, attention = model_flops_per_row(arch.config, name=name, resolution=1024)
        print(f"{name:>15s} {count(n):>11s} {flop(small):>9s} {flop(large):>9s}   "
              f"({flop(attention)} attention)")


def main(argv=None):
    args = parse_args(argv)
    if args.flops:
        return flops_table()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    family_arch = ARCHS[args.family]
    arch = family_arch.tiny if args.tiny else family_arch.config
    flops, attn_flops = model_flops_per_row(arch, name=args.family, resolution=args.resolution)
    transformer = build_transformer(arch, device, dtype, family_arch.transformer)
    n_params = sum(p.numel() for p in transformer.parameters())
    g = torch.Generator(device).manual_seed(0)
    family, shape, constant, cond = family_setup(args.family, transformer, arch, args.resolution,
                                                 device, g)
    params = trainer.setup_trainable(transformer, args.lora_rank, args.lora_rank,
                                     args.gradient_checkpointing,
                                     lora_targets=family.lora_targets)
    # One transformer row per sample: the family's guidance, or a scale that turns CFG off.
    guide = family.guidance
    guidance = guide.off if guide.needs_uncond(guide.default) else guide.default
    velocity = Velocity(transformer, family, constant, guidance, dtype, args.attention_backends,
                        device.type)
    cfg = g2rpo.Config(group_size=args.group_size, batch_size=args.batch_size, lr=1e-5)
    sigmas = g2rpo.sigma_schedule(cfg.num_steps, cfg.shift).to(device)
    tokens = shape[0] if len(shape) == 2 else shape[1] * shape[2] // 4
    reward_fn = lambda x, prompts: x.float().flatten(1).mean(1)  # cheap: excludes VAE and reward
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    name = torch.cuda.get_device_name() if cuda else "CPU"
    peak_flops = matmul_flops(device, dtype, 8192 if cuda else 1024)
    text = cond[0].shape[1]
    print(f"{name}, torch {torch.__version__}; {args.family} transformer "
          f"{'(tiny) ' if args.tiny else ''}{count(n_params)} params, {dtype}, "
          f"LoRA r={args.lora_rank} ({count(sum(p.numel() for p in params))} trainable); "
          f"{args.resolution}² ({tokens} image + {text} text tokens); attention "
          f"{args.attention_backends}")
    print(f"model FLOPs per row {flop(flops)} (attention {flop(attn_flops)}); "
          f"{str(dtype).split('.')[-1]} matmul peak measured {flop(peak_flops)}FLOP/s")

    def rows(n):
        return torch.randn(n, *shape, generator=g, device=device)

    def forward(n):
        with torch.no_grad():
            velocity(rows(n), sigmas[0].expand(n), g2rpo.take_rows(cond, torch.zeros(
                n, dtype=torch.long, device=device)))

    def train_inputs(k):
        """A state x_k (P=1, S=1, *D) and an SDE sample from it (1, 1, *D): one training row."""
        x = rows(1)[:, None]
        with torch.no_grad():
            x_next, _, _, _ = g2rpo.sde_step(x[:, 0], velocity(x[:, 0], sigmas[k].view(1), cond),
                                             sigmas[k], sigmas[k + 1], cfg.eta, g)
        return x, x_next[:, None]

    def train_row(k, x, x_next):
        """Forward + backward of one training row (what the per-call table times)."""
        lp = g2rpo.policy_log_prob(velocity, cond, x, x_next, sigmas[k], sigmas[k + 1], cfg.eta)
        g2rpo.clipped_grpo_loss(lp, lp.detach(), torch.ones_like(lp), cfg.clip_range)[0].backward()
        optimizer.zero_grad(set_to_none=True)

    forward(1)  # warm-up: kernels, allocator, autotuning
    train_row(0, *train_inputs(0))
    print("\nper call (no-grad forward unless noted)")
    print(f"{'batch':>14s} {'ms/row':>9s} {'rows/s':>8s} {'FLOP/s':>8s} {'% peak':>7s} "
          f"{'peak memory':>12s}")
    row_ms = {}
    for n in args.batches:
        with Timer(cuda) as t:
            for _ in range(args.repeats):
                forward(n)
        row_ms[n] = t.seconds / (args.repeats * n) * 1e3
        achieved = flops / (row_ms[n] / 1e3)
        print(f"{n:14d} {row_ms[n]:9.1f} {1e3 / row_ms[n]:8.1f} {flop(achieved):>8s} "
              f"{100 * achieved / peak_flops:6.0f}% {t.memory():>12s}")
    inputs = [train_inputs(0) for _ in range(args.repeats)]  # made outside the timed region
    with Timer(cuda) as t:
        for x, x_next in inputs:
            train_row(0, x, x_next)
    train_ms = t.seconds / args.repeats * 1e3
    print(f"{'train row (1)':>14s} {train_ms:9.1f} {1e3 / train_ms:8.1f} {'':>8s} {'':>7s} "
          f"{t.memory():>12s}   forward + backward, LoRA r={args.lora_rank}")

    K, G, L = len(cfg.branch_steps), cfg.group_size, len(cfg.granularities)
    with Timer(cuda) as t:
        out, m = g2rpo.rollout(velocity, reward_fn, ["p"], cond, cfg, sigmas, shape, g)
        g2rpo.policy_update(params, optimizer, velocity, out, sigmas, cfg)
    batched_s = t.seconds
    print(f"\nbatched iteration (G={G}, K={K}, Λ={cfg.granularities}, batch {args.batch_size}): "
          f"{batched_s:.1f} s measured, peak {t.memory().strip()} "
          f"({m['nfe']:,} rollout rows + {K} training rows)")
    if args.skip_loop:
        return
    steps = cfg.branch_steps if args.full_loop else args.loop_steps
    with Timer(cuda) as t_roll:
        x_T = rows(1)
        x_k, x_next, lp, samples, calls = official_loop_rollout(
            velocity, cond, x_T, sigmas, steps, cfg.granularities, G, cfg.eta, generator=g)
    r = reward_fn(samples.flatten(0, 3), None).view(len(steps), L, 1, G)
    adv = g2rpo.multi_granularity_advantages(r.permute(0, 2, 1, 3), cfg.adv_clip)
    with Timer(cuda) as t_upd:
        per_member_update(params, optimizer, velocity, cond, x_next, sigmas, steps, cfg, x_k, lp,
                          adv)
    measured = t_roll.seconds + t_upd.seconds
    print(f"per-member loop, branch steps {list(steps)}: {calls:,} batch-1 calls in "
          f"{t_roll.seconds:.1f} s ({t_roll.seconds / calls * 1e3:.1f} ms/call) + {len(steps) * G} "
          f"training rows in {t_upd.seconds:.1f} s; peak {t_upd.memory().strip()}")
    if args.full_loop:
        print(f"whole per-member loop: {measured:.1f} s measured; speed-up (loop / batched) "
              f"{measured / batched_s:.2f}x (measured)")
        return
    total_calls = per_member_loop_calls(cfg.num_steps, cfg.branch_steps, cfg.granularities, G)
    assert calls == per_member_loop_calls(cfg.num_steps, steps, cfg.granularities, G)
    loop_s = (total_calls * t_roll.seconds / calls + K * G * t_upd.seconds / (len(steps) * G))
    print(f"whole per-member loop: {total_calls:,} calls + {K * G} training rows ≈ {loop_s:.1f} s "
          f"(COMPUTED from the per-call costs above, not timed; --full-loop times it); "
          f"speed-up (loop / batched) ≈ {loop_s / batched_s:.2f}x")


if __name__ == "__main__":
    main()
