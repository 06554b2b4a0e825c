"""The specification of g2rpo.py: closed forms and oracles first, smoke tests last."""

import dis
import inspect
import math
import os
import re
import textwrap
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

import g2rpo


# ----------------------------------------------------------------------------------------------
# σ schedule and ODE step against diffusers' FlowMatchEulerDiscreteScheduler.


def test_sigma_schedule_closed_form():
    s = g2rpo.sigma_schedule(16, shift=3.0)
    u = torch.linspace(1, 0, 17, dtype=torch.float64)
    assert s.dtype == torch.float32 and s.shape == (17,)
    torch.testing.assert_close(s, (3 * u / (1 + 2 * u)).float())
    assert s[0] == 1.0 and s[-1] == 0.0 and (s[1:] < s[:-1]).all()


@pytest.mark.parametrize("num_steps,shift", [(16, 3.0), (10, 1.0), (28, 3.0)])
def test_schedule_and_ode_step_match_diffusers(num_steps, shift):
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(sigmas=torch.linspace(1, 0, num_steps + 1)[:-1].numpy())
    ours = g2rpo.sigma_schedule(num_steps, shift)
    torch.testing.assert_close(sched.sigmas, ours, atol=1e-6, rtol=0)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, generator=g)
    for i, t in enumerate(sched.timesteps):
        v = torch.randn(x.shape, generator=g)
        expected = sched.step(v, t, x).prev_sample
        x = g2rpo.ode_step(x, v, ours[i], ours[i + 1])
        torch.testing.assert_close(x, expected, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# SDE step and log-probability.


def test_gaussian_log_prob_matches_torch_distributions():
    g = torch.Generator().manual_seed(1)
    x, mean = torch.randn(5, 3, 4, generator=g), torch.randn(5, 3, 4, generator=g)
    std = torch.rand(5, 1, 1, generator=g) + 0.1
    expected = torch.distributions.Normal(mean, std).log_prob(x).flatten(1).mean(1)
    torch.testing.assert_close(g2rpo.gaussian_log_prob(x, mean, std), expected)


def test_sde_step_mean_is_euler_maruyama_of_the_sde():
    g = torch.Generator().manual_seed(2)
    x, v = torch.randn(3, 6, generator=g), torch.randn(3, 6, generator=g)
    sigma, sigma_next, eta = 0.6, 0.5, 0.7
    _, _, mean, std = g2rpo.sde_step(x, v, sigma, sigma_next, eta, generator=g)
    sigma_t = eta * math.sqrt(sigma / (1 - sigma))
    drift = v + sigma_t**2 / (2 * sigma) * (x + (1 - sigma) * v)  # Eq. 2 as printed (dσ form)
    torch.testing.assert_close(mean, x + drift * (sigma_next - sigma))
    torch.testing.assert_close(std, torch.tensor(sigma_t * math.sqrt(sigma - sigma_next)))


def test_cps_step_is_the_formula_of_its_source():
    # flow_grpo's sde_type "cps" (flow_grpo/diffusers_patch/sd3_sde_with_logprob.py), written out:
    # std = σ'·sin(η·π/2), mean = (1 − σ')·x̂0 + sqrt(σ'² − std²)·x̂1,
    # x̂0 = x − σ·v, x̂1 = x + (1 − σ)·v.
    g = torch.Generator().manual_seed(4)
    x, v = torch.randn(3, 6, generator=g), torch.randn(3, 6, generator=g)
    for sigma, sigma_next, eta in ((1.0, 0.9, 0.8), (0.6, 0.5, 0.7), (0.3, 0.1, 1.0)):
        _, _, mean, std = g2rpo.sde_step(x, v, sigma, sigma_next, eta, generator=g, kind="cps")
        s = sigma_next * math.sin(eta * math.pi / 2)
        x0, x1 = x - sigma * v, x + (1 - sigma) * v
        torch.testing.assert_close(std, torch.tensor(s))
        torch.testing.assert_close(mean, (1 - sigma_next) * x0
                                   + math.sqrt(max(sigma_next**2 - s**2, 0.0)) * x1)
    with pytest.raises(ValueError, match="and <= 1 for CPS, got 1.5"):
        g2rpo.sde_step(x, v, 0.6, 0.5, 1.5, kind="cps")
    with pytest.raises(ValueError, match="kind must be 'flow_grpo' or 'cps', got 'ddim'"):
        g2rpo.sde_step(x, v, 0.6, 0.5, 0.7, kind="ddim")


def test_cps_log_prob_is_the_density_not_flow_grpos_squared_distance():
    # flow_grpo scores a CPS step by −mean((x' − μ)²): its log-ratio between two policies is the
    # density's times 2·std². Here it is the density, so the ratio and the clip range mean what
    # they mean for the paper's SDE; with theirs, ε acts as ε / (2·std²) (std = 0.57 at σ' = 0.6,
    # η = 0.8: 1.5× the log-ratio; 0.14 at σ' = 0.15: 0.04×).
    g = torch.Generator().manual_seed(5)
    x, v_old, v_new = (torch.randn(4, 8, generator=g) for _ in range(3))
    x_next, old, mean_old, std = g2rpo.sde_step(x, v_old, 0.7, 0.6, 0.8, generator=g, kind="cps")
    _, new, mean_new, _ = g2rpo.sde_step(x, v_new, 0.7, 0.6, 0.8, prev_sample=x_next, kind="cps")
    expected = torch.distributions.Normal(mean_new, std).log_prob(x_next).flatten(1).mean(1)
    torch.testing.assert_close(new, expected)
    theirs = lambda mean: -((x_next - mean) ** 2).mean(1)
    torch.testing.assert_close(new - old, (theirs(mean_new) - theirs(mean_old)) / (2 * std**2))


@pytest.mark.parametrize("kind", ["flow_grpo", "cps"])
def test_sde_log_prob_is_normal_log_prob_of_the_sample(kind):
    g = torch.Generator().manual_seed(3)
    x, v = torch.randn(4, 2, 3, generator=g), torch.randn(4, 2, 3, generator=g)
    x_next, log_prob, mean, std = g2rpo.sde_step(x, v, 0.8, 0.7, 0.7, generator=g, kind=kind)
    expected = torch.distributions.Normal(mean, std).log_prob(x_next).flatten(1).mean(1)
    assert log_prob.shape == (4,) and log_prob.dtype == torch.float32
    torch.testing.assert_close(log_prob, expected)
    # Scoring the same sample again (the training pass) gives the same number.
    _, again, _, _ = g2rpo.sde_step(x, v, 0.8, 0.7, 0.7, prev_sample=x_next, kind=kind)
    torch.testing.assert_close(again, log_prob)


def test_sde_step_empirical_moments_match_mean_and_std():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, 3, generator=g).expand(200_000, 3)
    v = torch.randn(1, 3, generator=g).expand(200_000, 3)
    x_next, _, mean, std = g2rpo.sde_step(x, v, 0.5, 0.4375, 0.7, generator=g)
    torch.testing.assert_close(x_next.mean(0), mean[0], atol=4 * std.item() / 400, rtol=0)
    torch.testing.assert_close(x_next.std(0), std.expand(3), atol=0.01 * std.item(), rtol=0)


def test_small_eta_gives_the_euler_step():
    g = torch.Generator().manual_seed(5)
    x, v = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    euler = g2rpo.ode_step(x, v, 0.7, 0.6)
    for eta in (1e-2, 1e-4, 1e-9):
        x_next, _, mean, std = g2rpo.sde_step(x, v, 0.7, 0.6, eta, generator=g)
        assert (mean - euler).abs().max() < 10 * eta + 1e-6
        assert (x_next - euler).abs().max() < 6 * std + 10 * eta + 1e-6
    assert std < 1e-9


def test_first_step_at_sigma_one_is_finite_and_uses_the_guard():
    sigmas = g2rpo.sigma_schedule(16, 3.0)
    x, v = torch.randn(2, 5), torch.randn(2, 5)
    x_next, log_prob, mean, std = g2rpo.sde_step(x, v, sigmas[0], sigmas[1], 0.7)
    assert torch.isfinite(x_next).all() and torch.isfinite(log_prob).all()
    s1 = sigmas[1].item()
    expected_std = 0.7 * math.sqrt(1.0 / (1 - s1)) * math.sqrt(1 - s1)
    torch.testing.assert_close(std, torch.tensor(expected_std))


def test_per_sample_sigmas_equal_scalar_calls():
    g = torch.Generator().manual_seed(6)
    x, v = torch.randn(3, 2, 2, generator=g), torch.randn(3, 2, 2, generator=g)
    s, s_next = torch.tensor([1.0, 0.6, 0.3]), torch.tensor([0.9, 0.5, 0.2])
    x_next, lp, _, _ = g2rpo.sde_step(x, v, s, s_next, 0.7, generator=g)
    for i in range(3):
        xi, lpi, _, _ = g2rpo.sde_step(x[i : i + 1], v[i : i + 1], s[i].item(), s_next[i].item(),
                                       0.7, prev_sample=x_next[i : i + 1])
        torch.testing.assert_close(lpi, lp[i : i + 1])
    torch.testing.assert_close(g2rpo.ode_step(x, v, s, s_next)[1],
                               g2rpo.ode_step(x[1], v[1], 0.6, 0.5))


