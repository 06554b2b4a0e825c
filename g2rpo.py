"""G²RPO in one file: the algorithm first, in the paper's order, then what runs it fast.

Paper: "Fine-Grained GRPO for Precise Preference Alignment in Flow Models" (arXiv 2510.01982 v3,
CVPR 2026), first titled "G²RPO: Granular GRPO for Precise Reward in Flow Models" (v1, v2).
Official code: github.com/bcmi/Granular-GRPO. Imports torch and the standard library only and
knows no model: the caller brings a velocity function, a reward function and prompts (toy_flow.py,
worlds/digits_flow.py, image_flow/).

Part 1 (to line ~300) is the algorithm for ONE prompt's group in the paper's order, the reference
the rest is tested against; each function runs pasted alone with the helpers it names, torch only
(docs/algorithm.md, "Copy one function"). Then 2 the Config, 3 the batched machinery (a whole
iteration in few model calls), 4 the trainer, 5 the baselines, 6 the guard rails, 7 input checks.

Notation (shape letters in the comments)
    P  prompts in an iteration        G  group size (members per prompt)
    K  branch steps |M|               L  granularities |Λ| (times reward models R)
    T  sampling steps                 D  data dims of one sample (any shape, written *D)
    N  rows in one model call

Conventions (rectified flow, as FLUX / SD3 / diffusers)
    x_σ = (1 − σ)·x0 + σ·ε, σ = 1 is noise, σ = 0 is data; sampling runs σ: 1 → 0.
    The model predicts the velocity v ≈ ε − x0; step i goes σ_i → σ_{i+1}, Δ = σ_{i+1} − σ_i < 0.
    The paper's time t is `sigma` here, and its noise scale σ_t (Eq. 2) is `sigma_t`:
    σ_t = η·sqrt(σ / (1 − σ)), with 1 − σ_next in the denominator at σ = 1.
    The paper counts steps down (t = T … 1) and branches at M = {16, …, 9}; the code counts grid
    indices up (step k goes σ_k → σ_{k+1}): k_paper = T − k, so at T = 16 branch_steps (0, …, 7)
    is M.
    log π is the Gaussian log-density AVERAGED over the D elements of a sample (float32).
    The SDE step is a choice (Config.sde_kind): the paper's (Eqs. 2–3), or Coefficients-Preserving
    Sampling (arXiv 2509.05952, not in the paper), both Gaussian policies scored by their density.
    Group advantages use the unbiased (n − 1) std plus 1e-8; equal rewards give exactly 0.

Equation map (the paper's numbers; Alg. 1 is its Algorithm 1, "G²RPO Training Process")
    Part 1  σ grid, the official recipe's static shift ........ sigma_schedule
            Eq. 1, the flow ODE, one Euler step ................ ode_step
            Eq. 2, the reverse SDE; Eq. 3, its Euler–Maruyama
              step, a Gaussian policy ........................ sde_step, gaussian_log_prob
            Alg. 1 line 7, one x_T per group; lines 9–11, the
              ODE anchor; lines 12–13, the group's SDE step at
              k; lines 14–16, ODE completions per granularity .. group_rollout, granularity_schedule
            Alg. 1 lines 20–22, group advantages per
              granularity, their sum (Eq. 11), clipped ......... group_advantages,
                                                                 multi_granularity_advantages
            the clipped objective; Alg. 1 lines 24–26 .......... clipped_grpo_loss, group_update
    Part 3  Alg. 1 lines 7–16 for P prompts at once ............ singular_stochastic_sampling
    Part 4  Alg. 1 lines 20–22 and 24–26 for P prompts ........ rollout, policy_update
            Algorithm 1's outer loop ........................... train
    Part 5  full-SDE GRPO (DanceGRPO / Flow-GRPO style) ........ full_sde_sampling
            MixGRPO (arXiv 2507.21802), an SDE window .......... mixgrpo_window
    Part 6  additions: β·KL(π_θ ‖ π_ref) in the loss, EMA ...... gaussian_kl, EMA
"""

import contextlib
import math
import numbers
import time
import warnings
from dataclasses import dataclass

import torch

# ── Part 1. The algorithm for one prompt's group, in the paper's order: the reference. ────────────
# ── 1.1 The σ grid and the two steps: the ODE (Eq. 1) and the SDE (Eqs. 2–3) with its log π. ──────


