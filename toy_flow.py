"""A 2-D world where G²RPO runs on a CPU in seconds.

Conditions play the role of prompts: class c ∈ {0..3} owns three Gaussian sub-modes on a ring.
A small conditional MLP flow is pretrained by flow matching (cached on disk), then g2rpo.train
fine-tunes it against a reward that cares about two decisions:
  * which sub-mode a sample lands in (decided at high noise): mode weights 1.0 / 0.5 / 0.0;
  * where inside the mode (decided at low noise): each mode's reward peaks at a point pushed
    outward from the mode centre by REWARD_OFFSET, beyond where the data lives.
Fidelity (not the reward) is the fraction of samples within 3 std of one of their class's modes;
chasing the offset peak too hard pulls samples off the modes, so reward hacking shows as a drop.

    python toy_flow.py                         # G²RPO, one seed, PNG in toy_g2rpo.png
    python toy_flow.py --method full_sde       # the DanceGRPO / Flow-GRPO style baseline
    python toy_flow.py --method mixgrpo        # MixGRPO: SDE only in a sliding window of steps
    python toy_flow.py --seeds 3 --method all  # comparison tables: 95 % CIs over seeds, per
                                               # iteration and at the same model-evaluation budget
    python toy_flow.py --reward proxy --kl-beta 3 --ema-decay 0.99   # guard rails on a gamed reward
    python toy_flow.py --guard-rails 0,1,3,10 --seeds 5 --out toy_guard_rails.png   # their study
    python toy_flow.py --study mgai --seeds 30           # what MGAI's gain comes from
    python toy_flow.py --study mgai-verdict --seeds 60   # its three deciding arms, more seeds
    python toy_flow.py --study mgai-settings --seeds 20  # MGAI where the granularities disagree
"""

import argparse
import dataclasses
import functools
import hashlib
import json
import math
import time
from pathlib import Path

import torch
import torch.nn as nn

import g2rpo
from worlds import studies
from worlds.studies import (at_budget, ci_text, float_tuple, mean_ci, mean_std,
                            ode_samples, paired_difference)

NUM_CLASSES = 4
MODES_PER_CLASS = 3
RING_RADIUS = 3.0
MODE_STD = 0.15
MODE_WEIGHTS = (1.0, 0.5, 0.0)  # reward for landing in sub-mode 0 / 1 / 2 of the class
REWARD_OFFSET = 0.3  # the in-mode reward peak sits 2 std outward of the mode centre
REWARD_WIDTH = 0.3
ON_MODE_STDS = 3.0
PROXY_SLOPE = 0.5  # the proxy reward's rise per unit of radial distance past the peak
EXTRA_STD = MODE_STD  # std of the D − 2 dimensions the reward ignores (--dim > 2)

# Toy hyper-parameters. They differ from FLUX's on purpose: the log-prob is averaged over D = 2
# elements here, not ~1e5, so one update moves the ratio by orders of magnitude more.
TOY = dict(
    shift=1.0,  # with shift 3 the 8 noisiest of 16 steps cover only σ ∈ [1, 0.75]
    clip_range=1e-2,  # 1e-4 clips ~all samples after the first k with D = 2
    lr=1e-4,  # 3e-4 was faster but unstable for every method (see docs/toy.md)
    weight_decay=1e-4,
    prompts_per_iteration=16,
    num_iterations=100,
    batch_size=1 << 16,
    # MixGRPO's run puts its window at 12 positions (11 moves, every 25 of 300 iterations),
    # through the first ~60 % of its 25 steps; every 13 of the toy's 100 covers the same share
    # of 16 steps (the rule behind Config.window_every = 39 of 300).
    window_every=13,
)
METHODS = {
    "full_sde": dict(method="full_sde"),
    "mixgrpo": dict(method="mixgrpo"),
    "g2rpo_wo_mgai": dict(method="g2rpo", granularities=(1,)),
    "g2rpo": dict(method="g2rpo", granularities=(1, 2, 3)),
}


def toy_config(method="g2rpo", seed=0, **overrides):
    """g2rpo.Config for the toy: the official recipe with the toy's own clip, lr and batch."""
    return g2rpo.Config(**{**TOY, **METHODS[method], "seed": seed, **overrides})


# ----------------------------------------------------------------------------------------------
# Data, reward, fidelity.


def mode_centres():
    """(C, 3, 2): class c's sub-modes sit at angles c·30° + {0°, 120°, 240°} on the ring."""
    c = torch.arange(NUM_CLASSES, dtype=torch.float32)[:, None]
    j = torch.arange(MODES_PER_CLASS, dtype=torch.float32)[None, :]
    angle = math.radians(30) * c + 2 * math.pi / MODES_PER_CLASS * j  # (C, 3)
    return RING_RADIUS * torch.stack([angle.cos(), angle.sin()], dim=-1)