def test_sde_sampling_preserves_the_marginals_of_gaussian_data(kind="flow_grpo"):
    # For x0 ~ N(m, c²) the exact velocity is known: E[ε − x0 | x_σ] in closed form.
    m, c = 1.5, 0.5

    def v_exact(x, sigma):
        a, b = 1 - sigma, sigma
        var = a**2 * c**2 + b**2
        e_x0 = m + a * c**2 / var * (x - a * m)
        e_eps = b / var * (x - a * m)
        return e_eps - e_x0

    g = torch.Generator().manual_seed(7)
    sigmas = g2rpo.sigma_schedule(400, 1.0)
    x_sde = x_ode = torch.randn(100_000, 1, generator=g)
    for i in range(400):
        s, s_next = sigmas[i].item(), sigmas[i + 1].item()
        x_ode = g2rpo.ode_step(x_ode, v_exact(x_ode, s), s, s_next)
        if s_next > 0:
            x_sde = g2rpo.sde_step(x_sde, v_exact(x_sde, s), s, s_next, 0.7, generator=g,
                                   kind=kind)[0]
        else:  # the last step has σ_t ~ 0 / 0 at σ = 0: finish with the ODE
            x_sde = g2rpo.ode_step(x_sde, v_exact(x_sde, s), s, s_next)
    for x in (x_ode, x_sde):
        assert abs(x.mean().item() - m) < 0.02
        assert abs(x.std().item() - c) < 0.02


def test_one_cps_step_keeps_the_coefficients_but_not_the_variance_of_gaussian_data():
    # CPS keeps x0's and ε's coefficients, (1 − σ') and σ', for the TRUE x0 and ε; it is handed
    # their posterior means x̂0 = E[x0 | x], x̂1 = E[ε | x], which vary less. For x0 ~ N(m, c²) and
    # the exact velocity, one step from the exact marginal at σ gives, in closed form,
    # mean (1 − σ')·m and variance (α·a·c² + β·b)² / V + γ² (a = 1 − σ, b = σ, V = a²c² + b²,
    # α = 1 − σ', β = σ'·cos(η·π/2), γ = σ'·sin(η·π/2)) instead of the marginal's α²c² + σ'²;
    # the paper's SDE step is off only by its Euler–Maruyama error, a fifth of that here.
    m, c, sigma, sigma_next, eta = 1.5, 0.5, 0.6, 0.5, 0.8  # variance 0.277 instead of 0.3125
    a, b, V = 1 - sigma, sigma, (1 - sigma) ** 2 * c**2 + sigma**2
    g = torch.Generator().manual_seed(8)
    x = a * m + math.sqrt(V) * torch.randn(400_000, 1, generator=g)  # exactly the σ marginal
    v = (b / V * (x - a * m)) - (m + a * c**2 / V * (x - a * m))  # E[ε − x0 | x]
    alpha = 1 - sigma_next
    beta, gamma = sigma_next * math.cos(eta * math.pi / 2), sigma_next * math.sin(eta * math.pi / 2)
    cps = g2rpo.sde_step(x, v, sigma, sigma_next, eta, generator=g, kind="cps")[0]
    cps_var = (alpha * a * c**2 + beta * b) ** 2 / V + gamma**2
    marginal_var = alpha**2 * c**2 + sigma_next**2
    assert abs(cps.mean().item() - alpha * m) < 0.005
    assert abs(cps.var().item() - cps_var) < 0.003 and marginal_var - cps_var > 0.03
    sde = g2rpo.sde_step(x, v, sigma, sigma_next, 0.7, generator=g)[0]
    assert abs(sde.var().item() - marginal_var) < (marginal_var - cps_var) / 4  # 0.007 vs 0.035


# ----------------------------------------------------------------------------------------------
# Granularities and advantages.


def test_granularity_schedule_examples():
    assert g2rpo.granularity_schedule(16, 0, 1) == list(range(1, 17))
    assert g2rpo.granularity_schedule(16, 0, 2) == [1, 2, 4, 6, 8, 10, 12, 14, 16]
    assert g2rpo.granularity_schedule(16, 1, 2) == [2, 3, 5, 7, 9, 11, 13, 15, 16]
    assert g2rpo.granularity_schedule(16, 7, 3) == [8, 9, 12, 15, 16]
    assert g2rpo.granularity_schedule(16, 14, 3) == [15, 16]
    # Every schedule starts at k+1, ends at T, never steps further than λ.
    for k in range(15):
        for lam in (1, 2, 3, 5):
            s = g2rpo.granularity_schedule(16, k, lam)
            steps = [b - a for a, b in zip(s[:-1], s[1:])]
            assert s[0] == k + 1 and s[-1] == 16 and 1 <= min(steps) and max(steps) <= lam


def test_group_advantages_hand_example():
    adv = g2rpo.group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]))
    torch.testing.assert_close(adv, torch.tensor([1, -1, -1, 1.0]) * math.sqrt(3) / 2)


def test_group_advantages_equal_rewards_give_zeros_not_nan():
    r = torch.full((3, 5), 0.1)
    r[1] = 7.3
    adv = g2rpo.group_advantages(r)
    assert torch.equal(adv, torch.zeros(3, 5))


def test_group_advantages_standardise_along_last_dim_with_unbiased_std():
    r = torch.randn(4, 3, 12, generator=torch.Generator().manual_seed(8))
    adv = g2rpo.group_advantages(r)
    expected = (r - r.mean(-1, keepdim=True)) / (r.std(-1, keepdim=True, unbiased=True) + 1e-8)
    torch.testing.assert_close(adv, expected)


def test_multi_granularity_sums_over_granularities_then_clips():
    r = torch.randn(2, 3, 6, generator=torch.Generator().manual_seed(9))  # (P, L, G)
    expected = sum(g2rpo.group_advantages(r[:, i]) for i in range(3))
    torch.testing.assert_close(g2rpo.multi_granularity_advantages(r, adv_clip=100.0), expected)
    # Ten granularities that agree: the sum reaches ±2.6·… beyond 5 and is clipped.
    agree = torch.tensor([0.0, 0, 0, 0, 1]).expand(10, 5)
    adv = g2rpo.multi_granularity_advantages(agree, adv_clip=5.0)
    assert adv.max() == 5.0 and adv.min() == pytest.approx(10 * -0.4472, rel=1e-3)


# ----------------------------------------------------------------------------------------------
# The clipped objective.


def test_loss_is_minus_advantage_at_ratio_one_and_stats():
    lp = torch.zeros(2, 4)
    adv = torch.tensor([[1.0, -1, 2, -2], [0.5, 0.5, -0.5, -0.5]])
    loss, stats = g2rpo.clipped_grpo_loss(lp, lp, adv, 0.1)
    assert loss.item() == pytest.approx(-adv.mean().item())
    assert stats["clip_frac"] == 0 and stats["approx_kl"] == 0 and stats["ratio_max_dev"] == 0


def test_gradient_vanishes_once_ratio_is_clipped_in_the_advantage_direction():
    eps = 0.1
    old = torch.zeros(4)
    # r > 1 + ε with A > 0, and r < 1 − ε with A < 0: clipped, zero gradient.
    lp = torch.tensor([0.2, -0.2, 0.2, -0.2], requires_grad=True)
    adv = torch.tensor([1.0, -1.0, -1.0, 1.0])
    loss, stats = g2rpo.clipped_grpo_loss(lp, old, adv, eps)
    loss.backward()
    assert lp.grad[0] == 0 and lp.grad[1] == 0
    # Against the advantage the unclipped term is kept: the gradient pulls back.
    r = torch.exp(torch.tensor(0.2))
    assert lp.grad[2].item() == pytest.approx(r.item() / 4)
    assert lp.grad[3].item() == pytest.approx(-(1 / r).item() / 4)
    assert stats["clip_frac"] == 1.0
    assert stats["approx_kl"] == pytest.approx(0.5 * 0.04, rel=1e-5)


# ----------------------------------------------------------------------------------------------
# Part 1 is the reference: the batched rollout, advantages and update equal it.


class LinearVelocity(torch.nn.Module):
    """v = W x + b_c + σ·u: a cheap differentiable, conditional stand-in for a flow model."""

    def __init__(self, dim=3, classes=5):
        super().__init__()
        g = torch.Generator().manual_seed(10)
        self.w = torch.nn.Parameter(0.3 * torch.randn(dim, dim, generator=g))
        self.b = torch.nn.Parameter(torch.randn(classes, dim, generator=g))
        self.u = torch.nn.Parameter(torch.randn(dim, generator=g))

    def forward(self, x, sigma, c):
        return x @ self.w.T + self.b[c] + sigma[:, None] * self.u