def sigma_schedule(num_steps, shift=3.0):
    """σ grid from 1 to 0 with the static shift σ = s·u / (1 + (s − 1)·u), u = linspace(1, 0, T+1).

    >>> sigma_schedule(4, shift=1.0)
    tensor([1.0000, 0.7500, 0.5000, 0.2500, 0.0000])
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}")
    if not shift > 0:
        raise ValueError(f"shift must be > 0, got {shift!r}")
    u = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    return (shift * u / (1 + (shift - 1) * u)).float()  # (T+1,)


def _per_sample(s, x):
    """A float, 0-d or (N,) σ as a float32 tensor that broadcasts against x (N, *D)."""
    s = torch.as_tensor(s, dtype=torch.float32, device=x.device)
    if s.dim() > 1 or (s.dim() == 1 and s.shape[0] != x.shape[0]):
        raise ValueError(f"sigma must be a float or a ({x.shape[0]},) tensor, got {tuple(s.shape)}")
    return s if s.dim() == 0 else s.view(-1, *([1] * (x.dim() - 1)))  # (N, 1, ..., 1)


def ode_step(x, v, sigma, sigma_next):
    """Eq. 1, dx = v dσ, by one Euler step: x' = x + (σ' − σ)·v (= diffusers' FlowMatchEuler)."""
    return x + (_per_sample(sigma_next, x) - _per_sample(sigma, x)) * v


def gaussian_log_prob(x, mean, std):
    """log N(x; mean, std²) per element, averaged over all non-batch elements → (N,) float32.

    >>> gaussian_log_prob(torch.zeros(1, 2), torch.zeros(1, 2), torch.tensor(1.0))
    tensor([-0.9189])
    """
    x, mean = x.float(), mean.float()
    std = torch.as_tensor(std, dtype=torch.float32, device=x.device)
    log_sqrt_2pi = torch.tensor(2 * torch.pi, dtype=torch.float64).log().item() / 2
    lp = -((x - mean) ** 2) / (2 * std**2) - torch.log(std) - log_sqrt_2pi
    return lp.flatten(1).mean(dim=1)  # (N,)


def sde_step(x, v, sigma, sigma_next, eta, generator=None, prev_sample=None, noise=None,
             kind="flow_grpo"):
    """One Euler–Maruyama step (Eq. 3) of the reverse SDE that keeps the flow's marginals (Eq. 2):

        Eq. 2   dx = [v + σ_t²/(2σ)·(x + (1 − σ)·v)] dσ + σ_t dw,   σ_t = η·sqrt(σ / (1 − σ))
        Eq. 3   x' = x + drift·Δ + σ_t·sqrt(−Δ)·ε,  Δ = σ' − σ < 0,  ε ~ N(0, I)

    so the policy is the Gaussian π(x' | x) = N(mean, std²), mean = x + drift·Δ, std = σ_t·sqrt(−Δ).
    kind="cps": Coefficients-Preserving Sampling (arXiv 2509.05952) instead, not the paper's: with
    x̂0 = x − σ·v and x̂1 = x + (1 − σ)·v, std = σ'·sin(η·π/2) and
    mean = (1 − σ')·x̂0 + σ'·cos(η·π/2)·x̂1 (= sqrt(σ'² − std²)·x̂1): the noise takes a share of
    x̂1's σ', η ∈ (0, 1].
    x, v: (N, *D); sigma, sigma_next: floats or (N,) tensors; eta > 0. ε is drawn from generator,
    or given as noise (N, *D); with prev_sample, that sample is scored instead (the training pass).
    Returns (x' (N, *D), log π (N,) float32, mean (N, *D) float32, std broadcastable to x).
    """
    if kind not in ("flow_grpo", "cps"):
        raise ValueError(f"kind must be 'flow_grpo' or 'cps', got {kind!r}")
    if not (0 < eta < float("inf") and (kind != "cps" or eta <= 1)):
        raise ValueError(f"eta must be > 0 and finite for an SDE step (eta = 0 is ode_step)"
                         f"{' and <= 1 for CPS' if kind == 'cps' else ''}, got {eta!r}")
    xf, vf = x.float(), v.float()
    s, s_next = _per_sample(sigma, xf), _per_sample(sigma_next, xf)
    if not ((s_next < s) & (s > 0) & (s <= 1) & (s_next >= 0)).all():
        raise ValueError(f"sde_step needs 1 >= sigma > sigma_next >= 0, got sigma "
                         f"{s.flatten()[:4].tolist()}, sigma_next {s_next.flatten()[:4].tolist()}")
    if kind == "cps":  # x̂0's share as the ODE gives it; ε and x̂1 share σ' (cos² + sin² = 1)
        angle = torch.tensor(eta * torch.pi / 2)
        mean = (1 - s_next) * (xf - s * vf) + s_next * torch.cos(angle) * (xf + (1 - s) * vf)
        std = s_next * torch.sin(angle)
    else:
        delta = s_next - s  # Δ < 0
        # Eq. 2's σ_t. At σ = 1, 1 − σ is 0: the official code and Flow-GRPO use 1 − σ_next there.
        one_minus = torch.where(s >= 1, 1 - s_next, 1 - s)
        sigma_t = eta * torch.sqrt(s / one_minus)
        # Eq. 3's mean, x + Δ·drift with Eq. 2's drift v + σ_t²/(2σ)·(x + (1 − σ)·v), by x and v:
        mean = (xf * (1 + sigma_t**2 * delta / (2 * s))
                + vf * (1 + sigma_t**2 * (1 - s) / (2 * s)) * delta)
        std = sigma_t * torch.sqrt(-delta)  # Eq. 3's σ_t·sqrt(−Δ)
    if prev_sample is None:
        if noise is None:
            noise = torch.randn(xf.shape, generator=generator, device=xf.device,
                                dtype=torch.float32)
        prev_sample = mean + std * noise  # Eq. 3: x' = mean + σ_t·sqrt(−Δ)·ε
    prev_sample = prev_sample.detach()  # x' is data, not a function of θ
    return prev_sample.to(x.dtype), gaussian_log_prob(prev_sample, mean, std), mean, std


# ── 1.2 Singular Stochastic Sampling (Alg. 1 lines 7–16): one SDE step per branch, ODE elsewhere ──


def granularity_schedule(num_steps, branch_step, granularity):
    """Grid indices the ODE completion at granularity λ visits after the SDE step at branch step
    k: k+1 (where the branch sample lives), one ordinary step to k+2, then strides of λ, and T
    (σ = 0) last.

    >>> granularity_schedule(16, 7, 3)
    [8, 9, 12, 15, 16]
    """
    k, lam, T = branch_step, granularity, num_steps
    if isinstance(lam, bool) or not isinstance(lam, int) or lam < 1:
        raise ValueError(f"every granularity must be an integer >= 1, got {lam!r}")
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < T - 1:
        raise ValueError(f"branch step {k!r} is outside 0..{T - 2}: a branch needs a step on the "
                         f"grid of {T} steps and at least one ODE step after it")
    # Differs from the official code: sigmas[:k+2] + sigmas[k+2::λ] may stop short of T and then
    # takes x̂0 from the evaluation before the last point; we always finish with a step to σ = 0.
    return [k + 1] + list(range(k + 2, T, lam)) + [T]


@torch.no_grad()
def group_rollout(velocity, x_T, sigmas, branch_steps, granularities, group_size, eta,
                  generator=None, noise=None, sde_kind="flow_grpo"):
    """Singular Stochastic Sampling for one prompt's group of G (Alg. 1 lines 7–16).

    velocity(x (N, *D), sigma (N,)) → v (N, *D): the model, conditioned on this prompt.
    x_T (*D): the group's one initial noise (line 7); sigmas (T+1,) from 1 to 0; noise: the SDE
    steps' ε (K, G, *D), else drawn from generator; sde_kind: sde_step's kind.
    Returns x (K, *D) the anchor states x_k; x_next (K, G, *D) the branch samples at σ_{k+1};
    old_log_prob (K, G); samples (K, L, G, *D) each branch finished at each λ; anchor (*D).
    """
    T, G = len(sigmas) - 1, group_size
    # Lines 9–11: the deterministic anchor from x_T; every state and its velocity are kept.
    xs, vs = [x_T[None]], []  # (1, *D) each
    for i in range(T):
        vs.append(velocity(xs[i], sigmas[i].view(1)))
        xs.append(ode_step(xs[i], vs[i], sigmas[i], sigmas[i + 1]))
    out = {"x": [], "x_next": [], "old_log_prob": [], "samples": []}
    for j, k in enumerate(branch_steps):
        # Lines 12–13: G draws of ONE SDE step from the shared x_k (its v comes from the anchor).
        x_k, v_k = xs[k].expand(G, *x_T.shape), vs[k].expand(G, *x_T.shape)  # (G, *D)
        x_next, log_prob, _, _ = sde_step(x_k, v_k, sigmas[k], sigmas[k + 1], eta, generator,
                                          noise=None if noise is None else noise[j],
                                          kind=sde_kind)
        # Lines 14–16: finish every branch with the ODE, once per granularity λ.
        finals = []
        for lam in granularities:
            path, x = granularity_schedule(T, k, lam), x_next
            for a, b in zip(path[:-1], path[1:]):
                x = ode_step(x, velocity(x, sigmas[a].expand(G)), sigmas[a], sigmas[b])
            finals.append(x)
        for key, value in zip(out, (xs[k][0], x_next, log_prob, torch.stack(finals))):
            out[key].append(value)
    return {**{key: torch.stack(values) for key, values in out.items()}, "anchor": xs[-1][0]}


# ── 1.3 Multi-Granularity Advantage Integration (Alg. 1 lines 20–22, Eq. 11). ─────────────────────


def group_advantages(rewards, eps=1e-8):
    """(r − mean) / (std + eps) along the last (group) dim, unbiased std; equal rewards give 0.

    >>> group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]))
    tensor([ 0.8660, -0.8660, -0.8660,  0.8660])
    """
    if rewards.shape[-1] < 2:
        raise ValueError(f"a group needs >= 2 rewards, got group dim {rewards.shape[-1]}")
    rewards = rewards.float()
    if not torch.isfinite(rewards).all():
        bad = rewards[~torch.isfinite(rewards)][:4].tolist()
        raise ValueError(f"rewards must be finite, got {bad}")
    mean = rewards.mean(dim=-1, keepdim=True)
    std = rewards.std(dim=-1, keepdim=True)  # unbiased, as torch.std and the official code
    adv = (rewards - mean) / (std + eps)
    # Differs from the official code: equal float32 rewards give a mean off by one ulp and std 0
    # there, so (r − mean)/(std + 1e-8) can reach about ±6; equal rewards carry no preference.
    tied = (rewards == rewards[..., :1]).all(dim=-1, keepdim=True)
    return torch.where(tied, torch.zeros_like(adv), adv)


def multi_granularity_advantages(rewards, adv_clip=5.0, eps=1e-8, scale=1.0,
                                 num_granularities=None):
    """rewards (..., L, G) → the sum over L of the group advantages (Eq. 11), clipped → (..., G).

    L runs over granularities (and over reward models R in the multi-reward setting: L·R rows).
    num_granularities: L, when known; a (..., G, L) mix-up is then refused. scale multiplies the
    sum before the clip (1 in the paper; Config.adv_scale, a control).
    >>> multi_granularity_advantages(torch.tensor([[0.0, 1.0], [0.0, 2.0]]))
    tensor([-1.4142,  1.4142])
    """
    if rewards.dim() < 2:
        raise ValueError(f"rewards must be (..., L, G), got shape {tuple(rewards.shape)}")
    if num_granularities is not None and rewards.shape[-2] != num_granularities:
        raise ValueError(f"rewards must be (..., L, G): the {num_granularities} granularities on "
                         f"dim -2, the group on dim -1; got shape {tuple(rewards.shape)}")
    adv = group_advantages(rewards, eps).sum(dim=-2)  # Eq. 11: A_mix = Σ_λ A_λ   (..., G)
    return (scale * adv).clamp(-adv_clip, adv_clip)


# ── 1.4 The clipped objective and one policy update (Alg. 1 lines 24–26). ─────────────────────────


def clipped_grpo_loss(log_prob, old_log_prob, advantages, clip_range):
    """Loss = −mean( min(r·A, clip(r, 1 − ε, 1 + ε)·A) ), r = exp(log π − log π_old): the clipped
    GRPO objective, with G²RPO's summed advantage as A.

    Returns (loss, stats) with stats: clip_frac = mean(|r − 1| > ε), approx_kl = ½·mean(Δ log π²),
    ratio_max_dev = max |r − 1|.
    """
    if not clip_range > 0:
        raise ValueError(f"clip_range must be > 0, got {clip_range!r}")
    log_ratio = log_prob - old_log_prob.detach()
    ratio = torch.exp(log_ratio)
    adv = advantages.detach()
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1 - clip_range, 1 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    with torch.no_grad():
        stats = {"clip_frac": ((ratio - 1).abs() > clip_range).float().mean().item(),
                 "approx_kl": (0.5 * log_ratio**2).mean().item(),
                 "ratio_max_dev": (ratio - 1).abs().max().item()}
    return loss, stats


def group_update(velocity, optimizer, group, adv, sigmas, branch_steps, eta, clip_range,
                 max_grad_norm=1.0, step_per_branch=True, sde_kind="flow_grpo"):
    """The clipped objective on one group's rollout and the update (Alg. 1 lines 24–26).

    velocity(x, sigma) → v, with gradient; group: group_rollout's output; adv (K, G).
    step_per_branch: one optimizer step per branch step k (the official HPS script), else one
    for the loss averaged over k (the paper's Alg. 1: then every ratio is exactly 1).
    Returns one stats dict per k: loss, clip_frac, approx_kl, ratio_max_dev.
    """
    params = [p for param_group in optimizer.param_groups for p in param_group["params"]]
    K, G = adv.shape
    stats = []
    for j, k in enumerate(branch_steps):
        x_k = group["x"][j][None]  # (1, *D): the model is evaluated once for all G members
        v = velocity(x_k, sigmas[k].view(1)).expand(G, *x_k.shape[1:])  # (G, *D)
        _, log_prob, _, _ = sde_step(x_k.expand_as(v), v, sigmas[k], sigmas[k + 1], eta,
                                     prev_sample=group["x_next"][j], kind=sde_kind)  # (G,)
        loss, s = clipped_grpo_loss(log_prob, group["old_log_prob"][j], adv[j], clip_range)
        (loss if step_per_branch else loss / K).backward()
        if step_per_branch or j == K - 1:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        stats.append({"loss": loss.item(), **s})
    return stats


# ── Part 2. The Config: defaults are the official FLUX recipe (bcmi/Granular-GRPO, HPS script) ──


@dataclass
class Config:
    """Everything the trainer needs to know; defaults reproduce the official FLUX.1-dev run."""

    num_steps: int = 16
    """T, sampling steps from σ = 1 to σ = 0."""
    shift: float = 3.0
    """Static time shift of the σ grid (sigma_schedule). 1.0 is the plain linear grid."""
    eta: float = 0.7
    """η, the SDE noise level in σ_t = η·sqrt(σ / (1 − σ)); with sde_kind "cps", the angle η·π/2
    whose sine is the step's std as a fraction of σ' (in (0, 1]; flow_grpo samples CPS at 0.8)."""
    sde_kind: str = "flow_grpo"
    """The SDE step (sde_step's kind): "flow_grpo", the paper's Eqs. 2–3, or "cps",
    Coefficients-Preserving Sampling (arXiv 2509.05952; not in the paper)."""
    branch_steps: tuple = (0, 1, 2, 3, 4, 5, 6, 7)
    """M, the grid indices k where a branch takes its one SDE step (official: 8 noisiest of 16)."""
    group_size: int = 12
    """G, members per prompt; all share one initial noise."""
    granularities: tuple = (1, 2, 3)
    """Λ, ODE strides used to finish a branch; (1,) is "G²RPO w/o MGAI"."""
    clip_range: float = 1e-4
    """ε of the clipped ratio. 1e-4 fits FLUX (log-prob averaged over ~1e5 latent elements)."""
    adv_clip: float = 5.0
    """Summed advantages are clipped to [−adv_clip, adv_clip]."""
    adv_scale: float = 1.0
    """Advantages are multiplied by this before the clip (1: the paper). A control, not part of
    the recipe: MGAI sums |Λ| group advantages that mostly agree, about |Λ| times one; G²RPO w/o
    MGAI with adv_scale = |Λ| has that scale without the other granularities."""
    lr: float = 2e-6
    """AdamW learning rate (used only when the trainer builds the optimizer)."""
    weight_decay: float = 1e-4
    """AdamW weight decay (used only when the trainer builds the optimizer)."""
    max_grad_norm: float = 1.0
    """Gradient-norm clip before every optimizer step (> 0: a negative one reverses updates)."""
    step_per_branch: bool = True
    """True: one optimizer step per branch step k (official HPS script; the clip acts).
    False: one step per iteration, loss averaged over k (paper Alg. 1; ratio is exactly 1)."""
    method: str = "g2rpo"
    """"g2rpo" (singular sampling + MGAI), "full_sde" (SDE at every step of M, terminal reward
    broadcast to every step: the DanceGRPO / Flow-GRPO baseline) or "mixgrpo" (SDE only in a
    window of consecutive steps that slides as training goes on, ODE elsewhere, terminal reward
    broadcast to the window's steps: the MixGRPO baseline; M is not used)."""
    window_size: int = 3
    """MixGRPO: w, the SDE window's width in steps. MixGRPO's script: 4 of 25 steps, rescaled
    to T = 16: 3."""
    window_stride: int = 1
    """MixGRPO: steps the window moves each time it moves (MixGRPO's script: prog_overlap_step
    1, overlapping windows)."""
    window_every: int = 39
    """MixGRPO: iterations between two moves of the window. MixGRPO's script moves its 4-step
    window every 25 of 300 iterations: 12 positions, through the first 15 of its 25 steps
    (60 %); every 39 of 300 takes this 3-step window through the first 10 of T = 16 (62 %).
    Rescale it with num_iterations (the toy: 13 of 100)."""
    kl_beta: float = 0.0
    """β of the KL penalty to a reference policy, added to the loss of every trained step (an
    addition: neither the paper nor the official code has it). 0: off, the reference is never
    called. > 0 needs train(..., ref_velocity_fn=...)."""
    ema_decay: float = 0.0
    """d of an exponential moving average of the trainable weights, updated after every
    optimizer step: θ_ema ← d·θ_ema + (1 − d)·θ (an addition, as kl_beta). 0: off. > 0 needs
    train(..., ema=EMA(model, d)), the handle to evaluate or export with."""
    prompts_per_iteration: int = 1
    """P, prompts sampled (with replacement) per iteration (official: 1 per GPU)."""
    num_iterations: int = 300
    """Outer iterations (official: ~300)."""
    batch_size: int = 1024
    """Largest number of rows in one model call or reward call during sampling (memory knob)."""
    seed: int = 0
    """Seeds the trainer's generator (prompt choice, initial noise, SDE noise)."""

    def __post_init__(self):
        check_config(self)


METHODS = ("g2rpo", "full_sde", "mixgrpo")
SDE_KINDS = ("flow_grpo", "cps")  # sde_step's kinds
# The Config fields each method does not use: they are not checked against the grid for it,
# and a command line refuses a flag given for one of them.
UNUSED_FIELDS = {"g2rpo": ("window_size", "window_stride", "window_every"),
                 "full_sde": ("granularities", "window_size", "window_stride", "window_every"),
                 "mixgrpo": ("branch_steps", "granularities")}


# ── Part 3. Batched machinery: Part 1 for P prompts, all branches and granularities at once ──────


def take_rows(cond, index):
    """Select rows `index` (N,) of every tensor in cond (a tensor, or a tuple/list/dict of them)."""
    if torch.is_tensor(cond):
        return cond.index_select(0, index.to(cond.device))
    if isinstance(cond, (tuple, list)):
        return type(cond)(take_rows(c, index) for c in cond)
    if isinstance(cond, dict):
        return {key: take_rows(c, index) for key, c in cond.items()}
    raise TypeError(f"cond must be a tensor or a tuple/list/dict of tensors, got {type(cond)}")


def check_velocity(v, x, sigma):
    """velocity_fn must return a finite tensor of x's shape; blame it by name otherwise."""
    if not torch.is_tensor(v) or v.shape != x.shape:
        got = tuple(v.shape) if torch.is_tensor(v) else type(v).__name__
        raise ValueError(f"velocity_fn returned {got} for x of shape {tuple(x.shape)}; it must "
                         f"return v with x's shape")
    if not torch.isfinite(v).all():
        raise FloatingPointError(f"velocity_fn returned non-finite values at sigma "
                                 f"{torch.as_tensor(sigma).flatten()[:4].tolist()}")
    return v


class CountingVelocity:
    """Wraps velocity_fn: splits calls into chunks of batch_size rows and counts evaluated rows."""

    def __init__(self, velocity_fn, batch_size):
        self.velocity_fn, self.batch_size, self.evals = velocity_fn, batch_size, 0

    def __call__(self, x, sigma, cond, prompt_index):
        """x (N, *D), sigma (N,), prompt_index (N,) rows of cond → v (N, *D)."""
        out = []
        for i in range(0, x.shape[0], self.batch_size):
            j = slice(i, i + self.batch_size)
            v = self.velocity_fn(x[j], sigma[j], take_rows(cond, prompt_index[j]))
            out.append(check_velocity(v, x[j], sigma[j]))
        self.evals += x.shape[0]
        return torch.cat(out)


def _ode_completions(velocity, cond, starts, prompt_index, schedules, sigmas):
    """Finish many branches with the ODE, batched, evaluating each shared state once.

    starts: {k: (N, *D) samples at grid index k+1}; schedules: {(k, λ): index list};
    prompt_index: (N,). All tracks advance one step per round in ONE model call; tracks whose paths
    coincide so far (every λ goes k+1 → k+2 first) share the state and its evaluation.
    Returns {(k, λ): (N, *D) samples at σ = 0}.
    """
    state = {(k, (sched[0],)): starts[k] for (k, _), sched in schedules.items()}
    for r in range(max(len(s) for s in schedules.values()) - 1):
        nodes = []  # unique (k, path) still to be stepped this round
        for (k, _), sched in schedules.items():
            node = (k, tuple(sched[: r + 1]))
            if r < len(sched) - 1 and node not in nodes:
                nodes.append(node)
        x = torch.cat([state[n] for n in nodes])  # (len(nodes)·N, *D)
        sigma = torch.cat([sigmas[n[1][-1]].expand(len(prompt_index)) for n in nodes])
        v = velocity(x, sigma, cond, prompt_index.repeat(len(nodes)))
        for n, x_n, v_n in zip(nodes, x.chunk(len(nodes)), v.chunk(len(nodes))):
            for (k, _), sched in schedules.items():
                if k == n[0] and tuple(sched[: r + 1]) == n[1] and r < len(sched) - 1:
                    nxt = (k, tuple(sched[: r + 2]))
                    if nxt not in state:
                        state[nxt] = ode_step(x_n, v_n, sigmas[sched[r]], sigmas[sched[r + 1]])
            del state[n]  # stepped: no track needs it again (paths ending at T are never stepped)
    return {key: state[(key[0], tuple(sched))] for key, sched in schedules.items()}


@torch.no_grad()
def singular_stochastic_sampling(velocity, cond, x_T, sigmas, branch_steps, granularities,
                                 group_size, eta, generator=None, sde_kind="flow_grpo"):
    """group_rollout for P prompts at once (Alg. 1 lines 7–16), in few model calls.

    velocity: a CountingVelocity; x_T: (P, *D), one shared initial noise per prompt.
    Returns a dict with
      x (K, P, 1, *D) anchor states x_k; x_next (K, P, G, *D) branch samples at σ_{k+1};
      old_log_prob (K, P, G); samples (K, L, P, G, *D) final samples per granularity;
      anchor (P, *D) the anchor's final sample.
    """
    P, D, G, T = x_T.shape[0], x_T.shape[1:], group_size, len(sigmas) - 1
    rows = torch.arange(P, device=x_T.device)
    # Alg. 1 lines 9–11: deterministic anchor, keeping every state and velocity.
    xs, vs, x = [x_T], [], x_T
    for i in range(T):
        v = velocity(x, sigmas[i].expand(P), cond, rows)
        x = ode_step(x, v, sigmas[i], sigmas[i + 1])
        xs.append(x)
        vs.append(v)
    ks = list(branch_steps)
    K = len(ks)
    # Alg. 1 lines 12–13: one SDE step from x_k per member; v(x_k) comes from the anchor.
    x_k = torch.stack([xs[k] for k in ks])  # (K, P, *D)
    v_k = torch.stack([vs[k] for k in ks])  # (K, P, *D)
    expand = lambda t: t.unsqueeze(2).expand(K, P, G, *D).reshape(K * P * G, *D)
    s = sigmas[ks].repeat_interleave(P * G)  # (K·P·G,)
    s_next = sigmas[[k + 1 for k in ks]].repeat_interleave(P * G)
    x_next, log_prob, _, _ = sde_step(expand(x_k), expand(v_k), s, s_next, eta, generator,
                                      kind=sde_kind)
    x_next = x_next.view(K, P, G, *D)
    # Alg. 1 lines 14–16: finish every branch at every granularity.
    schedules = {(k, lam): granularity_schedule(T, k, lam) for k in ks for lam in granularities}
    member_rows = rows.repeat_interleave(G)  # (P·G,)
    starts = {k: x_next[j].reshape(P * G, *D) for j, k in enumerate(ks)}
    finals = _ode_completions(velocity, cond, starts, member_rows, schedules, sigmas)
    samples = torch.stack([torch.stack([finals[(k, lam)] for lam in granularities]) for k in ks])
    return {
        "x": x_k.unsqueeze(2),
        "x_next": x_next,
        "old_log_prob": log_prob.view(K, P, G),
        "samples": samples.view(K, len(granularities), P, G, *D),
        "anchor": xs[-1],
    }


def count_model_evals(num_steps, branch_steps, granularities, group_size, method="g2rpo"):
    """Model evaluations (rows) per prompt in one rollout, from the schedules alone.

    g2rpo: T for the anchor (its states also give v at every x_k), plus per member the distinct
    states visited by the ODE completions (all λ share the evaluations at k+1 and k+2).
    full_sde, mixgrpo: T per member (SDE or ODE, every step is one evaluation).
    """
    if method in ("full_sde", "mixgrpo"):
        return num_steps * group_size
    per_member = 0
    for k in branch_steps:
        nodes = set()
        for lam in granularities:
            sched = granularity_schedule(num_steps, k, lam)
            nodes.update(tuple(sched[: j + 1]) for j in range(len(sched) - 1))
        per_member += len(nodes)
    return num_steps + group_size * per_member


def score(reward_fn, samples, prompts, batch_size):
    """Call reward_fn(samples (n, *D), prompts (list of n)) in chunks; check shape and finiteness.

    Returns (N, R) float32 (R reward models; a (N,) reward gives R = 1).
    """
    if not torch.isfinite(samples).all():
        raise FloatingPointError("the samples to be scored hold non-finite values although "
                                 "velocity_fn's outputs were finite: check eta and the sigma grid")
    out = []
    for i in range(0, samples.shape[0], batch_size):
        x, p = samples[i : i + batch_size], prompts[i : i + batch_size]
        r = torch.as_tensor(reward_fn(x, p)).float()
        if r.dim() == 1:
            r = r[:, None]
        if r.dim() != 2 or r.shape[0] != x.shape[0] or r.shape[1] < 1:
            raise ValueError(f"reward_fn must return shape ({x.shape[0]},) or ({x.shape[0]}, R) "
                             f"for {x.shape[0]} samples, got {tuple(r.shape)}")
        if not torch.isfinite(r).all():
            bad = r[~torch.isfinite(r)][:4].tolist()
            raise ValueError(f"reward_fn returned non-finite rewards {bad} (samples {i}..); "
                             f"refusing to train on them")
        out.append(r.to(samples.device))
    return torch.cat(out)


def policy_log_prob(velocity_fn, cond, x, x_next, sigma, sigma_next, eta, sde_kind="flow_grpo"):
    """log π_θ(x_next | x) with gradient: x (P, S, *D), S = 1 (shared) or G; x_next (P, G, *D).

    The model is evaluated on the P·S distinct states only (once per prompt for G²RPO).
    cond holds P rows. Returns (P, G).
    """
    return policy_log_prob_and_kl(velocity_fn, cond, x, x_next, sigma, sigma_next, eta,
                                  sde_kind=sde_kind)[0]


def policy_log_prob_and_kl(velocity_fn, cond, x, x_next, sigma, sigma_next, eta,
                           ref_velocity_fn=None, sde_kind="flow_grpo"):
    """policy_log_prob, and with ref_velocity_fn (evaluated without gradient) the KL divergence
    of the policy's SDE step from the reference's at each of the P·S states (gaussian_kl: the
    same x and std, means from v_θ and v_ref). Returns (log π (P, G), KL (P, S) or None)."""
    P, S, G, D = x.shape[0], x.shape[1], x_next.shape[1], x.shape[2:]
    rows = torch.arange(P, device=x.device).repeat_interleave(S)
    x_flat, cond_rows, s = x.flatten(0, 1), take_rows(cond, rows), sigma.expand(P * S)
    v = check_velocity(velocity_fn(x_flat, s, cond_rows), x_flat, sigma)  # (P·S, *D)
    _, log_prob, _, _ = sde_step(
        x.expand(P, G, *D).reshape(P * G, *D), v.view(P, S, *D).expand(P, G, *D).reshape(P * G, *D),
        sigma, sigma_next, eta, prev_sample=x_next.reshape(P * G, *D), kind=sde_kind)
    if ref_velocity_fn is None:
        return log_prob.view(P, G), None
    with torch.no_grad():
        v_ref = check_velocity(ref_velocity_fn(x_flat, s, cond_rows), x_flat, sigma)
        _, _, ref_mean, _ = sde_step(x_flat, v_ref, sigma, sigma_next, eta, prev_sample=x_flat,
                                     kind=sde_kind)
    _, _, mean, std = sde_step(x_flat, v, sigma, sigma_next, eta, prev_sample=x_flat,
                               kind=sde_kind)
    return log_prob.view(P, G), gaussian_kl(mean, ref_mean, std).view(P, S)


# ── Part 4. The trainer: rollout, policy update, the outer loop. ──────────────────────────────────


def all_finite(tensors):
    """True when every tensor (DTensors: this process's shard) is finite; one sync per device."""
    by_device = {}
    for t in tensors:
        t = t.to_local() if hasattr(t, "to_local") else t
        if t.is_floating_point():
            by_device.setdefault(t.device, []).append(torch.isfinite(t).all())
    return all(bool(torch.stack(flags).all()) for flags in by_device.values())


def optimizer_state_tensors(optimizer):
    return [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)]