@functools.lru_cache(maxsize=None)
def embedding(dim):
    """(D, D) fixed random orthogonal map Q: the 2-D problem lives on the plane of Q's first two
    columns, the other D − 2 directions hold narrow noise the reward ignores (D = 2: identity)."""
    if dim == 2:
        return torch.eye(2)
    q, r = torch.linalg.qr(torch.randn(dim, dim, generator=torch.Generator().manual_seed(2024)))
    return q * torch.sign(torch.diagonal(r))  # (D, D)


def project(x):
    """(N, D) → (N, 2): the toy plane's coordinates (D = 2: x itself)."""
    return x if x.shape[-1] == 2 else (x @ embedding(x.shape[-1]).to(x))[:, :2]


def sample_data(n, generator=None, dim=2):
    """n data points and their classes: a uniform class, a uniform sub-mode, Gaussian noise;
    for dim > 2 embedded by `embedding(dim)` with EXTRA_STD noise in the other directions."""
    c = torch.randint(NUM_CLASSES, (n,), generator=generator)
    j = torch.randint(MODES_PER_CLASS, (n,), generator=generator)
    x = mode_centres()[c, j] + MODE_STD * torch.randn(n, 2, generator=generator)
    if dim > 2:
        extra = EXTRA_STD * torch.randn(n, dim - 2, generator=generator)
        x = torch.cat([x, extra], dim=1) @ embedding(dim).T  # (N, D)
    return x, c


def reward(x, c):
    """(N, D), (N,) → (N,): Σ_j w_j · exp(−|x − peak_j|² / (2·width²)) over the class's modes,
    on the toy plane (project(x))."""
    x = project(x)
    centres = mode_centres().to(x.device)[c]  # (N, 3, 2)
    peaks = centres * (1 + REWARD_OFFSET / RING_RADIUS)  # pushed radially outward
    w = torch.tensor(MODE_WEIGHTS, device=x.device)
    d2 = ((x[:, None, :] - peaks) ** 2).sum(-1)  # (N, 3)
    return (w * torch.exp(-d2 / (2 * REWARD_WIDTH**2))).sum(-1)


def proxy_reward(x, c):
    """(N, D), (N,) → (N,): a reward that can be gamed. It equals `reward` (the gold measure)
    up to each peak, but past the peak, radially outward, it keeps rising (by PROXY_SLOPE per
    unit of distance) where the gold reward falls away: pushing samples off the modes pays."""
    x = project(x)
    centres = mode_centres().to(x.device)[c]  # (N, 3, 2)
    outward = centres / RING_RADIUS  # unit vectors
    rel = x[:, None, :] - centres
    u = (rel * outward).sum(-1) - REWARD_OFFSET  # radial distance past the peak (N, 3)
    t2 = (rel**2).sum(-1) - (u + REWARD_OFFSET) ** 2  # squared tangential distance
    along = torch.where(u > 0, 1 + PROXY_SLOPE * u, torch.exp(-u**2 / (2 * REWARD_WIDTH**2)))
    w = torch.tensor(MODE_WEIGHTS, device=x.device)
    return (w * torch.exp(-t2.clamp_min(0) / (2 * REWARD_WIDTH**2)) * along).sum(-1)


REWARDS = {"gold": reward, "proxy": proxy_reward}


def reward_fn(x, prompts, which="gold"):
    """The g2rpo reward interface: samples (N, 2), prompts (list of N class ids) → (N,)."""
    return REWARDS[which](x, torch.as_tensor(prompts, device=x.device))


def on_mode(x, c):
    """(N,) bool: within ON_MODE_STDS std of one of class c's sub-modes (the fidelity metric)."""
    d = (project(x)[:, None, :] - mode_centres().to(x.device)[c]).norm(dim=-1)  # (N, 3)
    return d.min(dim=-1).values < ON_MODE_STDS * MODE_STD


# ----------------------------------------------------------------------------------------------
# The flow model and its pretraining.