def quadratic_reward(x, prompts):
    target = torch.as_tensor(prompts, dtype=torch.float32)[:, None]
    return -((x - target) ** 2).sum(-1)


def conditioned(model, prompt):
    """One prompt's velocity(x, sigma), as Part 1 takes it, from model(x, sigma, classes)."""
    return lambda x, sigma: model(x, sigma, torch.full((len(x),), int(prompt)))


@pytest.mark.parametrize("P,ks,kind", [(3, (0, 2, 5, 7), "flow_grpo"), (2, (1, 4), "cps")])
def test_batched_sampling_equals_the_reference_per_prompt(P, ks, kind):
    model = LinearVelocity()
    T, G, lams, eta = 10, 5, (1, 2, 3), 0.7  # K ≠ P ≠ G in the first case
    sigmas = g2rpo.sigma_schedule(T, 3.0)
    cond = torch.arange(P) + 1
    x_T = torch.randn(P, 3, generator=torch.Generator().manual_seed(11))
    velocity = g2rpo.CountingVelocity(model, batch_size=7)  # odd chunks on purpose
    out = g2rpo.singular_stochastic_sampling(velocity, cond, x_T, sigmas, ks, lams, G, eta,
                                             torch.Generator().manual_seed(12), kind)
    noise = torch.randn(len(ks) * P * G, 3, generator=torch.Generator().manual_seed(12))
    noise = noise.view(len(ks), P, G, 3)  # the batched rollout's one draw, (K, P, G, D)
    for p in range(P):
        ref = g2rpo.group_rollout(conditioned(model, cond[p]), x_T[p], sigmas, ks, lams, G, eta,
                                  noise=noise[:, p], sde_kind=kind)
        torch.testing.assert_close(out["x"][:, p, 0], ref["x"])
        torch.testing.assert_close(out["x_next"][:, p], ref["x_next"])
        torch.testing.assert_close(out["old_log_prob"][:, p], ref["old_log_prob"])
        torch.testing.assert_close(out["samples"][:, :, p], ref["samples"])
        torch.testing.assert_close(out["anchor"][p], ref["anchor"])
    assert out["x"].shape == (len(ks), P, 1, 3)


@pytest.mark.parametrize("P,ks,G", [(3, (0, 2, 3, 1), 5), (2, (3, 1), 3)])
def test_batched_rollout_advantages_equal_the_reference_per_prompt(P, ks, G):
    model = LinearVelocity()
    cfg = small_config(branch_steps=ks, group_size=G, granularities=(1, 2, 3),
                       prompts_per_iteration=P, batch_size=7, adv_clip=2.0)
    sigmas = g2rpo.sigma_schedule(cfg.num_steps, cfg.shift)
    prompts = list(range(1, P + 1))
    out, _ = g2rpo.rollout(model, quadratic_reward, prompts, torch.tensor(prompts), cfg, sigmas,
                           (3,), torch.Generator().manual_seed(12))
    g = torch.Generator().manual_seed(12)  # the rollout's draws: x_T, then the SDE noise
    x_T = torch.randn(P, 3, generator=g)
    K, L = len(ks), len(cfg.granularities)
    noise = torch.randn(K * P * G, 3, generator=g).view(K, P, G, 3)
    for p, prompt in enumerate(prompts):
        ref = g2rpo.group_rollout(conditioned(model, prompt), x_T[p], sigmas, ks,
                                  cfg.granularities, G, cfg.eta, noise=noise[:, p])
        torch.testing.assert_close(out["samples"][:, :, p], ref["samples"])
        rewards = quadratic_reward(ref["samples"].flatten(0, 2), [prompt] * (K * L * G))
        adv = g2rpo.multi_granularity_advantages(rewards.view(K, L, G), cfg.adv_clip,
                                                 num_granularities=L)  # (K, G)
        torch.testing.assert_close(out["adv"][:, p], adv)
    assert (out["adv"].abs() == cfg.adv_clip).any()  # the clip is exercised