def _clip_and_step(params, optimizer, max_grad_norm, where, ema=None):
    """Clip, then step only from finite gradients and finite optimizer state; check the result;
    then move the EMA, if any."""
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    if not torch.isfinite(grad_norm):
        optimizer.zero_grad(set_to_none=True)
        raise FloatingPointError(f"non-finite gradient norm {grad_norm.item()} at {where}; "
                                 f"the optimizer step was skipped and the weights are unchanged")
    if not all_finite(optimizer_state_tensors(optimizer)):
        optimizer.zero_grad(set_to_none=True)
        raise FloatingPointError(f"the optimizer state holds non-finite values at {where}; the "
                                 f"step was skipped and the weights are unchanged")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if not all_finite(params):  # finite inputs cannot get here; a custom optimizer might
        raise FloatingPointError(f"the optimizer step at {where} produced non-finite weights")
    if ema is not None:
        ema.update()
    return grad_norm.item()


def policy_update(params, optimizer, velocity_fn, rollout, sigmas, cfg, ref_velocity_fn=None,
                  ema=None):
    """group_update for P prompts (Alg. 1 lines 24–26): one optimizer step per trained step k
    (the branch steps; MixGRPO: the window's steps), or one for all of them. With cfg.kl_beta > 0
    each step's loss gains β·KL(π_θ ‖ π_ref) at the trained states (averaged over rows), and
    `kl_ref` is its mean over the steps. The EMA, if any, moves after every optimizer step."""
    ks = list(rollout["steps"])
    stats = {"loss": [], "clip_frac": [], "approx_kl": [], "grad_norm": [], "train_rows": 0}
    reference = ref_velocity_fn if cfg.kl_beta > 0 else None  # β = 0: never called
    if reference is not None:
        stats["kl_ref"] = []
    optimizer.zero_grad(set_to_none=True)
    for j, k in enumerate(ks):
        log_prob, kl = policy_log_prob_and_kl(velocity_fn, rollout["cond"], rollout["x"][j],
                                              rollout["x_next"][j], sigmas[k], sigmas[k + 1],
                                              cfg.eta, reference, cfg.sde_kind)
        loss, s = clipped_grpo_loss(log_prob, rollout["old_log_prob"][j], rollout["adv"][j],
                                    cfg.clip_range)
        if kl is not None:  # an addition to the clipped objective (Config.kl_beta)
            kl = kl.mean()
            loss = loss + cfg.kl_beta * kl
            stats["kl_ref"].append(kl.item())
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {loss.item()} at branch step {k}; "
                                     f"no optimizer step was taken")
        if j == 0:
            stats["ratio_dev_first"] = s["ratio_max_dev"]  # must be ~0: same weights made x'
        for name in ("clip_frac", "approx_kl"):
            stats[name].append(s[name])
        stats["train_rows"] += rollout["x"][j].shape[0] * rollout["x"][j].shape[1]  # P·S rows
        stats["loss"].append(loss.item())
        if cfg.step_per_branch:
            loss.backward()
            stats["grad_norm"].append(_clip_and_step(params, optimizer, cfg.max_grad_norm,
                                                     f"branch step {k}", ema))
        else:
            (loss / len(ks)).backward()
    if not cfg.step_per_branch:
        stats["grad_norm"].append(_clip_and_step(params, optimizer, cfg.max_grad_norm,
                                                 "the iteration's update", ema))
    return {name: (sum(v) / len(v) if isinstance(v, list) else v) for name, v in stats.items()}


