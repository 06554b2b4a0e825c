"""Benchmark: one G²RPO rollout, batched (g2rpo.singular_stochastic_sampling) against Part 1's
reference (g2rpo.group_rollout, one prompt's group at a time).

    python -m benchmarks.rollout       # toy flow, G = 12, 8 branch steps, granularities (1, 2, 3)

Prints seconds per rollout for both, the rows each sent through the model, and their ratio,
measured in the same run. The tests hold the two to the same samples for the same noise.
"""

import argparse
import time

import torch

import g2rpo


def reference_rollout(velocity_fn, cond, x_T, sigmas, branch_steps, granularities, group_size,
                      eta, generator):
    """Part 1 prompt by prompt: g2rpo.group_rollout on each row of cond. Returns the rows the
    model evaluated."""
    rows = 0

    def counted(c):
        def velocity(x, sigma):
            nonlocal rows
            rows += x.shape[0]
            return velocity_fn(x, sigma, c.expand(x.shape[0]))
        return velocity

    for p in range(x_T.shape[0]):
        g2rpo.group_rollout(counted(cond[p : p + 1]), x_T[p], sigmas, branch_steps, granularities,
                            group_size, eta, generator)
    return rows


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

    def reference():
        return reference_rollout(vel, cond, x_T, sigmas, cfg.branch_steps, cfg.granularities,
                                 cfg.group_size, cfg.eta, torch.Generator().manual_seed(0))

    times = {}
    for name, fn in (("batched", batched), ("reference", reference)):
        rows = fn()  # warm-up
        t = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            fn()
            t.append(time.perf_counter() - start)
        times[name] = min(t)
        print(f"{name:10s} {times[name] * 1e3:9.1f} ms per rollout  ({rows:,} model rows, "
              f"{args.prompts} prompts, G={cfg.group_size}, K={len(cfg.branch_steps)}, "
              f"granularities {cfg.granularities})")
    print(f"speed-up (reference / batched): {times['reference'] / times['batched']:.1f}x")


if __name__ == "__main__":
    main()