@pytest.mark.parametrize("step_per_branch", [True, False])
def test_batched_update_equals_the_reference_on_one_group(step_per_branch):
    cfg = small_config(prompts_per_iteration=1, step_per_branch=step_per_branch,
                       clip_range=1e-3)
    sigmas = g2rpo.sigma_schedule(cfg.num_steps, cfg.shift)
    batched, reference = LinearVelocity(), LinearVelocity()  # the same weights
    before = [p.detach().clone() for p in batched.parameters()]
    out, _ = g2rpo.rollout(batched, quadratic_reward, [2], torch.tensor([2]), cfg, sigmas, (3,),
                           torch.Generator().manual_seed(5))
    optimizer = torch.optim.AdamW(batched.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    stats = g2rpo.policy_update(list(batched.parameters()), optimizer, batched, out, sigmas, cfg)
    group = {"x": out["x"][:, 0, 0], "x_next": out["x_next"][:, 0],
             "old_log_prob": out["old_log_prob"][:, 0]}
    optimizer = torch.optim.AdamW(reference.parameters(), lr=cfg.lr,
                                  weight_decay=cfg.weight_decay)
    per_k = g2rpo.group_update(conditioned(reference, 2), optimizer, group, out["adv"][:, 0],
                               sigmas, cfg.branch_steps, cfg.eta, cfg.clip_range,
                               cfg.max_grad_norm, step_per_branch)
    for a, b, start in zip(batched.parameters(), reference.parameters(), before):
        torch.testing.assert_close(a, b)
        assert not torch.equal(a, start)
    assert len(per_k) == len(cfg.branch_steps) and per_k[0]["ratio_max_dev"] < 1e-6
    for name in ("loss", "clip_frac", "approx_kl"):
        assert stats[name] == pytest.approx(sum(s[name] for s in per_k) / len(per_k), abs=1e-6)
    if step_per_branch:  # the later steps are off-policy and the clip acts
        assert stats["clip_frac"] > 0
    else:
        assert stats["clip_frac"] == 0 and stats["approx_kl"] < 1e-10


def test_model_evaluations_match_the_formula():
    # Official T = 16, M = 8 noisiest, Λ = {1, 2, 3}: per member 92 + 52 + 39 ODE evaluations,
    # minus 2 shared (at k+1, k+2) for each of λ = 2, 3 and each k: 151; plus T for the anchor.
    assert g2rpo.count_model_evals(16, range(8), (1,), 12) == 16 + 12 * 92
    assert g2rpo.count_model_evals(16, range(8), (1, 2, 3), 12) == 16 + 12 * 151
    assert g2rpo.count_model_evals(16, range(8), (1,), 12, "full_sde") == 16 * 12
    model = LinearVelocity()
    for lams in [(1,), (1, 2), (1, 2, 3), (3,)]:
        velocity = g2rpo.CountingVelocity(model, batch_size=1000)
        g2rpo.singular_stochastic_sampling(velocity, torch.arange(2), torch.randn(2, 3),
                                           g2rpo.sigma_schedule(16), range(8), lams, 12, 0.7)
        assert velocity.evals == 2 * g2rpo.count_model_evals(16, range(8), lams, 12)
    velocity = g2rpo.CountingVelocity(model, batch_size=1000)
    g2rpo.full_sde_sampling(velocity, torch.arange(2), torch.randn(2, 3),
                            g2rpo.sigma_schedule(16), range(8), 12, 0.7)
    assert velocity.evals == 2 * g2rpo.count_model_evals(16, range(8), (1,), 12, "full_sde")
    # MixGRPO: every member runs all T steps (SDE in the window, ODE elsewhere).
    assert g2rpo.count_model_evals(16, range(8), (1, 2, 3), 12, "mixgrpo") == 16 * 12
    cfg = small_config(method="mixgrpo", window_size=2)
    _, m = g2rpo.rollout(model, quadratic_reward, [1, 2, 3], torch.tensor([1, 2, 3]), cfg,
                         g2rpo.sigma_schedule(8, 1.0), (3,), torch.Generator().manual_seed(3))
    assert m["nfe"] == 3 * g2rpo.count_model_evals(8, (), (), 4, "mixgrpo")


def small_config(**kw):
    base = dict(num_steps=8, shift=1.0, branch_steps=(0, 1, 3, 4), group_size=4,
                granularities=(1, 2), clip_range=0.05, lr=1e-2, prompts_per_iteration=3,
                num_iterations=1, batch_size=64)
    return g2rpo.Config(**{**base, **kw})


@pytest.mark.parametrize("method", ["g2rpo", "full_sde"])
@pytest.mark.parametrize("step_per_branch", [True, False])
def test_ratio_is_one_before_the_first_step_and_the_step_changes_parameters(method,
                                                                             step_per_branch):
    model = LinearVelocity()
    before = [p.detach().clone() for p in model.parameters()]
    cfg = small_config(method=method, step_per_branch=step_per_branch)
    history = g2rpo.train(model, model, quadratic_reward, [1, 2, 3, 4], cfg, latent_shape=(3,),
                          log=None, progress=False)
    m = history[0]
    assert m["ratio_dev_first"] < 1e-5
    assert all(math.isfinite(m[k]) for k in ("loss", "clip_frac", "approx_kl", "grad_norm"))
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    if step_per_branch:
        assert m["approx_kl"] > 0  # later branch steps see updated weights
    else:
        assert m["approx_kl"] < 1e-10 and m["clip_frac"] == 0  # plain policy gradient


@pytest.mark.parametrize("method", ["g2rpo", "full_sde"])
def test_unsorted_branch_steps_pair_each_state_with_its_own_sigma(method):
    model = LinearVelocity()
    cfg = small_config(method=method, branch_steps=(4, 0, 3), step_per_branch=False)
    sigmas = g2rpo.sigma_schedule(cfg.num_steps, cfg.shift)
    out, _ = g2rpo.rollout(model, quadratic_reward, [1, 2], torch.tensor([1, 2]), cfg, sigmas,
                           (3,), torch.Generator().manual_seed(15))
    for j, k in enumerate(cfg.branch_steps):
        lp = g2rpo.policy_log_prob(model, out["cond"], out["x"][j], out["x_next"][j], sigmas[k],
                                   sigmas[k + 1], cfg.eta)
        torch.testing.assert_close(lp, out["old_log_prob"][j])


def test_batched_policy_log_prob_matches_per_step_reference():
    # K ≠ P ≠ G so that a broadcasting slip cannot hide.
    model = LinearVelocity()
    cfg = small_config()
    sigmas = g2rpo.sigma_schedule(cfg.num_steps, cfg.shift)
    prompts = [1, 2, 3]
    out, _ = g2rpo.rollout(model, quadratic_reward, prompts, torch.tensor(prompts), cfg, sigmas,
                           (3,), torch.Generator().manual_seed(13))
    K, P, G = out["old_log_prob"].shape
    assert (K, P, G) == (4, 3, 4)
    for j, k in enumerate(cfg.branch_steps):
        lp = g2rpo.policy_log_prob(model, out["cond"], out["x"][j], out["x_next"][j], sigmas[k],
                                   sigmas[k + 1], cfg.eta)
        for p in range(P):
            x = out["x"][j, p, 0]
            v = model(x[None], sigmas[k].view(1), torch.tensor([prompts[p]]))
            for i in range(G):
                _, ref, _, _ = g2rpo.sde_step(x[None], v, sigmas[k].item(), sigmas[k + 1].item(),
                                              cfg.eta, prev_sample=out["x_next"][j, p, i][None])
                torch.testing.assert_close(lp[p, i], ref[0])
                torch.testing.assert_close(out["old_log_prob"][j, p, i], ref[0])


def test_rollout_advantages_are_per_step_and_summed_over_granularities():
    model = LinearVelocity()
    cfg = small_config(adv_clip=50.0)
    sigmas = g2rpo.sigma_schedule(cfg.num_steps, cfg.shift)
    out, m = g2rpo.rollout(model, quadratic_reward, [1, 2, 3], torch.tensor([1, 2, 3]), cfg,
                           sigmas, (3,), torch.Generator().manual_seed(14))
    r = out["rewards"]  # (K, P, L, R, G)
    expected = g2rpo.group_advantages(r[:, :, 0, 0]) + g2rpo.group_advantages(r[:, :, 1, 0])
    torch.testing.assert_close(out["adv"], expected)
    assert m["nfe"] == 3 * g2rpo.count_model_evals(8, cfg.branch_steps, (1, 2), 4)


# ----------------------------------------------------------------------------------------------
# The MixGRPO baseline: an SDE window that slides over the steps.


def test_conditioning_from_a_text_encoder_that_requires_grad_is_data_for_the_policy():
    # encode_prompts as a user writes it with a diffusers pipeline: encode_prompt through a text
    # encoder whose weights require grad. Its output would carry a graph that the first
    # backward frees ("backward through the graph a second time" at the next branch step).
    text_encoder = torch.nn.Embedding(5, 3)
    encoded = []

    def encode(prompts):
        encoded.append(text_encoder(torch.tensor(prompts)))
        return encoded[-1]

    class ConditionedVelocity(LinearVelocity):
        def forward(self, x, sigma, c):
            return x @ self.w.T + c + sigma[:, None] * self.u

    model = ConditionedVelocity()
    before = model.w.detach().clone()
    cfg = small_config(num_iterations=2)  # a step per branch step: 4 backward passes each
    history = g2rpo.train(model, model, quadratic_reward, [1, 2, 3], cfg, (3,),
                          encode_prompts=encode, log=None, progress=False)
    assert len(history) == 2 and not torch.equal(model.w, before)
    assert len(encoded) == 2 and not any(e.requires_grad for e in encoded)
    assert text_encoder.weight.grad is None  # the text encoder is not trained


def test_mixgrpo_window_moves_as_specified():
    window = g2rpo.mixgrpo_window
    # MixGRPO's script: T = 25, w = 4, stride 1, every 25 iterations; windows stay in 0..22.
    assert {window(it, 25, 4, 1, 25) for it in range(25)} == {(0, 1, 2, 3)}
    assert window(25, 25, 4, 1, 25) == (1, 2, 3, 4) and window(49, 25, 4, 1, 25) == (1, 2, 3, 4)
    assert window(19 * 25, 25, 4, 1, 25) == (19, 20, 21, 22)  # the last whole window
    assert window(20 * 25, 25, 4, 1, 25) == (0, 1, 2, 3)  # then it rolls back
    # Stride 3 over T = 10, w = 2 (steps 0..7): starts 0, 3, 6, then 0 again.
    assert [window(it, 10, 2, 3, 1) for it in range(4)] == [(0, 1), (3, 4), (6, 7), (0, 1)]
    # The Config's defaults, rescaled to T = 16: 3 steps within 0..13.
    cfg = g2rpo.Config(method="mixgrpo")
    starts = {window(it, cfg.num_steps, cfg.window_size, cfg.window_stride, cfg.window_every)[0]
              for it in range(1000)}
    assert starts == set(range(12))


def test_mixgrpo_trains_the_window_of_each_iteration_and_only_its_steps():
    model = LinearVelocity()
    trained = []  # σ of every call made with gradient (the training forward passes)

    def velocity(x, sigma, c):
        if torch.is_grad_enabled():
            trained.append(sorted(set(sigma.tolist())))
        return model(x, sigma, c)

    cfg = small_config(method="mixgrpo", window_size=2, window_stride=1, window_every=2,
                       num_iterations=5, num_steps=8)
    history = g2rpo.train(model, velocity, quadratic_reward, [1, 2, 3], cfg, latent_shape=(3,),
                          log=None, progress=False)
    sigmas = g2rpo.sigma_schedule(8, 1.0)
    assert [m["window"] for m in history] == [[0, 1], [0, 1], [1, 2], [1, 2], [2, 3]]
    expected = [[sigmas[k].item()] for m in history for k in m["window"]]
    assert trained == expected  # one training pass per window step, nothing else
    assert all(m["train_rows"] == 2 * 3 * 4 for m in history)  # w · P · G rows
    assert all(m["ratio_dev_first"] < 1e-5 for m in history)


def test_mixgrpo_rollout_equals_a_per_member_loop_with_ode_steps_outside_the_window():
    # The per-member reference for the full-SDE family: one sample per call, the SDE step with
    # the noise the batched rollout drew, and outside the window plain ode_step (= η = 0).
    model = LinearVelocity()
    cfg = small_config(method="mixgrpo", window_size=3, window_every=1)
    T, P, G = cfg.num_steps, 2, cfg.group_size
    sigmas = g2rpo.sigma_schedule(T, cfg.shift)
    prompts = [1, 2]
    out, _ = g2rpo.rollout(model, quadratic_reward, prompts, torch.tensor(prompts), cfg, sigmas,
                           (3,), torch.Generator().manual_seed(21), iteration=2)
    window = g2rpo.mixgrpo_window(2, T, 3, 1, 1)
    assert list(out["steps"]) == list(window) == [2, 3, 4]
    g = torch.Generator().manual_seed(21)
    x_T = torch.randn(P, 3, generator=g)
    noise = {k: torch.randn(P * G, 3, generator=g).view(P, G, 3) for k in window}
    for p in range(P):
        for m in range(G):
            x = x_T[p]
            for i in range(T):
                v = model(x[None], sigmas[i].view(1), torch.tensor([prompts[p]]))[0]
                if i in window:
                    j = window.index(i)
                    # to float32 round-off, not bit for bit: a batched matmul may sum in another
                    # order than one row's (an Intel Xeon differed in the last bit)
                    torch.testing.assert_close(out["x"][j, p, m], x)
                    _, _, mean, std = g2rpo.sde_step(x[None], v[None], sigmas[i], sigmas[i + 1],
                                                     cfg.eta, prev_sample=x[None])
                    x = (mean + std * noise[i][p, m])[0]
                    torch.testing.assert_close(out["x_next"][j, p, m], x)
                else:
                    x = g2rpo.ode_step(x, v, sigmas[i], sigmas[i + 1])
            torch.testing.assert_close(out["samples"][p, m], x)
    # The terminal reward's group advantage (from the samples' own rewards), broadcast to every
    # step of the window.
    rewards = quadratic_reward(out["samples"].flatten(0, 1), [p for p in prompts for _ in
                                                              range(G)]).view(P, G)
    expected = g2rpo.group_advantages(rewards).clamp(-cfg.adv_clip, cfg.adv_clip)
    assert out["adv"].shape == (3, P, G)
    for j in range(3):
        torch.testing.assert_close(out["adv"][j], expected)


def test_granularities_that_repeat_a_completion_are_refused():
    # At T = 4 from branch step 1 every stride finishes on grid points 2, 3, 4: the same
    # completion counted twice would double its advantage in the sum (Eq. 11).
    assert g2rpo.granularity_schedule(4, 1, 1) == g2rpo.granularity_schedule(4, 1, 2) == [2, 3, 4]
    with pytest.raises(g2rpo.ConfigError, match=re.escape(
            "granularities 1 and 2 finish branch step 1 on the same grid points [2, 3, 4] at T = "
            "4: one completion counted twice doubles its advantage. Those that differ at every "
            "branch step (0, 1): 1")) as e:
        g2rpo.Config(num_steps=4, branch_steps=(0, 1), granularities=(1, 2))
    assert e.value.field == "granularities"
    assert g2rpo.repeated_granularity(4, (0,), (1, 2, 3)) == (0, 2, 3, [1, 2, 4])
    assert g2rpo.distinct_granularities(4, (0,), (1, 2, 3)) == (1, 2)
    assert g2rpo.distinct_granularities(8, range(4), (1, 2, 3)) == (1, 2, 3)
    assert g2rpo.distinct_granularities(16, range(8), (1, 4, 8)) == (1, 4, 8)
    for T in range(2, 33):  # the defaults of every T, branch steps the first half
        ks = tuple(range(max(1, T // 2)))
        if T > 2:
            assert g2rpo.repeated_granularity(T, ks, g2rpo.distinct_granularities(
                T, ks, (1, 2, 3))) is None
    g2rpo.Config()  # the paper's: T = 16, branch steps 0..7, Λ = {1, 2, 3}


def test_fields_a_method_does_not_use_are_not_checked_against_the_grid():
    # MixGRPO's window replaces the branch steps: the default 0..7 need not fit T = 8.
    cfg = g2rpo.Config(method="mixgrpo", num_steps=8)
    assert cfg.branch_steps == (0, 1, 2, 3, 4, 5, 6, 7)
    g2rpo.Config(method="full_sde", granularities=(2, 2))  # full-SDE finishes no branches
    g2rpo.Config(num_steps=4, branch_steps=(0, 1), granularities=(1,),
                 window_size=5)  # no window but MixGRPO's
    with pytest.raises(g2rpo.ConfigError, match="branch step 7 is outside 0..6") as e:
        g2rpo.Config(method="full_sde", num_steps=8)
    assert e.value.field == "branch_steps"
    with pytest.raises(g2rpo.ConfigError, match="granularities must be distinct"):
        g2rpo.Config(granularities=(2, 2))
    with pytest.raises(g2rpo.ConfigError, match="must be a sequence of integers"):
        g2rpo.Config(method="mixgrpo", branch_steps="0,1")  # its type is still checked


@pytest.mark.parametrize("kw,field,match", [
    (dict(num_steps=4, window_size=3), "window_size",
     r"window_size 3 does not fit the grid: a MixGRPO window lies within steps 0..1 of T = 4"),
    (dict(window_size=0), "window_size", "window_size must be an integer >= 1, got 0"),
    (dict(window_stride=0), "window_stride", "window_stride must be an integer >= 1, got 0"),
    (dict(window_every=1.5), "window_every", "window_every must be an integer, got 1.5"),
])
def test_a_mixgrpo_window_that_does_not_fit_is_refused_naming_the_field(kw, field, match):
    with pytest.raises(g2rpo.ConfigError, match=match) as e:
        g2rpo.Config(method="mixgrpo", **kw)
    assert e.value.field == field
    with pytest.raises(ValueError, match="window_size 15 does not fit T = 16"):
        g2rpo.mixgrpo_window(0, 16, 15)


# ----------------------------------------------------------------------------------------------
# Reading g2rpo.py: Part 1 first, the equation map and the copy table held to the code.

SOURCE = Path(g2rpo.__file__).read_text()
PART_2 = next(i for i, line in enumerate(SOURCE.splitlines(), 1) if line.startswith("# ── Part 2."))


def defined_here(obj):
    return (inspect.isfunction(obj) or inspect.isclass(obj)) and obj.__module__ == "g2rpo"


def part_1():
    """The functions of Part 1, the read-first section, in the order of the file."""
    lines = {name: inspect.getsourcelines(inspect.unwrap(obj))[1]
             for name, obj in vars(g2rpo).items() if defined_here(obj)}
    return sorted((name for name, line in lines.items() if line < PART_2), key=lines.get)


def loaded_names(name):
    """Every global name the source of g2rpo.`name` loads: its body, its nested functions and
    lambdas, its decorators, a class's methods."""
    code = compile(textwrap.dedent(inspect.getsource(getattr(g2rpo, name))), name, "exec")
    names, todo = set(), [code]
    while todo:
        c = todo.pop()
        names |= {i.argval for i in dis.get_instructions(c)
                  if i.opname in ("LOAD_GLOBAL", "LOAD_NAME") and not i.argval.startswith("__")}
        todo += [k for k in c.co_consts if inspect.iscode(k)]
    return names


def needs(name):
    """(the g2rpo helpers, the modules besides torch) that `name` needs pasted beside it."""
    helpers, modules, todo = set(), set(), [name]
    while todo:
        for ref in loaded_names(todo.pop()):
            obj = vars(g2rpo).get(ref)
            if inspect.ismodule(obj):
                modules.add(ref)
            elif obj is not None and ref != name and ref not in helpers:
                helpers.add(ref)
                todo.append(ref)
    return helpers, modules - {"torch"}


def copy_table():
    """docs/algorithm.md's "Copy one function" table: {function: (helpers, imports)}."""
    page = (Path(__file__).parent / "docs" / "algorithm.md").read_text()
    section = page[page.index("## Copy one function"):]
    section = section[:section.index("\n## ")]
    cells = lambda text: set(re.findall(r"`(\w+)`", text))
    table = {}
    for row in re.findall(r"^\| (`.*?) \| (.*?) \| (.*?) \|$", section, re.M):
        for name in cells(row[0]):
            table[name] = (cells(row[1]), cells(row[2]))
    return table


def test_part_1_comes_first_and_fits_where_the_docstring_says():
    claimed = int(re.search(r"Part 1 \(to line ~(\d+)\)", g2rpo.__doc__).group(1))
    assert abs(PART_2 - claimed) <= 10, (PART_2, claimed)
    first = min(inspect.getsourcelines(inspect.unwrap(obj))[1]
                for obj in vars(g2rpo).values() if defined_here(obj))
    assert first == inspect.getsourcelines(g2rpo.sigma_schedule)[1]  # nothing before the σ grid
    assert part_1() == ["sigma_schedule", "_per_sample", "ode_step", "gaussian_log_prob",
                        "sde_step", "granularity_schedule", "group_rollout", "group_advantages",
                        "multi_granularity_advantages", "clipped_grpo_loss", "group_update"]


def test_the_equation_map_names_functions_that_exist_and_every_number_the_code_cites():
    doc = g2rpo.__doc__
    block = doc[doc.index("Equation map"):]
    mapped = set()
    for line in block.splitlines()[1:]:
        right = line.split(" ..")[-1] if " .." in line else line
        if " .." in line or re.fullmatch(r" {20,}[\w, ]+", line):
            mapped |= set(re.findall(r"\w+", right.strip(". ")))
    missing = {name for name in mapped if not hasattr(g2rpo, name)}
    assert not missing, missing
    assert {n for n in part_1() if not n.startswith("_")} <= mapped

    def numbers(pattern, text):
        found = set()
        for a, b in re.findall(pattern, text):
            found |= set(range(int(a), int(b or a) + 1))
        return found

    code = SOURCE.replace(doc, "")
    equation, lines = r"Eqs?\. (\d+)(?:–(\d+))?", r"lines? (\d+)(?:–(\d+))?"
    assert numbers(equation, code) <= numbers(equation, block) == {1, 2, 3, 11}
    cited = numbers(r"Alg\. 1 " + lines, code)
    assert cited and cited <= numbers(lines, block)


def test_the_copy_table_lists_exactly_what_each_function_needs():
    table = copy_table()
    assert {n for n in part_1() if not n.startswith("_")} <= set(table)
    for name, (helpers, imports) in table.items():
        assert needs(name) == (helpers, imports), name


def example_calls():
    """name → a call of that function (given as f), returning tensors to compare."""
    x, v = torch.randn(3, 2), torch.randn(3, 2)
    sigmas = g2rpo.sigma_schedule(8, 1.0)
    velocity = conditioned(LinearVelocity(), 2)

    def group_update(f):
        model, g = LinearVelocity(), torch.Generator().manual_seed(0)
        group = g2rpo.group_rollout(conditioned(model, 2), torch.randn(3, generator=g), sigmas,
                                    (0, 3), (1, 2), 4, 0.7, g)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        f(conditioned(model, 2), optimizer, group, torch.randn(2, 4, generator=g), sigmas, (0, 3),
          0.7, 0.05)
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    def ema(f):
        model = LinearVelocity()
        averages = f(model, 0.9)
        with torch.no_grad():
            model.w.add_(1.0)
        averages.update()
        return averages.averages[0]

    counting = lambda: g2rpo.CountingVelocity(LinearVelocity(), 5)
    states = torch.randn(2, 1, 3), torch.randn(2, 4, 3)
    return {
        "sigma_schedule": lambda f: f(8, 3.0),
        "gaussian_log_prob": lambda f: f(x, v, torch.tensor(0.5)),
        "ode_step": lambda f: f(x, v, 0.5, 0.25),
        "sde_step": lambda f: f(x, v, 1.0, 0.9, 0.7, torch.Generator().manual_seed(0))[1],
        "granularity_schedule": lambda f: torch.tensor(f(16, 7, 3)),
        "group_rollout": lambda f: f(velocity, torch.randn(3), sigmas, (0, 3), (1, 2), 4, 0.7,
                                     torch.Generator().manual_seed(0))["samples"],
        "group_advantages": lambda f: f(x),
        "multi_granularity_advantages": lambda f: f(x),
        "clipped_grpo_loss": lambda f: f(x[:, 0], v[:, 0], x[:, 1], 0.1)[0],
        "group_update": group_update,
        "singular_stochastic_sampling": lambda f: f(
            counting(), torch.tensor([1, 2]), torch.randn(2, 3), sigmas, (0, 3), (1, 2), 4, 0.7,
            torch.Generator().manual_seed(0))["samples"],
        "CountingVelocity": lambda f: f(LinearVelocity(), 2)(
            torch.randn(5, 3), torch.rand(5), torch.tensor([1, 2]), torch.tensor([0, 1, 1, 0, 1])),
        "count_model_evals": lambda f: torch.tensor([f(16, range(8), (1, 2, 3), 12),
                                                     f(16, range(8), (1,), 12, "full_sde")]),
        "score": lambda f: f(quadratic_reward, torch.randn(5, 3), [1, 2, 3, 4, 1], 2),
        "policy_log_prob": lambda f: f(LinearVelocity(), torch.tensor([1, 2]), *states,
                                       sigmas[2], sigmas[3], 0.7),
        "full_sde_sampling": lambda f: f(counting(), torch.tensor([1, 2]), torch.randn(2, 3),
                                         sigmas, (0, 2), 3, 0.7,
                                         torch.Generator().manual_seed(0))["samples"],
        "mixgrpo_window": lambda f: torch.tensor([f(it, 16, 3, 1, 25) for it in range(400)]),
        "gaussian_kl": lambda f: f(x, v, torch.tensor(0.5)),
        "EMA": ema,
    }


@pytest.mark.parametrize("name", sorted(copy_table()))
def test_each_function_of_the_copy_table_runs_pasted_alone(name):
    helpers, imports = copy_table()[name]
    source = "\n".join(["import torch", *(f"import {m}" for m in sorted(imports))]
                       + [inspect.getsource(getattr(g2rpo, n)) for n in [name, *sorted(helpers)]])
    alone = {}
    exec(source, alone)
    call = example_calls()[name]
    torch.manual_seed(0)
    ours = call(getattr(g2rpo, name))
    torch.manual_seed(0)
    torch.testing.assert_close(call(alone[name]), ours)


def test_an_axis_mix_up_is_refused_where_the_granularities_are_known():
    rewards = torch.randn(4, 12, 3)  # (K, G, L): the group and the granularities swapped
    with pytest.raises(ValueError, match=r"must be \(\.\.\., L, G\): the 3 granularities on dim "
                                         r"-2, the group on dim -1; got shape \(4, 12, 3\)"):
        g2rpo.multi_granularity_advantages(rewards, num_granularities=3)
    g2rpo.multi_granularity_advantages(rewards.transpose(1, 2), num_granularities=3)


# ----------------------------------------------------------------------------------------------
# Bad input: clear errors that name the value; nothing NaN reaches the optimizer.


@pytest.mark.parametrize("kw,match", [
    (dict(group_size=1), "group_size .* got 1"),
    (dict(granularities=(1, 0)), "granularity .* got 0"),
    (dict(granularities=(1, 1.5)), "granularities must be an integer, got 1.5"),
    (dict(branch_steps=(0, 16)), "branch step 16"),
    (dict(branch_steps=(15,)), "branch step 15"),
    (dict(branch_steps=(-1,)), "branch step -1"),
    (dict(eta=0.0), "eta .* got 0.0"),
    (dict(clip_range=0.0), "clip_range .* got 0.0"),
    (dict(clip_range=-1e-4), "clip_range .* got -0.0001"),
    (dict(method="ppo"), "method .* 'ppo'"),
])
def test_bad_config_values_are_named(kw, match):
    with pytest.raises(ValueError, match=match):
        g2rpo.Config(**kw)


def test_bad_function_arguments_are_named():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="eta .* got -0.1"):
        g2rpo.sde_step(x, x, 0.5, 0.4, -0.1)
    with pytest.raises(ValueError, match="clip_range .* got 0"):
        g2rpo.clipped_grpo_loss(x, x, x, 0)
    with pytest.raises(ValueError, match="granularity .* got 0"):
        g2rpo.granularity_schedule(16, 3, 0)
    with pytest.raises(ValueError, match="branch step 15"):
        g2rpo.granularity_schedule(16, 15, 1)
    with pytest.raises(ValueError, match="group dim 1"):
        g2rpo.group_advantages(torch.zeros(4, 1))


@pytest.mark.parametrize("bad_reward,match", [
    (lambda x, p: torch.zeros(len(p) + 1), r"shape \(\d+,\) or \(\d+, R\)"),
    (lambda x, p: torch.full((len(p),), float("nan")), "non-finite rewards"),
    (lambda x, p: torch.full((len(p), 2), float("inf")), "non-finite rewards"),
])
def test_bad_rewards_are_refused_before_any_update(bad_reward, match):
    model = LinearVelocity()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=match):
        g2rpo.train(model, model, bad_reward, [1, 2], small_config(), latent_shape=(3,),
                    log=None, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_nan_gradients_never_reach_the_optimizer():
    model = LinearVelocity()
    before = [p.detach().clone() for p in model.parameters()]

    def nan_velocity(x, sigma, c):  # finite in sampling (no grad), NaN gradient in training
        v = model(x, sigma, c)
        return v + 0 * torch.sqrt(-torch.ones_like(v)) if torch.is_grad_enabled() else v

    with pytest.raises(FloatingPointError, match="non-finite"):
        g2rpo.train(model, nan_velocity, quadratic_reward, [1, 2], small_config(),
                    latent_shape=(3,), log=None, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("kw,match", [
    (dict(max_grad_norm=-1), "max_grad_norm must be > 0, got -1"),  # would reverse every update
    (dict(max_grad_norm=0), "max_grad_norm must be > 0, got 0"),
    (dict(max_grad_norm=float("nan")), "max_grad_norm must be finite, got nan"),
    (dict(step_per_branch="False"), "step_per_branch must be True or False, got 'False'"),
    (dict(eta=True), r"eta must be a number, got True \(bool\)"),
    (dict(shift=True), r"shift must be a number, got True \(bool\)"),
    (dict(eta=float("inf")), "eta must be finite, got inf"),
    (dict(shift=float("nan")), "shift must be finite, got nan"),
    (dict(lr=0), "lr must be > 0, got 0"),
    (dict(weight_decay=-0.1), "weight_decay must be >= 0, got -0.1"),
    (dict(clip_range=1.5), "clip_range must be < 1"),
    (dict(num_steps=16.0), r"num_steps must be an integer, got 16.0 \(float\)"),
    (dict(seed=-1), "seed must be an integer >= 0, got -1"),
    (dict(branch_steps=3), "branch_steps must be a sequence of integers, got 3"),
])
def test_config_types_and_ranges_are_checked(kw, match):
    with pytest.raises(g2rpo.ConfigError, match=match) as e:
        g2rpo.Config(**kw)
    assert e.value.field == next(iter(kw))


def test_config_accepts_numpy_and_zero_dim_tensor_numbers_as_python_numbers():
    np = pytest.importorskip("numpy")
    cfg = g2rpo.Config(num_steps=np.int64(16), group_size=torch.tensor(4), eta=np.float32(0.5),
                       branch_steps=[np.int32(0), torch.tensor(3)], lr=torch.tensor(1e-3))
    assert type(cfg.num_steps) is int and type(cfg.group_size) is int and cfg.group_size == 4
    assert type(cfg.eta) is float and cfg.branch_steps == (0, 3)
    assert all(type(k) is int for k in cfg.branch_steps)


@pytest.mark.parametrize("eta", [1e-8, 50.0])
def test_eta_outside_the_sane_range_warns(eta):
    with pytest.warns(UserWarning, match=f"eta = {eta} is outside"):
        g2rpo.Config(eta=eta)


def test_train_rechecks_a_config_changed_after_construction():
    cfg = small_config()
    cfg.branch_steps = (0, 0)
    model = LinearVelocity()
    with pytest.raises(g2rpo.ConfigError, match="branch_steps must be distinct"):
        g2rpo.train(model, model, quadratic_reward, [1, 2], cfg, latent_shape=(3,), log=None,
                    progress=False)


@pytest.mark.parametrize("bad_velocity,error,match", [
    (lambda m: lambda x, s, c: m(x, s, c)[:, :2], ValueError,
     r"velocity_fn returned \(\d+, 2\) for x of shape \(\d+, 3\)"),
    (lambda m: lambda x, s, c: m(x, s, c) * float("nan"), FloatingPointError,
     "velocity_fn returned non-finite values"),
    (lambda m: lambda x, s, c: m(x, s, c) * (float("nan") if torch.is_grad_enabled() else 1.0),
     FloatingPointError, "velocity_fn returned non-finite values"),  # training pass only
])
def test_a_bad_velocity_is_blamed_on_velocity_fn(bad_velocity, error, match):
    model = LinearVelocity()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(error, match=match):
        g2rpo.train(model, bad_velocity(model), quadratic_reward, [1, 2], small_config(),
                    latent_shape=(3,), log=None, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_a_reward_with_no_columns_is_refused():
    model = LinearVelocity()
    with pytest.raises(ValueError, match=r"got \(\d+, 0\)"):
        g2rpo.train(model, model, lambda x, p: torch.zeros(len(p), 0), [1, 2], small_config(),
                    latent_shape=(3,), log=None, progress=False)


def test_non_finite_samples_are_refused_before_scoring():
    called = []
    samples = torch.tensor([[0.0, float("inf")], [1.0, 2.0]])
    with pytest.raises(FloatingPointError, match="samples to be scored hold non-finite"):
        g2rpo.score(lambda x, p: called.append(1) or x.sum(1), samples, [0, 1], 8)
    assert not called


def test_a_non_finite_optimizer_state_is_refused_and_the_weights_stay():
    model = LinearVelocity()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.w.grad = torch.ones_like(model.w)
    optimizer.step()  # creates the state
    optimizer.state[model.w]["exp_avg"].fill_(float("nan"))
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(FloatingPointError, match="optimizer state holds non-finite values"):
        g2rpo.train(model, model, quadratic_reward, [1, 2], small_config(), latent_shape=(3,),
                    optimizer=optimizer, log=None, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_pasted_functions_refuse_what_they_cannot_compute():
    x = torch.zeros(2, 3)
    for sigma, sigma_next in ((0.5, 0.5), (0.4, 0.5), (0.0, 0.0), (1.2, 0.5)):
        with pytest.raises(ValueError, match="needs 1 >= sigma > sigma_next >= 0"):
            g2rpo.sde_step(x, x, sigma, sigma_next, 0.7)
    with pytest.raises(ValueError, match="needs 1 >= sigma > sigma_next"):
        g2rpo.sde_step(x, x, torch.tensor([0.5, 0.3]), torch.tensor([0.4, 0.3]), 0.7)
    with pytest.raises(ValueError, match="eta must be > 0 and finite"):
        g2rpo.sde_step(x, x, 0.5, 0.4, float("inf"))
    with pytest.raises(ValueError, match=r"rewards must be finite, got \[nan\]"):
        g2rpo.group_advantages(torch.tensor([1.0, float("nan"), 0.0]))


def test_training_uses_adv_scale():
    """Config.adv_scale reaches the gradient train() steps with, not only the advantage
    arithmetic: with the advantage clip out of reach and one optimizer step per iteration
    (every ratio 1 when the loss is differentiated), the same samples give |A| and the gradient
    (its norm before clipping) ×3. (AdamW's step then hardly changes: its update does not depend
    on a constant gradient scale.)"""
    first = {}
    for scale in (1.0, 3.0):
        torch.manual_seed(0)
        model = LinearVelocity()
        cfg = small_config(adv_scale=scale, adv_clip=1e6, step_per_branch=False)
        (first[scale],) = g2rpo.train(model, model, quadratic_reward, [1, 2, 3], cfg,
                                      latent_shape=(3,), log=None, progress=False)
    assert first[1.0]["reward"] == first[3.0]["reward"]  # the same samples
    assert first[3.0]["adv_abs_k"] == pytest.approx([3 * a for a in first[1.0]["adv_abs_k"]])
    assert first[1.0]["grad_norm"] > 0
    assert first[3.0]["grad_norm"] == pytest.approx(3 * first[1.0]["grad_norm"], rel=1e-5)


def test_a_callback_returning_true_stops_training():
    model = LinearVelocity()
    seen = []
    history = g2rpo.train(model, model, quadratic_reward, [1, 2], small_config(num_iterations=5),
                          latent_shape=(3,), callback=lambda it, m: seen.append(it) or it == 1,
                          log=None, progress=False)
    assert seen == [0, 1] and [m["iteration"] for m in history] == [0, 1]


@pytest.mark.parametrize("argv,message", [
    (["--iterations", "-1"], "--iterations: num_iterations must be an integer >= 0, got -1"),
    (["--iterations", "0"], "--iterations must be >= 1, got 0"),
    (["--max-grad-norm", "-1"], "--max-grad-norm: max_grad_norm must be > 0, got -1"),
    (["--granularities", "1,x"], "--granularities: expected comma-separated integers"),
    (["--step-per-branch", "False"], "unrecognized arguments: False"),
    (["--pretrain-steps", "0"], "--pretrain-steps must be >= 1, got 0"),
    (["--seeds", "0"], "--seeds must be >= 1, got 0"),
    (["--out", "/missing/dir/x.png"], "the directory '/missing/dir' does not exist"),
    (["--guard-rails", "0,-1"], "every β must be >= 0 and finite, got -1.0"),
    (["--guard-rails", "0,1", "--kl-beta", "2"], "--guard-rails sets --kl-beta (each β"),
    (["--guard-rails", "0", "--reward", "proxy"], "and --reward (proxy) itself"),
    (["--guard-rails", "0,1", "--ema-decay", "0"], "--ema-decay must be > 0"),
    (["--guard-rails", "0,x"], "expected comma-separated numbers"),
    (["--reward", "silver"], "invalid choice: 'silver'"),
    (["--kl-beta", "-1"], "--kl-beta: kl_beta must be >= 0, got -1.0"),
    (["--ema-decay", "1"], "--ema-decay: ema_decay must be in [0, 1)"),
    (["--method", "mixgrpo", "--branch-steps", "0,1"],
     "--branch-steps is not used by --method mixgrpo"),
    (["--method", "mixgrpo", "--granularities", "1,2"],
     "--granularities is not used by --method mixgrpo"),
    (["--method", "full_sde", "--granularities", "1,2"],
     "--granularities is not used by --method full_sde"),
    (["--window-every", "5"], "--window-every is not used by --method g2rpo"),
    (["--study", "mgai", "--granularities", "1,2"], "--study mgai sets --granularities itself"),
    (["--study", "mgai", "--method", "full_sde"], "--method must be g2rpo"),
    (["--study", "mgai-verdict", "--adv-scale", "3"], "--study mgai-verdict sets --adv-scale"),
    (["--study", "mgai-settings", "--dim", "16"], "--study mgai-settings sets --dim itself"),
    (["--study", "mgai-settings", "--num-steps", "8"], "sets --num-steps itself"),
])
def test_toy_cli_checks_its_flags_before_pretraining(tmp_path, capsys, argv, message):
    import toy_flow

    cache = tmp_path / "cache"
    with pytest.raises(SystemExit) as e:
        toy_flow.main([*argv, "--cache-dir", str(cache)])
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not cache.exists()  # stopped before pretraining


def test_toy_cli_has_one_flag_per_config_field_and_uses_them(tmp_path, capsys):
    import dataclasses
    import json

    import toy_flow
    from worlds import studies

    with pytest.raises(SystemExit):
        toy_flow.main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    docs = studies.config_field_help()
    for field in dataclasses.fields(g2rpo.Config):
        if field.name != "method":  # the toy's --method chooses it
            flag = {"num_iterations": "--iterations"}.get(field.name,
                                                          "--" + field.name.replace("_", "-"))
            assert flag in help_text and " ".join(docs[field.name].split()[:4]) in help_text
    out = tmp_path / "run.png"
    toy_flow.main(["--pretrain-steps", "50", "--cache-dir", str(tmp_path / "cache"), "--out",
                   str(out), "--iterations", "2", "--group-size", "4", "--granularities", "1,2",
                   "--branch-steps", "0,3", "--eta", "0.5", "--no-step-per-branch", "--seeds", "2",
                   "--seed", "5"])
    rows = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]
    assert [(r["seed"], r["iteration"]) for r in rows] == [(5, 0), (5, 1), (6, 0), (6, 1)]
    per_prompt = g2rpo.count_model_evals(16, (0, 3), (1, 2), 4)
    assert all(r["nfe"] == per_prompt * toy_flow.TOY["prompts_per_iteration"] for r in rows)
    assert all(len(r["adv_abs_k"]) == 2 and len(r["adv_abs_lambda"]) == 2 for r in rows)
    assert all(r["ratio_dev_first"] < 1e-6 and r["approx_kl"] < 1e-10 for r in rows)  # one step
    assert out.is_file()


def test_the_sde_kind_is_a_flag_and_a_cps_run_trains(tmp_path, capsys):
    import json

    import toy_flow

    argv = ["--pretrain-steps", "50", "--cache-dir", str(tmp_path / "cache"), "--iterations", "2",
            "--group-size", "4", "--granularities", "1,2", "--branch-steps", "0,3", "--seeds", "1"]
    out = tmp_path / "cps.png"
    toy_flow.main(argv + ["--sde-kind", "cps", "--eta", "0.8", "--out", str(out)])
    rows = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["ratio_dev_first"] < 1e-6 for r in rows)  # π_old = π_θ
    assert all(math.isfinite(r["loss"]) for r in rows)
    for bad, said in ((["--sde-kind", "ddim"], "--sde-kind: sde_kind must be one of 'flow_grpo', "
                       "'cps', got 'ddim'"),
                      (["--sde-kind", "cps", "--eta", "1.5"], "--eta: eta must be <= 1 with "
                       "sde_kind 'cps'")):
        with pytest.raises(SystemExit):
            toy_flow.main(argv + bad + ["--out", str(tmp_path / "bad.png")])
        assert said in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# The toy's statistics and its D-dimensional embedding.


def test_t_quantiles_match_closed_forms_and_the_table():
    from worlds import studies

    p = 0.975
    assert studies.t_quantile_975(1) == pytest.approx(math.tan(math.pi * (p - 0.5)), abs=1e-3)
    assert studies.t_quantile_975(2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)),
                                                       abs=1e-3)
    assert studies.t_quantile_975(30) == 2.042
    assert studies.t_quantile_975(40) == pytest.approx(2.021, abs=1e-3)  # expansion beyond 30
    assert studies.t_quantile_975(10**6) == pytest.approx(1.960, abs=1e-3)
    m, h = studies.mean_ci([1.0, 2.0, 3.0, 4.0])
    assert m == 2.5 and h == pytest.approx(3.182 * math.sqrt(5 / 3) / 2, rel=1e-6)


def test_paired_difference_claims_an_effect_only_when_the_interval_excludes_zero():
    from worlds import studies

    a = [0.90, 0.91, 0.92, 0.93]
    assert studies.paired_difference(a, [x - 0.02 for x in a])[2] == "excludes 0"
    assert studies.paired_difference(a, [0.92, 0.90, 0.93, 0.91])[2] == "includes 0"
    assert studies.paired_difference([0.9], [0.8])[2] == "–"


def test_the_embedded_toy_is_the_2d_toy_on_a_plane():
    import toy_flow

    Q = toy_flow.embedding(16)
    torch.testing.assert_close(Q.T @ Q, torch.eye(16), atol=1e-5, rtol=0)
    x16, c16 = toy_flow.sample_data(512, torch.Generator().manual_seed(0), dim=16)
    x2, c2 = toy_flow.sample_data(512, torch.Generator().manual_seed(0), dim=2)
    assert x16.shape == (512, 16) and torch.equal(c16, c2)
    torch.testing.assert_close(toy_flow.project(x16), x2, atol=1e-5, rtol=0)
    torch.testing.assert_close(toy_flow.reward(x16, c16), toy_flow.reward(x2, c2), atol=1e-5,
                               rtol=0)
    off_plane = (x16 @ Q)[:, 2:]  # the directions the reward ignores
    assert off_plane.std().item() == pytest.approx(toy_flow.EXTRA_STD, rel=0.1)
    assert torch.equal(toy_flow.embedding(2), torch.eye(2))  # D = 2 is the original toy


def test_toy_trains_in_d_dimensions_and_measures_lambda_disagreement(tmp_path):
    import toy_flow

    base = toy_flow.pretrain(steps=50, progress=False, dim=8)
    rates = toy_flow.granularity_disagreement(base, prompts=8)
    assert set(rates) == {2, 3} and all(0 <= r <= 1 for r in rates.values())
    model, result = toy_flow.run(base, "g2rpo", seed=0, num_iterations=2, eval_every=2,
                                 progress=False)
    assert model.dim == 8 and len(result["history"]) == 2
    assert math.isfinite(result["curve"][-1]["reward"])


def test_toy_comparison_reports_confidence_intervals_and_paired_differences(tmp_path, capsys):
    import toy_flow

    toy_flow.main(["--method", "all", "--seeds", "2", "--iterations", "2", "--pretrain-steps",
                   "50", "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "a.png")])
    out = capsys.readouterr().out
    assert ("| method | final reward | 95% CI | fidelity | 95% CI | model evals / iteration "
            "(rollout + training) |") in out
    rows = [line.split(" | ")[0] for line in out.splitlines() if line.startswith("| ")]
    for name in ("pretrained", "full_sde", "mixgrpo", "g2rpo_wo_mgai", "g2rpo"):
        assert f"| {name}" in rows, name
    # The same-budget table: the largest budget all reach is MixGRPO's (the cheapest iteration).
    budget = 2 * (16 * 12 * 16 + 3 * 16 * 12)  # 2 iterations: T·G·P rollout + w·P·G training
    assert f"| method | reward at {budget:,} model evals |" in out
    assert re.search(r"\| mixgrpo \| [\d.]+ \| \[[\d.]+, [\d.]+\] \| [\d.]+ \| .* \| 2\.0 \|", out)
    number, ci = r"[+-]\d\.\d{4}", r"\[[+-]\d\.\d{4}, [+-]\d\.\d{4}\]"
    for pair in ("g2rpo − full_sde", "g2rpo − mixgrpo", "g2rpo − g2rpo_wo_mgai",
                 "mixgrpo − full_sde"):
        assert re.search(rf"\| {pair} \| {number} \| {ci} \| (excludes|includes) 0 \| "
                         rf"{number} \| {ci} \| (excludes|includes) 0 \|", out), pair


def test_empty_prompts_are_refused():
    model = LinearVelocity()
    with pytest.raises(ValueError, match="prompts is empty"):
        g2rpo.train(model, model, quadratic_reward, [], small_config(), latent_shape=(3,))


# ----------------------------------------------------------------------------------------------
# Smoke: the trainer improves the reward of a toy flow.


def test_short_toy_run_raises_the_reward():
    import toy_flow

    base = toy_flow.pretrain(steps=1500, seed=0, progress=False)
    before = toy_flow.evaluate(base, n_per_class=256)
    _, result = toy_flow.run(base, "g2rpo", seed=0, num_iterations=15, eval_every=15,
                             progress=False)
    after = result["curve"][-1]
    assert after["reward"] > before["reward"] + 0.1, (before, after)


def test_short_mixgrpo_toy_run_raises_the_reward():
    import toy_flow

    base = toy_flow.pretrain(steps=1500, seed=0, progress=False)
    before = toy_flow.evaluate(base, n_per_class=256)
    _, result = toy_flow.run(base, "mixgrpo", seed=0, num_iterations=30, eval_every=30,
                             progress=False)
    every = toy_flow.TOY["window_every"]  # it slid toward cleaner steps
    assert [m["window"][0] for m in result["history"]] == [it // every for it in range(30)]
    after = result["curve"][-1]
    assert after["reward"] > before["reward"] + 0.05, (before, after)