def rollout(velocity_fn, reward_fn, prompts, cond, cfg, sigmas, latent_shape, generator,
            iteration=0):
    """Sample one iteration's groups and turn rewards into per-step advantages (K, P, G).

    prompts: list of P prompts (passed to reward_fn); cond: P rows for velocity_fn.
    iteration: places MixGRPO's window (the other methods do not use it).
    Returns (out, metrics); out["steps"] are the K steps that are trained.
    """
    P, G, ks = len(prompts), cfg.group_size, list(cfg.branch_steps)
    device = sigmas.device
    velocity = CountingVelocity(velocity_fn, cfg.batch_size)
    x_T = torch.randn((P, *latent_shape), generator=generator, device=device)  # shared by G
    member_prompts = [p for p in prompts for _ in range(G)]
    if cfg.method == "g2rpo":
        out = singular_stochastic_sampling(velocity, cond, x_T, sigmas, ks, cfg.granularities,
                                           G, cfg.eta, generator, cfg.sde_kind)
        K, L = len(ks), len(cfg.granularities)
        r = score(reward_fn, out["samples"].flatten(0, 3), member_prompts * (K * L),
                  cfg.batch_size)  # (K·L·P·G, R)
        R = r.shape[1]
        rewards = r.view(K, L, P, G, R).permute(0, 2, 1, 4, 3)  # (K, P, L, R, G)
        adv = multi_granularity_advantages(rewards.reshape(K, P, L * R, G), cfg.adv_clip,
                                           scale=cfg.adv_scale)
        per_lam = group_advantages(rewards).abs().mean(dim=(1, 3, 4))  # (K, L)
        anchor_r = score(reward_fn, out["anchor"], list(prompts), cfg.batch_size).sum(1)
        metrics = {"reward": rewards[:, :, 0].sum(2).mean().item(),  # λ = 1 completions
                   "reward_std": rewards[:, :, 0].sum(2).std().item(),
                   "reward_anchor": anchor_r.mean().item(),
                   "adv_abs_lambda": per_lam.mean(0).tolist()}
    else:
        if cfg.method == "mixgrpo":  # SDE inside the window, ODE elsewhere
            ks = list(mixgrpo_window(iteration, len(sigmas) - 1, cfg.window_size,
                                     cfg.window_stride, cfg.window_every))
        out = full_sde_sampling(velocity, cond, x_T, sigmas, ks, G, cfg.eta, generator,
                                cfg.sde_kind)
        r = score(reward_fn, out["samples"].flatten(0, 1), member_prompts, cfg.batch_size)
        rewards = r.view(P, G, -1).transpose(1, 2)  # (P, R, G)
        adv = multi_granularity_advantages(rewards, cfg.adv_clip, scale=cfg.adv_scale)
        adv = adv.expand(len(ks), P, G)
        metrics = {"reward": rewards.sum(1).mean().item(),
                   "reward_std": rewards.sum(1).std().item()}
    zero_std = (rewards == rewards[..., :1]).all(dim=-1).float().mean().item()
    metrics.update(zero_std_frac=zero_std, adv_abs_k=adv.abs().mean(dim=(1, 2)).tolist(),
                   adv_clipped=(adv.abs() >= cfg.adv_clip).float().mean().item(),  # clamped
                   nfe=velocity.evals)
    if cfg.method == "mixgrpo":
        metrics["window"] = ks
    out.update(cond=cond, adv=adv, rewards=rewards, steps=ks)
    return out, metrics