class ToyFlow(nn.Module):
    """v_θ(x, σ, c): an MLP on [x, Fourier(σ), class embedding] (3 hidden layers of 128)."""

    def __init__(self, hidden=128, num_freqs=8, class_dim=32, dim=2):
        super().__init__()
        self.dim = dim
        self.register_buffer("freqs", 2.0 ** torch.arange(num_freqs) * math.pi)
        self.embed = nn.Embedding(NUM_CLASSES, class_dim)
        self.net = nn.Sequential(
            nn.Linear(dim + 2 * num_freqs + class_dim, hidden), nn.SiLU(),
            nn.Linear(hidden, hidden), nn.SiLU(),
            nn.Linear(hidden, hidden), nn.SiLU(),
            nn.Linear(hidden, dim),
        )

    def forward(self, x, sigma, c):
        s = sigma[:, None] * self.freqs  # (N, F)
        h = torch.cat([x, s.sin(), s.cos(), self.embed(c)], dim=-1)
        return self.net(h)  # (N, D)


def pretrain(steps=10000, batch=256, lr=1e-3, seed=0, progress=True, dim=2):
    """Flow matching: x_σ = (1 − σ)·x0 + σ·ε, regress v on ε − x0, σ ~ U(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = ToyFlow(dim=dim)
    return studies.flow_matching(model, lambda n: sample_data(n, g, dim), steps, batch, lr, g,
                                 progress, "pretrain flow")


def load_or_pretrain(cache_dir=".cache", steps=10000, seed=0, retrain=False, progress=True,
                     dim=2):
    """The pretrained toy flow, from cache_dir if a matching file exists, else trained and saved."""
    spec = dict(steps=steps, seed=seed, modes=mode_centres().tolist(), std=MODE_STD,
                torch=torch.__version__.split("+")[0])
    if dim != 2:  # D = 2 keeps the key it always had
        spec.update(dim=dim, extra_std=EXTRA_STD)
    spec = json.dumps(spec, sort_keys=True)
    path = Path(cache_dir) / f"toy_flow_{hashlib.sha1(spec.encode()).hexdigest()[:10]}.pt"

    def load(state):
        model = ToyFlow(dim=dim)
        model.load_state_dict(state)
        return model.eval()

    build = lambda: pretrain(steps=steps, seed=seed, progress=progress, dim=dim)
    return studies.cached(path, build, load, rebuild=retrain)


velocity_fn = studies.velocity_fn


# ----------------------------------------------------------------------------------------------
# Evaluation and runs.


def evaluate(model, n_per_class=512, num_steps=16, shift=1.0, seed=1234):
    """Mean reward and fidelity (on-mode fraction) of ODE samples on fixed eval noise."""
    c = torch.arange(NUM_CLASSES).repeat_interleave(n_per_class)
    x = ode_samples(model, c, num_steps, shift, seed)
    return {"reward": reward(x, c).mean().item(), "proxy": proxy_reward(x, c).mean().item(),
            "fidelity": on_mode(x, c).float().mean().item()}


def sliced_wasserstein(a, b, num_projections=256, seed=0):
    """Sliced 1-Wasserstein distance between two equal-size 2-D point sets."""
    g = torch.Generator().manual_seed(seed)
    theta = torch.rand(num_projections, generator=g) * math.pi
    dirs = torch.stack([theta.cos(), theta.sin()], dim=1)  # (n, 2)
    pa, pb = (a @ dirs.T).sort(dim=0).values, (b @ dirs.T).sort(dim=0).values
    return (pa - pb).abs().mean().item()


def credited_noise_share(model, step, sde_steps, classes, **kwargs):
    """studies.credited_noise_share with the toy's reward: Var(E[r | ε_step]) / Var(r)."""
    return studies.credited_noise_share(model, step, sde_steps, classes, reward, **kwargs)


def frozen_copy(model):
    """The reference policy for the KL term: a copy of `model` that no optimizer sees."""
    ref = ToyFlow(dim=model.dim)
    ref.load_state_dict(model.state_dict())
    return ref.requires_grad_(False).eval()


def run(base_model, method="g2rpo", seed=0, eval_every=10, progress=True, log=None,
        reward="gold", **overrides):
    """Fine-tune a copy of base_model with one method against `reward` ("gold": the toy's
    reward; "proxy": proxy_reward, which can be gamed); returns (model, result dict).

    With kl_beta > 0 the reference is a frozen copy of base_model; with ema_decay > 0 the
    evaluations (curve) and the returned model hold the EMA weights, and each curve point also
    has the trained weights' under "live" (the EMA does not change training). The curve always
    reports the gold reward ("reward"), the proxy and the fidelity.
    """
    if reward not in REWARDS:
        raise ValueError(f"reward must be one of {', '.join(REWARDS)}, got {reward!r}")
    cfg = toy_config(method, seed, **overrides)
    torch.manual_seed(seed)
    model = ToyFlow(dim=base_model.dim)
    model.load_state_dict(base_model.state_dict())
    reference = frozen_copy(base_model) if cfg.kl_beta > 0 else None
    result = studies.fine_tune(model, cfg, functools.partial(evaluate, shift=cfg.shift),
                               velocity_fn(model), functools.partial(reward_fn, which=reward),
                               list(range(NUM_CLASSES)), (model.dim,),
                               reference and velocity_fn(reference), eval_every, progress, log)
    return model, {"method": method, "seed": seed, "reward": reward,
                   "config": dataclasses.asdict(cfg), **result}


