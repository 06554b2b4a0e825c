"""GPU benchmark: one G²RPO iteration on the full-size FLUX.1-dev transformer (random weights).

    python bench_flux.py                 # on a GPU: 512², G = 12, 8 branch steps, Λ = {1, 2, 3}
    python bench_flux.py --tiny          # a tiny transformer, to check the script on a CPU

No download is possible on the GPU machines, so the transformer is built from FLUX.1-dev's
architecture config with random weights (speed and memory do not depend on the values). Text
embeddings are random tensors of T5/CLIP's shapes, and the reward is a cheap function of the
latents: both are excluded on purpose, the benchmark measures the transformer work of an iteration
(rollout + policy update), which dominates.

Compared in one run, same config:
  batched          g2rpo.py: every model call carries all members/branches; v(x_k) shared by G
  per-member loop  batch-1 calls, anchor recomputed per branch step, and a training forward per
                   member (the official code repeats one forward ×G)
Prints seconds per iteration, peak GPU memory and the ratio.
"""

import argparse
import time

import torch

import flux_flow
import g2rpo
from bench_rollout import rollout_per_member

FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38,
                attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
TINY = dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
            attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
            pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 4, 8))


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


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny transformer (CPU check)")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--group-size", type=int, default=12)
    p.add_argument("--lora-rank", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16, help="rows per transformer call")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--skip-loop", action="store_true", help="time the batched version only")
    args = p.parse_args()
    from diffusers import FluxTransformer2DModel

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    arch = TINY if args.tiny else FLUX_DEV
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build in bf16 directly: no 48 GB float32 copy on the GPU
    with torch.device(device):
        transformer = FluxTransformer2DModel(**arch).eval()
    torch.set_default_dtype(default)
    params = flux_flow.setup_trainable(transformer, args.lora_rank, args.lora_rank,
                                       args.gradient_checkpointing)
    tokens = (args.resolution // 16) ** 2
    img_ids = torch.zeros(args.resolution // 16, args.resolution // 16, 3, device=device)
    img_ids[..., 1] += torch.arange(args.resolution // 16, device=device)[:, None]
    img_ids[..., 2] += torch.arange(args.resolution // 16, device=device)[None, :]
    velocity = flux_flow.FluxVelocity(transformer, img_ids.view(-1, 3).to(dtype), True, 3.5, dtype)
    g = torch.Generator(device).manual_seed(0)
    cond = (torch.randn(1, 512, arch["joint_attention_dim"], generator=g, device=device),
            torch.randn(1, arch["pooled_projection_dim"], generator=g, device=device))
    cfg = g2rpo.Config(group_size=args.group_size, batch_size=args.batch_size,
                       prompts_per_iteration=1, lr=1e-5)
    sigmas = g2rpo.sigma_schedule(cfg.num_steps, cfg.shift).to(device)
    shape = (tokens, arch["in_channels"])
    reward_fn = lambda x, prompts: x.float().flatten(1).mean(1)  # cheap: excludes VAE and reward
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    n_params = sum(p.numel() for p in transformer.parameters())
    print(f"{torch.cuda.get_device_name() if cuda else 'CPU'}; transformer "
          f"{n_params / 1e9:.2f} B params, {dtype}, LoRA r={args.lora_rank}; {args.resolution}² "
          f"({tokens} tokens), G={cfg.group_size}, K={len(cfg.branch_steps)}, "
          f"Λ={cfg.granularities}, batch {args.batch_size}")

    def batched():
        out, m = g2rpo.rollout(velocity, reward_fn, ["p"], cond, cfg, sigmas, shape, g)
        g2rpo.policy_update(params, optimizer, velocity, out, sigmas, cfg)
        return m["nfe"]

    def loop():
        x_T = torch.randn((1, *shape), generator=g, device=device)
        x_k, x_next, lp, samples, evals = rollout_per_member(
            velocity, cond, x_T, sigmas, cfg.branch_steps, cfg.granularities, cfg.group_size,
            cfg.eta, generator=g)
        K, L = len(cfg.branch_steps), len(cfg.granularities)
        r = reward_fn(samples.flatten(0, 3), None).view(K, L, 1, cfg.group_size)
        adv = g2rpo.multi_granularity_advantages(r.permute(0, 2, 1, 3), cfg.adv_clip)
        per_member_update(params, optimizer, velocity, cond, x_next, sigmas, cfg.branch_steps,
                          cfg, x_k, lp, adv)
        return evals

    results = {}
    for name, fn in (("batched", batched), ("per-member loop", loop)):
        if name != "batched" and args.skip_loop:
            continue
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        evals = fn()
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
        results[name] = seconds
        print(f"{name:16s} {seconds:8.1f} s per iteration  peak {peak:6.1f} GiB  "
              f"({evals:,} rollout evaluations)", flush=True)
    if len(results) == 2:
        print(f"speed-up (loop / batched): {results['per-member loop'] / results['batched']:.2f}x")


if __name__ == "__main__":
    main()