def train_iteration(params, optimizer, velocity_fn, reward_fn, prompts, cond, cfg, sigmas,
                    latent_shape, generator, iteration=0, ref_velocity_fn=None, ema=None):
    """One G²RPO iteration: sample groups (no grad), then the clipped policy update."""
    out, metrics = rollout(velocity_fn, reward_fn, prompts, cond, cfg, sigmas, latent_shape,
                           generator, iteration)
    metrics.update(policy_update(params, optimizer, velocity_fn, out, sigmas, cfg,
                                 ref_velocity_fn, ema))
    return metrics


def format_metrics(it, m):
    """One log line per iteration (glossary: docs/algorithm.md, Metrics)."""
    line = (f"it {it:4d} | reward {m['reward']:.4f} ± {m['reward_std']:.4f}"
            + (f" | anchor {m['reward_anchor']:.4f}" if "reward_anchor" in m else "")
            + f" | loss {m['loss']:+.2e} | grad {m['grad_norm']:.3f}"
            f" | clip {m['clip_frac']:.3f} | kl {m['approx_kl']:.2e}"
            + (f" | kl_ref {m['kl_ref']:.2e}" if "kl_ref" in m else "")
            + f" | zero-std {m['zero_std_frac']:.2f} | A clipped {m['adv_clipped']:.3f} | |A|_k "
            + " ".join(f"{a:.2f}" for a in m["adv_abs_k"]))
    if "adv_abs_lambda" in m:
        line += " | |A|_λ " + " ".join(f"{a:.2f}" for a in m["adv_abs_lambda"])
    return line + f" | nfe {m['nfe']}" + (f" | {m['seconds']:.2f} s/it" if "seconds" in m else "")