def plot(base_model, results, path, shift=1.0, runs=None):
    """Samples before / after for each method (seed 0), and the eval reward and fidelity curves:
    one line per method, or with several seeds (`runs`: method → list of results) the mean over
    seeds with a band of ± one std."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 11})
    c = torch.arange(NUM_CLASSES).repeat_interleave(256)
    panels = [("pretrained", base_model)] + [(f"{r['method']} (seed {r['seed']})", m)
                                             for m, r in results]
    cols = max(len(panels), 3)
    fig, grid = plt.subplots(2, cols, figsize=(4.2 * cols, 8.8), squeeze=False)
    axes, curves = grid[0], grid[1]
    for ax in [*axes[len(panels):], *curves[3:]]:
        ax.axis("off")
    centres = mode_centres().view(-1, 2)
    for ax, (title, model) in zip(axes, panels):
        x = project(ode_samples(model, c, shift=shift, seed=7))
        ax.scatter(x[:, 0], x[:, 1], c=c, cmap="tab10", vmin=0, vmax=9, s=3, alpha=0.6)
        ax.scatter(centres[:, 0], centres[:, 1], marker="x", c="k", s=20)
        ax.set(title=title, xlim=(-4.5, 4.5), ylim=(-4.5, 4.5), aspect="equal",
               xlabel="$x_1$", ylabel="$x_2$")
    runs = runs or {r["method"]: [r] for _, r in results}
    for method, rs in runs.items():
        it = [p["iteration"] for p in rs[0]["curve"]]
        evals = [p["evals"] for p in rs[0]["curve"]]
        for ax, x, key, first in ((curves[0], it, "reward", 0), (curves[1], evals, "reward", 1),
                                  (curves[2], it, "fidelity", 0)):  # a log axis has no 0
            values = torch.tensor([[p[key] for p in r["curve"]] for r in rs])  # (seeds, points)
            mean, x = values.mean(0)[first:], x[first:]
            label = method if len(rs) == 1 else f"{method} (mean ± std, {len(rs)} seeds)"
            line, = ax.plot(x, mean, label=label)
            if len(rs) > 1:
                std = values.std(0)[first:]
                ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.2)
    curves[0].set(title="eval reward (ODE samples)", xlabel="iteration", ylabel="mean reward")
    curves[1].set(title="eval reward per model evaluation", xscale="log",
                  xlabel="model evaluations (rollout + training rows)", ylabel="mean reward")
    curves[2].set(title="fidelity", xlabel="iteration", ylabel="on-mode fraction")
    curves[0].legend(fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def granularity_disagreement(model, **kwargs):
    """{λ: share of group advantages whose sign differs from λ = 1's} under the toy's reward
    (studies.granularity_disagreement has the other statistics)."""
    out = studies.granularity_disagreement(model, reward, NUM_CLASSES, **kwargs)
    return out["disagree"]


def mgai_runs(base_model, seeds, reward="gold", arms=None, **overrides):
    """`arms` (default: all of studies.mgai_arms) on the toy (its recipe otherwise), the same
    seeds for every arm, evaluated at the end: {arm: [result per seed]}."""
    train = lambda seed, **arm: run(base_model, "g2rpo", seed, eval_every=10**9, progress=False,
                                    reward=reward, **{**overrides, **arm})[1]
    return studies.mgai_study(train, seeds, arms or studies.mgai_arms())


# Where the granularities might disagree more than at the default (T = 16, Λ = {1, 2, 3}, D = 2):
# fewer sampling steps, coarser strides, and the same problem embedded in D = 16 (--dim).
MGAI_SETTINGS = {
    "T = 16, Λ = {1, 2, 3}, D = 2 (default)": dict(),
    "T = 8, Λ = {1, 2, 3}, branch steps 0–3": dict(num_steps=8, branch_steps=(0, 1, 2, 3)),
    "T = 16, Λ = {1, 4, 8}": dict(granularities=(1, 4, 8)),
    "D = 16": dict(dim=16),
}


def mgai_settings_table(seeds, settings=MGAI_SETTINGS, cache_dir=".cache", pretrain_steps=10000,
                        reward="gold", **overrides):
    """Markdown (studies.mgai_settings): per setting the granularities' sign disagreement under
    the toy's reward on the pretrained flow (of that D) and MGAI's effect over w/o MGAI and over
    the pure-clip arm."""
    table = {}
    for name, setting in settings.items():
        setting = {**overrides, **setting}
        base = load_or_pretrain(cache_dir, pretrain_steps, progress=False,
                                dim=setting.pop("dim", 2))
        cfg = toy_config("g2rpo", **setting)
        train = lambda seed, base=base, setting=setting, **arm: run(
            base, "g2rpo", seed, eval_every=10**9, progress=False, reward=reward,
            **{**setting, **arm})[1]
        disagreement = lambda base=base, cfg=cfg: studies.granularity_disagreement(
            base, REWARDS[reward], NUM_CLASSES, cfg.granularities, cfg.branch_steps,
            shift=cfg.shift, num_steps=cfg.num_steps)
        table[name] = (train, disagreement, cfg.granularities)
    return studies.mgai_settings(table, seeds, "reward" if reward == "gold" else "proxy")


# ----------------------------------------------------------------------------------------------
# Reward hacking and its guard rails: train on the proxy, measure the gold reward.

STUDY_EMA_DECAY = 0.99  # per optimizer step: 8 steps per iteration, so a horizon of ~12 iterations
STUDY_AT = (10, 25, 50, 100, 200)  # iterations the study's tables report


def guard_rails_study(base_model, betas, seeds, ema_decay=STUDY_EMA_DECAY, method="g2rpo",
                      eval_every=5, log=print, **overrides):
    """Train on proxy_reward with every β in `betas` over `seeds`; every `eval_every` iterations
    evaluate the gold reward, the proxy and the fidelity of the trained weights (EMA off) and of
    their EMA (on). The EMA does not change training, so both rows of a β come from the same
    runs. Returns {(β, ema_decay or 0): [result per seed]} and prints two markdown tables."""
    runs = {}
    for beta in betas:
        for seed in seeds:
            _, r = run(base_model, method, seed, eval_every=eval_every, progress=False,
                       reward="proxy", kl_beta=beta, ema_decay=ema_decay, **overrides)
            studies.add_ema_rows(runs, beta, r, ema_decay)
        for decay in (0.0, ema_decay):
            if log is not None:
                end = [r["curve"][-1] for r in runs[(beta, decay)]]
                log(f"β {beta:g}, EMA {decay:g}: gold {mean_std([e['reward'] for e in end])}  "
                    f"proxy {mean_std([e['proxy'] for e in end])}  fidelity "
                    f"{mean_std([e['fidelity'] for e in end])}")
    if log is not None:
        log(guard_rails_tables(runs))
    return runs


def _at(result, iteration, key):
    """`key` of a run's evaluation after `iteration` iterations (the study evaluates there)."""
    point = next((p for p in result["curve"] if p["iteration"] == iteration), None)
    if point is None:
        raise ValueError(f"no evaluation after {iteration} iterations in this run")
    return point[key]


def guard_rails_tables(runs):
    """The study's two markdown tables: gold reward at STUDY_AT (those the runs reach), then
    proxy, fidelity and kl_ref at the end; mean and 95 % CI over seeds."""
    first = next(iter(runs.values()))
    end = first[0]["curve"][-1]["iteration"]
    at = [i for i in STUDY_AT if i < end] + [end]
    lines = ["| β | EMA | " + " | ".join(f"gold reward at {i} | 95% CI" for i in at)
             + f" |  ({len(first)} seeds, trained on the proxy)",
             "|---|---|" + "---|---|" * len(at)]
    for (beta, decay), rs in runs.items():
        cells = []
        for i in at:
            values = [_at(r, i, "reward") for r in rs]
            cells += [f"{mean_ci(values)[0]:.4f}", ci_text(values)]
        lines.append(f"| {beta:g} | {decay:g} | " + " | ".join(cells) + " |")
    lines += ["", f"| β | EMA | proxy at {end} | 95% CI | fidelity at {end} | 95% CI | kl_ref "
                  f"(last 10 iterations) |", "|---|---|---|---|---|---|---|"]
    for (beta, decay), rs in runs.items():
        proxy = [r["curve"][-1]["proxy"] for r in rs]
        fidelity = [r["curve"][-1]["fidelity"] for r in rs]
        kl = [sum(h["kl_ref"] for h in r["history"][-10:]) / len(r["history"][-10:]) for r in rs
              if "kl_ref" in r["history"][-1]]
        lines.append(f"| {beta:g} | {decay:g} | {mean_ci(proxy)[0]:.4f} | {ci_text(proxy)} | "
                     f"{mean_ci(fidelity)[0]:.4f} | {ci_text(fidelity)} | "
                     + (f"{mean_ci(kl)[0]:.2e} |" if kl else "– |"))
    return "\n".join(lines)


def plot_guard_rails(runs, path):
    """Gold reward, proxy and fidelity against iterations: the mean over seeds with its 95 % CI
    as a band; colour = β, dashed = EMA on."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    betas = list(dict.fromkeys(beta for beta, _ in runs))
    colours = plt.get_cmap("viridis")(torch.linspace(0, 0.9, len(betas)).tolist())
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    for (beta, decay), rs in runs.items():
        it = [p["iteration"] for p in rs[0]["curve"]]
        for ax, key in zip(axes, ("reward", "proxy", "fidelity")):
            stats = [mean_ci([r["curve"][j][key] for r in rs]) for j in range(len(it))]
            mean = torch.tensor([m for m, _ in stats])
            half = torch.tensor([0.0 if math.isnan(h) else h for _, h in stats])
            colour = colours[betas.index(beta)]
            ax.plot(it, mean, color=colour, ls="--" if decay else "-",
                    label=f"β = {beta:g}" + (f", EMA {decay:g}" if decay else ""))
            ax.fill_between(it, mean - half, mean + half, color=colour, alpha=0.15)
    axes[0].set(title="gold reward (the toy's reward)", xlabel="iteration", ylabel="mean")
    axes[1].set(title="proxy reward (trained on)", xlabel="iteration", yscale="log")
    axes[2].set(title="fidelity", xlabel="iteration", ylabel="on-mode fraction")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"trained on the proxy: mean and 95 % CI over {len(rs)} seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


# Config fields with a flag name of their own, or none (the toy's --method picks the method).
TOY_FLAG_NAMES = {"num_iterations": ("--iterations", "--num-iterations"), "method": None}
STUDIES = ("mgai", "mgai-verdict", "mgai-settings")
# Config fields each study sets itself, per arm or per setting: a flag for one is refused.
STUDY_SETS = {"mgai": ("granularities", "adv_clip", "adv_scale"),
              "mgai-verdict": ("granularities", "adv_clip", "adv_scale"),
              "mgai-settings": ("granularities", "adv_clip", "adv_scale", "num_steps",
                                "branch_steps")}


def parse_args(argv=None):
    """The toy's flags (one per g2rpo.Config field, generated from it), all checked before
    pretraining: errors name the flag and the value."""
    p = argparse.ArgumentParser(prog="toy_flow.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--method", default="g2rpo", choices=[*METHODS, "all"],
      help="which method (all: each, and a comparison table) (default: g2rpo)")
    a("--seeds", type=int, default=1,
      help="runs per method, seeds --seed, --seed + 1, ... (table: mean ± std) (default: 1)")
    a("--out", default="toy_g2rpo.png",
      help="PNG: samples before/after, curves; the per-iteration metrics go to the same name "
           "with .jsonl (default: toy_g2rpo.png)")
    a("--cache-dir", default=".cache",
      help="where the pretrained flow is cached (default: .cache)")
    a("--pretrain-steps", type=int, default=10000,
      help="Adam steps of pretraining (default: 10000)")
    a("--retrain", action="store_true", help="ignore the cached pretrained flow")
    a("--dim", type=int, default=2,
      help="data dimension D: the 2-D problem embedded by a fixed random orthogonal map, plus "
           "D − 2 narrow directions the reward ignores (default: 2)")
    a("--study", choices=STUDIES, default=None,
      help="instead of a run: mgai, the arms that separate what MGAI's gain comes from; "
           "mgai-verdict, only the three of them that carry the verdict (G²RPO, w/o MGAI, the "
           "pure clip), for more seeds in the same time; mgai-settings, MGAI where the "
           "granularities might disagree more (fewer steps, coarser Λ, D = 16); all over --seeds "
           "paired seeds (docs/toy.md)")
    a("--reward", default="gold", choices=list(REWARDS),
      help="what to train on: gold, the toy's reward, or proxy, one that can be gamed (it keeps "
           "rising outward past the gold reward's peak); evaluations report both (default: gold)")
    a("--guard-rails", type=float_tuple, default=None, metavar="B1,B2,...",
      help="the reward-hacking study instead of a run: train on the proxy with each kl-beta, "
           "each with EMA off and on (--ema-decay, default 0.99), over --seeds seeds "
           "(docs/toy.md, 'Reward hacking and its guard rails')")
    a("--verbose", action="store_true", help="print one metrics line per iteration")
    flags = studies.add_config_flags(
        p, toy_config("g2rpo"), TOY_FLAG_NAMES, "algorithm (g2rpo.Config; the toy's defaults in "
        "brackets)", {"granularities": "1,2,3 for g2rpo, 1 for g2rpo_wo_mgai"})
    return studies.parse_run_args(p, argv, flags, METHODS, toy_config, _check_study_flags)


def _check_study_flags(p, args):
    """The checks of this file's own flags (studies.parse_run_args runs the shared ones)."""
    if args.dim < 2:
        p.error(f"--dim needs D >= 2, got {args.dim}")
    if args.study is not None:
        if args.method != "g2rpo" or args.guard_rails is not None:
            p.error(f"--study {args.study} compares G²RPO's arms: --method must be g2rpo, "
                    f"without --guard-rails")
        if args.study == "mgai-settings" and args.dim != 2:
            p.error("--study mgai-settings sets --dim itself (per setting)")
        for field in STUDY_SETS[args.study]:
            if field in args.overrides:
                flag = "--" + field.replace("_", "-")
                p.error(f"--study {args.study} sets {flag} itself (per arm or setting)")
    if args.guard_rails is not None:
        if args.method == "all":
            p.error("--guard-rails runs one --method (not all)")
        if "kl_beta" in args.overrides or args.reward != "gold":
            p.error("--guard-rails sets --kl-beta (each β of its list) and --reward (proxy) "
                    "itself")
        for beta in args.guard_rails:
            if not (math.isfinite(beta) and beta >= 0):
                p.error(f"--guard-rails: every β must be >= 0 and finite, got {beta}")
        if args.overrides.get("ema_decay", STUDY_EMA_DECAY) == 0:
            p.error("--guard-rails compares EMA off and on: --ema-decay must be > 0")


COMPARED = (("g2rpo", "full_sde"), ("g2rpo", "mixgrpo"), ("g2rpo", "g2rpo_wo_mgai"),
            ("mixgrpo", "full_sde"), ("g2rpo_wo_mgai", "full_sde"))


def print_comparison(table, num_seeds, pretrained=None):
    """Per method: mean and 95 % CI over seeds of the final reward and fidelity, and its cost;
    then the same at the largest budget of model evaluations every method reaches; then the
    paired differences (same seeds) at the end and at that budget."""
    final = {m: {k: [r["curve"][-1][k] for r in rs] for k in ("reward", "fidelity")}
             for m, rs in table.items()}
    budget = min(r["evals"] for rs in table.values() for r in rs)
    same = {m: {k: [at_budget(r, budget, k) for r in rs] for k in ("reward", "fidelity")}
            for m, rs in table.items()}
    first = next(iter(table.values()))[0]
    iterations = first["config"]["num_iterations"]
    print(f"\n| method | final reward | 95% CI | fidelity | 95% CI | model evals / iteration "
          f"(rollout + training) |  ({num_seeds} seeds, {iterations} iterations)"
          f"\n|---|---|---|---|---|---|")
    if pretrained is not None:
        print(f"| pretrained | {pretrained['reward']:.4f} | – | {pretrained['fidelity']:.4f} "
              f"| – | – |")
    for m, rs in table.items():
        h = rs[0]["history"][0]
        print(f"| {m} | {mean_ci(final[m]['reward'])[0]:.4f} | {ci_text(final[m]['reward'])} | "
              f"{mean_ci(final[m]['fidelity'])[0]:.4f} | {ci_text(final[m]['fidelity'])} | "
              f"{h['nfe'] + h['train_rows']:,} ({h['nfe']:,} + {h['train_rows']:,}) |")
    if len(table) > 1:
        print(f"\n| method | reward at {budget:,} model evals | 95% CI | fidelity | 95% CI | "
              f"iterations used |  (the largest budget every method reaches)\n"
              f"|---|---|---|---|---|---|")
        for m, rs in table.items():
            per_it = rs[0]["evals"] / rs[0]["config"]["num_iterations"]
            print(f"| {m} | {mean_ci(same[m]['reward'])[0]:.4f} | {ci_text(same[m]['reward'])} | "
                  f"{mean_ci(same[m]['fidelity'])[0]:.4f} | {ci_text(same[m]['fidelity'])} | "
                  f"{budget / per_it:.1f} |")
    pairs = [(a, b) for a, b in COMPARED if a in table and b in table]
    if pairs and num_seeds > 1:
        print("\n| paired difference (same seeds) | final reward | 95% CI | | at the same budget "
              "| 95% CI | |\n|---|---|---|---|---|---|---|")
        for a, b in pairs:
            print(f"| {a} − {b} | "
                  + " | ".join(paired_difference(final[a]["reward"], final[b]["reward"])) + " | "
                  + " | ".join(paired_difference(same[a]["reward"], same[b]["reward"])) + " |")


def main(argv=None):
    args = parse_args(argv)
    studies.set_threads()

    start = time.time()
    seeds = range(args.seed, args.seed + args.seeds)
    if args.study in ("mgai", "mgai-verdict"):
        base = load_or_pretrain(args.cache_dir, args.pretrain_steps, retrain=args.retrain,
                                dim=args.dim)
        dis = studies.granularity_disagreement(base, REWARDS[args.reward], NUM_CLASSES,
                                               shift=TOY["shift"])
        print("sign disagreement with λ = 1 (64 prompts × 8 branch steps × 12 members): "
              + ", ".join(f"λ = {lam}: {share:.1%}" for lam, share in dis["disagree"].items())
              + f"; MGAI's sum is {dis['scale']:.2f} times one granularity's mean |A|")
        arms = studies.mgai_arms() if args.study == "mgai" else studies.verdict_arms()
        print(studies.mgai_tables(mgai_runs(base, seeds, args.reward, arms, **args.overrides),
                                  "reward" if args.reward == "gold" else "proxy"))
        print(f"(total {time.time() - start:.1f} s)")
        return
    if args.study == "mgai-settings":
        print(mgai_settings_table(seeds, cache_dir=args.cache_dir,
                                  pretrain_steps=args.pretrain_steps, reward=args.reward,
                                  **args.overrides))
        print(f"(total {time.time() - start:.1f} s)")
        return
    if args.guard_rails:
        base = load_or_pretrain(args.cache_dir, args.pretrain_steps, retrain=args.retrain,
                                dim=args.dim)
        overrides = dict(args.overrides)
        runs = guard_rails_study(base, args.guard_rails, range(args.seed, args.seed + args.seeds),
                                 overrides.pop("ema_decay", STUDY_EMA_DECAY), args.method,
                                 **overrides)
        metrics_path = Path(args.out).with_suffix(".jsonl")
        with open(metrics_path, "w") as f:
            for (beta, decay), rs in runs.items():
                for r in rs if decay else ():  # each run once (both rows share its history)
                    for m in r["history"]:
                        f.write(json.dumps({"kl_beta": beta, "ema_decay": decay,
                                            "seed": r["seed"], **m}) + "\n")
        plot_guard_rails(runs, args.out)
        print(f"saved {args.out} and {metrics_path}  (total {time.time() - start:.1f} s)")
        return
    base = load_or_pretrain(args.cache_dir, args.pretrain_steps, retrain=args.retrain,
                            dim=args.dim)
    before = evaluate(base, shift=TOY["shift"])
    print(f"pretrained flow: reward {before['reward']:.4f}  fidelity {before['fidelity']:.3f}"
          f"  ({time.time() - start:.1f} s)")
    methods = list(METHODS) if args.method == "all" else [args.method]
    results, table = [], {}
    metrics_path = Path(args.out).with_suffix(".jsonl")
    metrics_path.write_text("")
    for method in methods:
        for seed in seeds:
            model, r = run(base, method, seed, eval_every=2 if len(methods) > 1 else 10,
                           log=print if args.verbose else None, reward=args.reward,
                           **args.overrides)
            with open(metrics_path, "a") as f:  # one JSON line per iteration, as image_flow
                for m in r["history"]:
                    f.write(json.dumps({"method": method, "seed": seed, **m}) + "\n")
            end = r["curve"][-1]
            proxy = (f"  proxy (trained on) {before['proxy']:.4f} -> {end['proxy']:.4f}"
                     if args.reward == "proxy" else "")
            print(f"{method:14s} seed {seed}: reward {before['reward']:.4f} -> {end['reward']:.4f}"
                  f"{proxy}  fidelity {before['fidelity']:.3f} -> {end['fidelity']:.3f}"
                  f"  model evals {r['evals']:,} (rollout {r['nfe']:,})")
            table.setdefault(method, []).append(r)
            if seed == args.seed:
                results.append((model, r))
    if args.seeds > 1 or len(methods) > 1:
        print_comparison(table, args.seeds, before)
    plot(base, results, args.out, shift=args.overrides.get("shift", TOY["shift"]), runs=table)
    print(f"saved {args.out} and {metrics_path}  (total {time.time() - start:.1f} s)")


if __name__ == "__main__":
    main()
