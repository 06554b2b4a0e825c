"""Benchmark: one G²RPO rollout, batched (g2rpo.py) vs a batch-1 per-member loop (official style).

    python -m benchmarks.rollout       # toy flow, G = 12, 8 branch steps, granularities (1, 2, 3)

Prints seconds per rollout for both and their ratio, measured in the same run. The loop is also
the reference the tests compare the batched rollout against (same noise → same samples).
"""

import argparse
import time

import torch

import g2rpo


@torch.no_grad()
def rollout_per_member(velocity_fn, cond, x_T, sigmas, branch_steps, granularities, group_size,
                       eta, noise=None, generator=None):
    """Singular Stochastic Sampling the slow, obvious way: every model call carries one sample.

    cond: P rows; x_T: (P, *D); noise: optional (K, P, G, *D) SDE noise (else drawn per member).
    Returns x_k (K, P, *D) anchor states, x_next (K, P, G, *D), old_log_prob (K, P, G),
    samples (K, L, P, G, *D), evals.
    """
    P, T, evals = x_T.shape[0], len(sigmas) - 1, 0

    def v_of(x, i, p):
        nonlocal evals
        evals += 1
        return velocity_fn(x[None], sigmas[i].view(1), g2rpo.take_rows(cond, torch.tensor([p])))[0]

    x_ks, x_next, log_probs, samples = [], [], [], []
    for j, k in enumerate(branch_steps):
        x0_k, xn_k, lp_k, s_k = [], [], [], []
        for p in range(P):
            # The anchor is recomputed per branch step, as the official code does.
            x = x_T[p]
            for i in range(k):
                x = g2rpo.ode_step(x, v_of(x, i, p), sigmas[i], sigmas[i + 1])
            v = v_of(x, k, p)
            x0_k.append(x)
            xn_p, lp_p, s_p = [], [], []
            for m in range(group_size):
                if noise is None:
                    x1, lp, _, _ = g2rpo.sde_step(x[None], v[None], sigmas[k], sigmas[k + 1], eta,
                                                  generator)
                else:
                    _, _, mean, std = g2rpo.sde_step(x[None], v[None], sigmas[k], sigmas[k + 1],
                                                     eta, prev_sample=x[None])
                    x1, lp, _, _ = g2rpo.sde_step(x[None], v[None], sigmas[k], sigmas[k + 1], eta,
                                                  prev_sample=mean + std * noise[j, p, m][None])
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


def main():
    import toy_flow

    p = argparse.ArgumentParser(prog="python -m benchmarks.rollout", description=__doc__)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = toy_flow.ToyFlow().eval()  # random weights: speed does not depend on training
    vel = toy_flow.velocity_fn(model)
    cfg = toy_flow.toy_config("g2rpo")
    sigmas = g2rpo.sigma_schedule(cfg.num_steps, cfg.shift)
    cond = torch.arange(args.prompts) % toy_flow.NUM_CLASSES
    x_T = torch.randn(args.prompts, 2)

    def batched():
        v = g2rpo.CountingVelocity(vel, cfg.batch_size)
        g2rpo.singular_stochastic_sampling(v, cond, x_T, sigmas, cfg.branch_steps,
                                           cfg.granularities, cfg.group_size, cfg.eta,
                                           torch.Generator().manual_seed(0))
        return v.evals

    def loop():
        return rollout_per_member(vel, cond, x_T, sigmas, cfg.branch_steps, cfg.granularities,
                                  cfg.group_size, cfg.eta,
                                  generator=torch.Generator().manual_seed(0))[4]

    times = {}
    for name, fn in (("batched", batched), ("per-member loop", loop)):
        evals = fn()  # warm-up
        t = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            fn()
            t.append(time.perf_counter() - start)
        times[name] = min(t)
        print(f"{name:16s} {times[name] * 1e3:9.1f} ms per rollout  ({evals:,} model evals, "
              f"{args.prompts} prompts, G={cfg.group_size}, K={len(cfg.branch_steps)}, "
              f"granularities {cfg.granularities})")
    print(f"speed-up (loop / batched): {times['per-member loop'] / times['batched']:.1f}x")


if __name__ == "__main__":
    main()