def train(model, velocity_fn, reward_fn, prompts, cfg, latent_shape, encode_prompts=None,
          optimizer=None, generator=None, start_iteration=0, callback=None, log=print,
          progress=True, sigmas=None, ref_velocity_fn=None, ema=None):
    """G²RPO training loop (Alg. 1's outer loop), model-agnostic.

    model: the nn.Module whose trainable parameters are optimised (velocity_fn closes over it).
    velocity_fn(x (N, *D), sigma (N,), cond rows) → v; reward_fn(samples, prompts) → (N,) or (N, R).
    prompts: a sequence; each iteration draws cfg.prompts_per_iteration of them with replacement.
    encode_prompts(list) → cond with one row per prompt (default: torch.as_tensor); called
    without gradient (a text encoder is not trained: its output is data for the policy).
    optimizer: built over the trainable parameters (default: AdamW with cfg.lr, weight_decay);
    the trainer clips and checks exactly the parameters it holds.
    callback(iteration, metrics) runs after every iteration, before the log line (evaluation,
    checkpoints; it may update metrics in place); a true return value stops training after it.
    sigmas: an explicit (T+1,) grid from 1 to 0 (e.g. a pipeline's dynamic shift); default
    sigma_schedule(cfg.num_steps, cfg.shift).
    ref_velocity_fn: the reference policy's velocity (velocity_fn's signature; called without
    gradient, and only when cfg.kl_beta > 0), e.g. a frozen copy of the pretrained model.
    ema: an EMA(model, cfg.ema_decay) to update after every optimizer step (cfg.ema_decay > 0).
    Returns the list of per-iteration metrics dicts.
    """
    check_config(cfg)  # again: a Config can be changed after it was built
    if len(prompts) == 0:
        raise ValueError("prompts is empty: the trainer needs at least one prompt")
    # The optimizer's parameters when there is one: they were taken before any forward. A
    # sharding wrapper may swap other tensors into model.parameters() between forward and
    # backward (FSDP2 after a forward without gradient, e.g. an evaluation before training).
    params = ([p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
              if optimizer is not None else [p for p in model.parameters() if p.requires_grad])
    if not params:
        raise ValueError("the model has no trainable parameters (requires_grad=True)")
    check_guard_rails(cfg, params, ref_velocity_fn, ema)
    device = params[0].device
    if optimizer is None:
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if generator is None:
        generator = torch.Generator(device).manual_seed(cfg.seed)
    encode_prompts = encode_prompts or (lambda ps: torch.as_tensor(ps, device=device))
    if sigmas is None:
        sigmas = sigma_schedule(cfg.num_steps, cfg.shift)
    sigmas = torch.as_tensor(sigmas, dtype=torch.float32).to(device)
    if (sigmas.shape != (cfg.num_steps + 1,) or sigmas[0] != 1 or sigmas[-1] != 0
            or not (sigmas[1:] < sigmas[:-1]).all()):
        raise ValueError(f"sigmas must decrease from 1 to 0 in {cfg.num_steps + 1} values, got "
                         f"{[round(s, 4) for s in sigmas.tolist()]}")
    iterations = range(start_iteration, cfg.num_iterations)
    bar = None
    if progress:
        try:
            from tqdm.auto import tqdm
            iterations = bar = tqdm(iterations, desc=f"{cfg.method}", dynamic_ncols=True)
            log = bar.write if log is print else log
        except ImportError:
            pass
    history = []
    for it in iterations:
        pick = torch.randint(len(prompts), (cfg.prompts_per_iteration,), generator=generator,
                             device=generator.device).tolist()
        batch = [prompts[i] for i in pick]
        start = time.perf_counter()
        with torch.no_grad():  # the conditioning is data for the policy: no graph to a text encoder
            cond = encode_prompts(batch)
        metrics = train_iteration(params, optimizer, velocity_fn, reward_fn, batch, cond, cfg,
                                  sigmas, latent_shape, generator, it, ref_velocity_fn, ema)
        metrics.update(iteration=it, seconds=time.perf_counter() - start)
        history.append(metrics)
        stop = False
        if callback is not None:
            stop = callback(it, metrics)  # may update metrics in place (e.g. over processes)
        if log is not None:
            log(format_metrics(it, metrics))
        if bar is not None:
            bar.set_postfix(reward=f"{metrics['reward']:.3f}")
        if stop:
            break
    return history


# ── Part 5. The baselines: full-SDE GRPO and MixGRPO's sliding window. ────────────────────────────


@torch.no_grad()
def full_sde_sampling(velocity, cond, x_T, sigmas, sde_steps, group_size, eta, generator=None,
                      sde_kind="flow_grpo"):
    """Baseline: every member follows its own trajectory with an SDE step at every k in sde_steps.

    Returns x (K, P, G, *D), x_next (K, P, G, *D), old_log_prob (K, P, G), samples (P, G, *D).
    """
    P, D, G, T = x_T.shape[0], x_T.shape[1:], group_size, len(sigmas) - 1
    member_rows = torch.arange(P, device=x_T.device).repeat_interleave(G)
    x = x_T.repeat_interleave(G, dim=0)  # (P·G, *D)
    steps = {}  # i → (x_i, x_{i+1}, log π_old), for i in sde_steps
    for i in range(T):
        v = velocity(x, sigmas[i].expand(P * G), cond, member_rows)
        if i in sde_steps:
            x_new, lp, _, _ = sde_step(x, v, sigmas[i], sigmas[i + 1], eta, generator,
                                       kind=sde_kind)
            steps[i] = (x, x_new, lp)
            x = x_new
        else:
            x = ode_step(x, v, sigmas[i], sigmas[i + 1])
    K = len(sde_steps)
    stack = lambda j: torch.stack([steps[k][j] for k in sde_steps])  # in the order of sde_steps
    return {
        "x": stack(0).view(K, P, G, *D),
        "x_next": stack(1).view(K, P, G, *D),
        "old_log_prob": stack(2).view(K, P, G),
        "samples": x.view(P, G, *D),
    }


def mixgrpo_window(iteration, num_steps, window_size, window_stride=1, window_every=25):
    """MixGRPO's sliding window: the steps that take an SDE step (and are trained) at `iteration`.

    The window starts at step 0, moves by window_stride every window_every iterations, and rolls
    back to 0 once it would leave steps 0..T−3 (MixGRPO's "progressive" strategy with overlap and
    roll-back; T−2 and T−1 are never trained there either). A function of the iteration alone.

    >>> [mixgrpo_window(it, 8, 3, 1, 2) for it in (0, 1, 2, 5, 6, 8)]
    [(0, 1, 2), (0, 1, 2), (1, 2, 3), (2, 3, 4), (3, 4, 5), (0, 1, 2)]
    """
    last_start = num_steps - 2 - window_size  # the window's last step must be ≤ T − 3
    if last_start < 0:
        raise ValueError(f"window_size {window_size} does not fit T = {num_steps}: a window lies "
                         f"within steps 0..{num_steps - 3}")
    # Differs from MixGRPO: its last windows shrink at the end of the grid; ours stay whole.
    positions = last_start // window_stride + 1
    start = (iteration // window_every) % positions * window_stride
    return tuple(range(start, start + window_size))


# ── Part 6. Guard rails against reward hacking (additions: not in the paper or official code)


def gaussian_kl(mean, ref_mean, std):
    """KL(N(mean, std²) ‖ N(ref_mean, std²)) per element, averaged over all non-batch elements
    (as gaussian_log_prob) → (N,) float32. With equal stds only ‖mean − ref_mean‖² / (2·std²)
    is left; it is symmetric in the two means.

    >>> gaussian_kl(torch.ones(1, 2), torch.zeros(1, 2), torch.tensor(0.5))
    tensor([2.])
    """
    mean, ref_mean = mean.float(), ref_mean.float()
    std = torch.as_tensor(std, dtype=torch.float32, device=mean.device)
    return ((mean - ref_mean) ** 2 / (2 * std**2)).flatten(1).mean(dim=1)  # (N,)


class EMA:
    """Exponential moving average of a model's trainable weights (Config.ema_decay; an addition).

        ema = EMA(model, cfg.ema_decay)     # starts at the current weights
        train(..., ema=ema)                 # θ_ema ← d·θ_ema + (1 − d)·θ after every step
        with ema.applied():                 # the model holds θ_ema inside, its own θ after
            evaluate(model)

    state_dict() / load_state_dict() hold the averages by parameter name (for checkpoints). Each
    average is a copy of its parameter, in float32 where the parameter's precision is lower
    (in bf16 an update (1 − d)·(θ − θ_ema) with d = 0.99 falls below the resolution of θ_ema,
    and the average would stall); under FSDP2, a DTensor of the same shards.
    """

    def __init__(self, model, decay):
        if isinstance(decay, bool) or not isinstance(decay, numbers.Real) or not 0 < decay < 1:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay!r}")
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("the model has no trainable parameters (requires_grad=True)")
        self.decay, self.names = float(decay), [n for n, _ in named]
        self.params = [p for _, p in named]
        self.averages = [p.detach().to(torch.promote_types(p.dtype, torch.float32), copy=True)
                         for p in self.params]
        self.in_use = False

    @torch.no_grad()
    def update(self):
        for a, p in zip(self.averages, self.params):
            a.mul_(self.decay).add_(p.detach(), alpha=1 - self.decay)

    @torch.no_grad()
    def _exchange(self, kept, into_model):
        for a, p, own in zip(self.averages, self.params, kept):
            if own is None:  # same dtype: a swap, one tensor's copy at a time (no extra memory)
                tmp = p.detach().clone()
                p.copy_(a)
                a.copy_(tmp)
            else:  # lower precision: the rounded average in, the parameter's own value back
                p.copy_(a if into_model else own)

    @contextlib.contextmanager
    def applied(self):
        """The averaged weights in the model for the block (evaluation, export), bit for bit
        its own weights again after it, even on an error; the averages are unchanged."""
        if self.in_use:
            raise RuntimeError("EMA.applied() is already active")
        kept = [None if a.dtype == p.dtype else p.detach().clone()
                for a, p in zip(self.averages, self.params)]
        self._exchange(kept, into_model=True)
        self.in_use = True
        try:
            yield self
        finally:
            self._exchange(kept, into_model=False)
            self.in_use = False

    def state_dict(self):
        """{parameter name: average}; the tensors themselves (a checkpoint loads into them)."""
        if self.in_use:
            raise RuntimeError("EMA.state_dict() inside applied(): the averages are swapped out")
        return dict(zip(self.names, self.averages))

    @torch.no_grad()
    def load_state_dict(self, state):
        missing = sorted(set(self.names) - set(state))
        unexpected = sorted(set(state) - set(self.names))
        if missing or unexpected:
            raise ValueError(f"EMA state does not match the model's trainable parameters: "
                             f"missing {missing[:3]}, unexpected {unexpected[:3]}")
        for name, a in zip(self.names, self.averages):
            if state[name] is not a:
                a.copy_(state[name])


# ── Part 7. Input checks: every Config field, before any rollout. ─────────────────────────────────


ETA_SANE = (0.1, 2.0)  # outside: log-ratios explode (η → 0) or the gradient vanishes (η ≫ 1)


class ConfigError(ValueError):
    """A bad Config value; `field` names it (the command lines map it to their flag)."""

    def __init__(self, field, message):
        super().__init__(message)
        self.field = field


def _is_int(x):
    return isinstance(x, int) and not isinstance(x, bool)


def _number(field, x, kind):
    """x as a Python int / finite float; numpy and 0-d tensor numbers accepted, bools refused."""
    if torch.is_tensor(x) and x.dim() == 0 and x.dtype != torch.bool:
        x = x.item()
    ok = numbers.Integral if kind is int else numbers.Real
    if isinstance(x, bool) or type(x).__name__ == "bool_" or not isinstance(x, ok):
        raise ConfigError(field, f"{field} must be {'an integer' if kind is int else 'a number'}, "
                                 f"got {x!r} ({type(x).__name__})")
    if not math.isfinite(x):
        raise ConfigError(field, f"{field} must be finite, got {x!r}")
    return kind(x)


def check_config(cfg):
    """Check every field of a Config (types, then ranges) and normalise numbers in place:
    numpy / 0-d tensor numbers become int / float, sequences tuples. Raise ConfigError naming
    the field and the value; warn when eta is outside ETA_SANE."""
    for field in ("num_steps", "group_size", "prompts_per_iteration", "num_iterations",
                  "batch_size", "seed", "window_size", "window_stride", "window_every"):
        setattr(cfg, field, _number(field, getattr(cfg, field), int))
    for field in ("shift", "eta", "clip_range", "adv_clip", "adv_scale", "lr", "weight_decay",
                  "max_grad_norm", "kl_beta", "ema_decay"):
        setattr(cfg, field, _number(field, getattr(cfg, field), float))
    for field in ("branch_steps", "granularities"):
        value = getattr(cfg, field)
        if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
            raise ConfigError(field, f"{field} must be a sequence of integers, got {value!r}")
        setattr(cfg, field, tuple(_number(field, v, int) for v in value))
    if not (cfg.step_per_branch is True or cfg.step_per_branch is False):
        raise ConfigError("step_per_branch", f"step_per_branch must be True or False, got "
                                             f"{cfg.step_per_branch!r}")
    lows = {"num_steps": 2, "group_size": 2, "prompts_per_iteration": 1, "batch_size": 1,
            "num_iterations": 0, "seed": 0, "window_size": 1, "window_stride": 1,
            "window_every": 1}
    for field, low in lows.items():
        if getattr(cfg, field) < low:
            why = " (advantages need a group)" if field == "group_size" else ""
            raise ConfigError(field, f"{field} must be an integer >= {low}{why}, "
                                     f"got {getattr(cfg, field)!r}")
    for field in ("shift", "eta", "clip_range", "adv_clip", "adv_scale", "lr", "max_grad_norm"):
        if not getattr(cfg, field) > 0:
            why = " (an SDE step is needed)" if field == "eta" else ""
            raise ConfigError(field, f"{field} must be > 0{why}, got {getattr(cfg, field)!r}")
    for field in ("weight_decay", "kl_beta"):
        if getattr(cfg, field) < 0:
            raise ConfigError(field, f"{field} must be >= 0, got {getattr(cfg, field)!r}")
    if not 0 <= cfg.ema_decay < 1:
        raise ConfigError("ema_decay", f"ema_decay must be in [0, 1) (0: off), got "
                                       f"{cfg.ema_decay!r}")
    if cfg.clip_range >= 1:
        raise ConfigError("clip_range", f"clip_range must be < 1 (the ratio is clipped to "
                                        f"[1 − ε, 1 + ε]), got {cfg.clip_range!r}")
    if cfg.sde_kind not in SDE_KINDS:
        raise ConfigError("sde_kind", f"sde_kind must be one of {', '.join(map(repr, SDE_KINDS))}"
                                      f", got {cfg.sde_kind!r}")
    if cfg.sde_kind == "cps" and cfg.eta > 1:
        raise ConfigError("eta", f"eta must be <= 1 with sde_kind 'cps' (the step's std is "
                                 f"σ'·sin(η·π/2)), got {cfg.eta!r}")
    if cfg.method not in METHODS:
        raise ConfigError("method", f"method must be one of {', '.join(map(repr, METHODS))}, "
                                    f"got {cfg.method!r}")
    if cfg.method == "mixgrpo" and cfg.window_size > cfg.num_steps - 2:
        raise ConfigError("window_size", f"window_size {cfg.window_size} does not fit the grid: a "
                                         f"MixGRPO window lies within steps 0..{cfg.num_steps - 3} "
                                         f"of T = {cfg.num_steps} (at most {cfg.num_steps - 2} "
                                         f"steps)")
    for field, check in (("granularities", lambda: check_granularities(cfg.granularities)),
                         ("branch_steps", lambda: check_branch_steps(cfg.branch_steps,
                                                                     cfg.num_steps))):
        if field in UNUSED_FIELDS[cfg.method]:
            continue  # e.g. MixGRPO's window replaces the branch steps
        try:
            check()
        except ValueError as e:
            raise ConfigError(field, str(e)) from None
    if "granularities" not in UNUSED_FIELDS[cfg.method]:
        # Differs from the official code, which would add one completion's advantage twice.
        repeated = repeated_granularity(cfg.num_steps, cfg.branch_steps, cfg.granularities)
        if repeated is not None:
            k, lam, mu, path = repeated
            keep = distinct_granularities(cfg.num_steps, cfg.branch_steps, cfg.granularities)
            raise ConfigError("granularities", (
                f"granularities {lam} and {mu} finish branch step {k} on the same grid points "
                f"{path} at T = {cfg.num_steps}: one completion counted twice doubles its "
                f"advantage. Those that differ at every branch step "
                f"({', '.join(map(str, cfg.branch_steps))}): {', '.join(map(str, keep))}"))
    if not ETA_SANE[0] <= cfg.eta <= ETA_SANE[1]:
        warnings.warn(f"eta = {cfg.eta} is outside {ETA_SANE}: with a tiny eta the log-ratios "
                      f"explode (kl ~1e13 at 1e-8), with a large one the gradient vanishes",
                      stacklevel=3)


def check_granularities(granularities):
    if len(granularities) == 0:
        raise ValueError("granularities must not be empty")
    for g in granularities:
        if not _is_int(g) or g < 1:
            raise ValueError(f"every granularity must be an integer >= 1, got {g!r}")
    if len(set(granularities)) != len(granularities):
        raise ValueError(f"granularities must be distinct, got {tuple(granularities)!r}")


def repeated_granularity(num_steps, branch_steps, granularities):
    """(k, λ, μ, grid points): the first branch step k at which granularities λ < μ complete on
    the same grid points (near the end of the grid every stride gives the same few steps), or
    None when every granularity's completion differs from every other's at every branch step."""
    for k in branch_steps:
        seen = {}
        for lam in sorted(granularities):
            path = granularity_schedule(num_steps, k, lam)
            if tuple(path) in seen:
                return k, seen[tuple(path)], lam, path
            seen[tuple(path)] = lam
    return None


def distinct_granularities(num_steps, branch_steps, granularities):
    """The granularities, in order, without those that repeat an earlier one's completion at
    some branch step: at T = 4 with branch steps 0, 1, (1, 2, 3) → (1,)."""
    kept = []
    for lam in granularities:
        if repeated_granularity(num_steps, branch_steps, (*kept, lam)) is None:
            kept.append(lam)
    return tuple(kept)


def check_branch_steps(branch_steps, num_steps):
    if len(branch_steps) == 0:
        raise ValueError("branch_steps must not be empty")
    for k in branch_steps:
        if not _is_int(k) or not 0 <= k < num_steps - 1:
            raise ValueError(
                f"branch step {k!r} is outside 0..{num_steps - 2}: a branch needs a step on the "
                f"grid of {num_steps} steps and at least one ODE step after it")
    if len(set(branch_steps)) != len(branch_steps):
        raise ValueError(f"branch_steps must be distinct, got {tuple(branch_steps)!r}")


def check_guard_rails(cfg, params, ref_velocity_fn, ema):
    """kl_beta > 0 needs a reference, ema_decay > 0 an EMA of exactly the trainable params."""
    if cfg.kl_beta > 0 and ref_velocity_fn is None:
        raise ValueError(f"kl_beta = {cfg.kl_beta} needs ref_velocity_fn, the reference policy's "
                         f"velocity (e.g. a frozen copy of the pretrained model)")
    if ref_velocity_fn is not None and not callable(ref_velocity_fn):
        raise TypeError(f"ref_velocity_fn must be callable, got {type(ref_velocity_fn).__name__}")
    if cfg.ema_decay > 0 and ema is None:
        raise ValueError(f"ema_decay = {cfg.ema_decay} needs ema=EMA(model, {cfg.ema_decay}): "
                         f"the handle to evaluate or export with")
    if ema is None:
        return
    if cfg.ema_decay == 0:
        raise ValueError("an ema was passed but cfg.ema_decay is 0 (off); set ema_decay to its "
                         "decay")
    if ema.decay != cfg.ema_decay:
        raise ValueError(f"the ema's decay {ema.decay} differs from cfg.ema_decay "
                         f"{cfg.ema_decay}")
    if {id(p) for p in ema.params} != {id(p) for p in params}:
        raise ValueError("the ema averages other parameters than the model's trainable ones: "
                         "build it from the model after its parameters are final (wrapped, "
                         "sharded)")
