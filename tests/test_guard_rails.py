"""Guard rails against reward hacking: the KL penalty to a reference policy and EMA weights
(g2rpo.Config.kl_beta / ema_decay), and the toy that shows what they do."""

import copy
import os
import re

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

import g2rpo
import toy_flow
from test_g2rpo import LinearVelocity, quadratic_reward, small_config


# ----------------------------------------------------------------------------------------------
# The KL term: closed form against torch.distributions, and its gradient.


def test_gaussian_kl_is_torch_distributions_kl_averaged_over_the_elements():
    g = torch.Generator().manual_seed(0)
    mean, ref_mean = torch.randn(5, 3, 4, generator=g), torch.randn(5, 3, 4, generator=g)
    for std in (torch.tensor(0.3), torch.rand(5, 1, 1, generator=g) + 0.1):
        oracle = torch.distributions.kl_divergence(
            torch.distributions.Normal(mean, std.expand_as(mean)),
            torch.distributions.Normal(ref_mean, std.expand_as(mean)))
        torch.testing.assert_close(g2rpo.gaussian_kl(mean, ref_mean, std),
                                   oracle.flatten(1).mean(1))
    assert torch.equal(g2rpo.gaussian_kl(mean, mean, torch.tensor(0.3)), torch.zeros(5))


@pytest.mark.parametrize("S", [1, 3])  # G²RPO's shared state; full-SDE's own state per member
def test_kl_of_the_sde_steps_and_its_gradient_match_the_closed_form(S):
    P, G, D, eta = 2, 3, (4,), 0.7
    sigma, sigma_next = torch.tensor(0.6), torch.tensor(0.45)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(P, S, *D, generator=g)
    x_next = torch.randn(P, G, *D, generator=g)
    theta = torch.nn.Parameter(torch.randn(P * S, *D, generator=g))
    v_ref = torch.randn(P * S, *D, generator=g)
    cond = torch.arange(P)
    calls = []
    policy = lambda x_, s, c: theta + 0 * x_
    reference = lambda x_, s, c: calls.append(torch.is_grad_enabled()) or v_ref
    log_prob, kl = g2rpo.policy_log_prob_and_kl(policy, cond, x, x_next, sigma, sigma_next, eta,
                                                reference)
    assert calls == [False]  # the reference runs without gradient
    assert kl.shape == (P, S) and log_prob.shape == (P, G)
    torch.testing.assert_close(log_prob, g2rpo.policy_log_prob(policy, cond, x, x_next, sigma,
                                                               sigma_next, eta))
    # Oracle: both SDE steps as torch Normals at the same x, KL per element, mean over D.
    x_flat = x.flatten(0, 1)
    _, _, mean, std = g2rpo.sde_step(x_flat, theta, sigma, sigma_next, eta, prev_sample=x_flat)
    _, _, ref_mean, _ = g2rpo.sde_step(x_flat, v_ref, sigma, sigma_next, eta,
                                       prev_sample=x_flat)
    normal = lambda m: torch.distributions.Normal(m, std.expand_as(m))
    oracle = torch.distributions.kl_divergence(normal(mean), normal(ref_mean.detach()))
    torch.testing.assert_close(kl, oracle.flatten(1).mean(1).view(P, S))
    # Its gradient: autograd of the oracle, and d/dv of c²·(v − v_ref)²/(2·std²) averaged over
    # D, with c = (1 + σ_t²(1 − σ)/(2σ))·Δ the velocity's coefficient in the mean.
    (grad,) = torch.autograd.grad(kl.mean(), theta)
    (oracle_grad,) = torch.autograd.grad(oracle.flatten(1).mean(1).mean(), theta)
    torch.testing.assert_close(grad, oracle_grad)
    s, delta = sigma.item(), (sigma_next - sigma).item()
    sigma_t2 = eta**2 * s / (1 - s)
    c = (1 + sigma_t2 * (1 - s) / (2 * s)) * delta
    var = sigma_t2 * -delta
    closed = c**2 * (theta.detach() - v_ref) / (var * D[0]) / (P * S)
    torch.testing.assert_close(grad, closed, rtol=1e-4, atol=1e-7)


def train_copy(cfg, ref=None, ema=None, model=None, **kw):
    model = model or LinearVelocity()
    history = g2rpo.train(model, model, quadratic_reward, [1, 2, 3, 4], cfg, latent_shape=(3,),
                          log=None, progress=False, ref_velocity_fn=ref, ema=ema, **kw)
    return model, history


def strip(history):
    return [{k: v for k, v in m.items() if k != "seconds"} for m in history]


@pytest.mark.parametrize("method", ["g2rpo", "full_sde"])
def test_the_loss_gains_beta_times_kl_ref(method):
    """One step per iteration, so the whole first update sees the same weights: loss(β) − loss(0)
    = β·kl_ref on the same rollout (the KL's gradient: the closed-form test above)."""
    base = LinearVelocity()
    ref = copy.deepcopy(base).requires_grad_(False)
    with torch.no_grad():
        for p in base.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(2)))
    first = {}
    for beta in (0.0, 0.5):
        cfg = small_config(method=method, kl_beta=beta, step_per_branch=False)
        first[beta] = train_copy(cfg, ref, model=copy.deepcopy(base))[1][0]
    m0, m = first[0.0], first[0.5]
    assert "kl_ref" not in m0 and m["kl_ref"] > 0
    assert m["loss"] == pytest.approx(m0["loss"] + 0.5 * m["kl_ref"], rel=1e-5, abs=1e-8)


def test_beta_zero_is_the_trainer_without_a_reference_bit_for_bit():
    def never(*a):
        raise AssertionError("the reference was called with kl_beta = 0")

    cfg = small_config(num_iterations=3)
    a, ha = train_copy(cfg)
    b, hb = train_copy(cfg, ref=never)
    assert strip(ha) == strip(hb) and "kl_ref" not in ha[0]
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("step_per_branch", [False, True])
def test_kl_ref_is_zero_while_the_policy_is_the_reference(step_per_branch):
    model = LinearVelocity()
    ref = copy.deepcopy(model).requires_grad_(False)
    seen = []

    def reference(x, sigma, c):
        seen.append(g2rpo.gaussian_kl(model(x, sigma, c).detach(), ref(x, sigma, c),
                                      torch.tensor(1.0)).max().item())
        return ref(x, sigma, c)

    cfg = small_config(kl_beta=1.0, step_per_branch=step_per_branch, num_iterations=2)
    _, history = train_copy(cfg, reference)
    assert seen[0] == 0.0  # the first training pass: the same weights, exactly 0
    if not step_per_branch:  # every step of the first update sees the initial weights
        assert history[0]["kl_ref"] == 0.0
    assert history[1]["kl_ref"] > 0  # the policy has moved


def test_missing_reference_or_ema_is_refused_before_any_rollout():
    calls = []
    model = LinearVelocity()
    velocity = lambda *a: calls.append(1) or model(*a)
    cases = [
        (dict(kl_beta=0.1), {}, ValueError, "kl_beta = 0.1 needs ref_velocity_fn"),
        (dict(ema_decay=0.9), {}, ValueError, r"ema_decay = 0.9 needs ema=EMA\(model, 0.9\)"),
        (dict(), dict(ema=g2rpo.EMA(model, 0.9)), ValueError, "cfg.ema_decay is 0"),
        (dict(ema_decay=0.5), dict(ema=g2rpo.EMA(model, 0.9)), ValueError,
         "decay 0.9 differs from cfg.ema_decay 0.5"),
        (dict(ema_decay=0.9), dict(ema=g2rpo.EMA(LinearVelocity(), 0.9)), ValueError,
         "averages other parameters"),
        (dict(kl_beta=0.1), dict(ref_velocity_fn="model"), TypeError, "must be callable"),
    ]
    for cfg_kw, kw, error, match in cases:
        with pytest.raises(error, match=match):
            g2rpo.train(model, velocity, quadratic_reward, [1], small_config(**cfg_kw),
                        latent_shape=(3,), log=None, progress=False, **kw)
    assert calls == []


@pytest.mark.parametrize("kw,match", [
    (dict(kl_beta=-0.1), "kl_beta must be >= 0, got -0.1"),
    (dict(kl_beta=float("nan")), "kl_beta must be finite, got nan"),
    (dict(ema_decay=1.0), r"ema_decay must be in \[0, 1\) \(0: off\), got 1.0"),
    (dict(ema_decay=-0.5), r"ema_decay must be in \[0, 1\)"),
    (dict(ema_decay=True), r"ema_decay must be a number, got True \(bool\)"),
])
def test_guard_rail_config_values_are_checked(kw, match):
    with pytest.raises(g2rpo.ConfigError, match=match) as e:
        g2rpo.Config(**kw)
    assert e.value.field == next(iter(kw))


# ----------------------------------------------------------------------------------------------
# EMA: the formula, swapping in and out, resuming.


class RecordingAdamW(torch.optim.AdamW):
    """AdamW that keeps a copy of the weights after every step."""

    def __init__(self, params, **kw):
        super().__init__(params, **kw)
        self.after = []

    def step(self, closure=None):
        out = super().step(closure)
        self.after.append([p.detach().clone() for g in self.param_groups for p in g["params"]])
        return out


def test_ema_follows_the_formula_after_every_optimizer_step():
    model = LinearVelocity()
    start = [p.detach().clone().double() for p in model.parameters()]
    d = 0.8
    ema = g2rpo.EMA(model, d)
    opt = RecordingAdamW(list(model.parameters()), lr=1e-2)
    cfg = small_config(ema_decay=d, num_iterations=2)  # 4 branch steps: 8 optimizer steps
    train_copy(cfg, ema=ema, model=model, optimizer=opt)
    assert len(opt.after) == 2 * len(cfg.branch_steps)
    expected = start
    for weights in opt.after:
        expected = [d * e + (1 - d) * w.double() for e, w in zip(expected, weights)]
    for a, e in zip(ema.averages, expected):
        torch.testing.assert_close(a.double(), e, rtol=1e-6, atol=1e-7)
    assert not any(torch.equal(a, p) for a, p in zip(ema.averages, model.parameters()))


def test_ema_applied_swaps_the_averages_in_and_back_bit_for_bit():
    model = LinearVelocity()
    ema = g2rpo.EMA(model, 0.5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update()
    own = [p.detach().clone() for p in model.parameters()]
    averages = [a.clone() for a in ema.averages]
    with pytest.raises(KeyError):
        with ema.applied():
            for p, a in zip(model.parameters(), averages):
                assert torch.equal(p, a)
            with pytest.raises(RuntimeError, match="already active"):
                with ema.applied():
                    pass
            raise KeyError("an evaluation failed")
    for p, o, a, b in zip(model.parameters(), own, ema.averages, averages):
        assert torch.equal(p, o) and torch.equal(a, b)


def test_ema_of_bf16_weights_keeps_float32_averages_that_do_not_stall():
    # d = 0.99: each update moves the average by 1 % of its distance to the weights, below
    # bf16's resolution (2⁻⁸ relative) for a small gap; in bf16 the average would never move.
    model = torch.nn.Linear(64, 64).to(torch.bfloat16).requires_grad_(True)
    ema = g2rpo.EMA(model, 0.99)
    start = [a.clone() for a in ema.averages]
    assert all(a.dtype == torch.float32 for a in ema.averages)
    stalled = [p.detach().clone() for p in model.parameters()]  # a bf16 average, for contrast
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.01)  # the weights move by 1 %: the average should move by 0.01 % a step
    for _ in range(10):
        ema.update()
        with torch.no_grad():
            for s, p in zip(stalled, model.parameters()):
                s.mul_(0.99).add_(p, alpha=0.01)
    for a, a0, s, p, in zip(ema.averages, start, stalled, model.parameters()):
        expected = a0 + (1 - 0.99**10) * (p.float() - a0)  # the closed form of 10 updates
        torch.testing.assert_close(a, expected, rtol=1e-5, atol=1e-7)
        assert (a == a0).float().mean() < 0.01  # every average moved (but exact zeros)
        assert (s.float() == a0).float().mean() > 0.5  # most bf16 averages would not have
    # applied(): the model holds the averages rounded to bf16, then its own weights bit for
    # bit; the float32 averages come out unchanged.
    own, averages = [p.detach().clone() for p in model.parameters()], [a.clone() for a in
                                                                       ema.averages]
    with ema.applied():
        for p, a in zip(model.parameters(), averages):
            assert p.dtype == torch.bfloat16 and torch.equal(p, a.bfloat16())
    for p, o, a, b in zip(model.parameters(), own, ema.averages, averages):
        assert torch.equal(p, o) and torch.equal(a, b)


def test_ema_resumes_bit_for_bit():
    """3 iterations straight == 1, then a fresh model, optimizer, EMA and generator loaded
    from saved state dicts, then 2 more: weights and averages equal bit for bit."""
    cfg = small_config(ema_decay=0.9, num_iterations=3)

    def fresh():
        model = LinearVelocity()
        return (model, torch.optim.AdamW(model.parameters(), lr=cfg.lr),
                g2rpo.EMA(model, 0.9), torch.Generator().manual_seed(cfg.seed))

    model, opt, ema, gen = fresh()
    train_copy(cfg, ema=ema, model=model, optimizer=opt, generator=gen)
    straight = [a.clone() for a in ema.averages], [p.detach().clone() for p in model.parameters()]

    model, opt, ema, gen = fresh()
    cfg.num_iterations = 1
    train_copy(cfg, ema=ema, model=model, optimizer=opt, generator=gen)
    saved = copy.deepcopy((model.state_dict(), opt.state_dict(), ema.state_dict(),
                           gen.get_state()))
    model, opt, ema, gen = fresh()
    model.load_state_dict(saved[0])
    opt.load_state_dict(saved[1])
    ema.load_state_dict(saved[2])
    gen.set_state(saved[3])
    cfg.num_iterations = 3
    train_copy(cfg, ema=ema, model=model, optimizer=opt, generator=gen, start_iteration=1)
    for a, b in zip(straight[0], ema.averages):
        assert torch.equal(a, b)
    for a, b in zip(straight[1], model.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="missing"):
        ema.load_state_dict({})


# ----------------------------------------------------------------------------------------------
# The toy: a proxy reward that can be gamed, and the gold one.


def test_the_proxy_equals_the_gold_reward_up_to_the_peak_and_keeps_rising_past_it():
    centre = toy_flow.mode_centres()[0, 0]  # class 0, its best sub-mode
    outward = centre / centre.norm()
    peak = toy_flow.REWARD_OFFSET
    r = torch.tensor([-0.3, 0.0, 0.15, peak, peak + 0.3, peak + 0.6, peak + 1.2])
    x = centre + r[:, None] * outward
    c = torch.zeros(len(r), dtype=torch.long)
    gold, proxy = toy_flow.reward(x, c), toy_flow.proxy_reward(x, c)
    inside = r <= peak
    torch.testing.assert_close(proxy[inside], gold[inside])
    assert (proxy[~inside].diff() > 0).all() and (gold[~inside].diff() < 0).all()
    torch.testing.assert_close(proxy[~inside],
                               1 + toy_flow.PROXY_SLOPE * (r[~inside] - peak), rtol=1e-3,
                               atol=1e-3)  # the other modes add next to nothing out there


def test_the_toy_reference_is_a_frozen_copy_that_never_changes(monkeypatch):
    base = toy_flow.pretrain(steps=50, progress=False)
    pristine = copy.deepcopy(base.state_dict())
    made, original = [], toy_flow.frozen_copy
    monkeypatch.setattr(toy_flow, "frozen_copy", lambda m: made.append(original(m)) or made[-1])
    model, result = toy_flow.run(base, "g2rpo", seed=0, num_iterations=3, eval_every=3,
                                 progress=False, reward="proxy", kl_beta=1.0)
    (ref,) = made
    assert all(not p.requires_grad for p in ref.parameters()) and not ref.training
    for k, v in ref.state_dict().items():
        assert torch.equal(v, pristine[k]), k  # neither trained nor shared with the policy
    assert any(not torch.equal(v, pristine[k]) for k, v in model.state_dict().items())
    assert result["history"][-1]["kl_ref"] > 0


def test_a_toy_run_with_ema_returns_and_evaluates_the_averages_and_trains_as_without():
    base = toy_flow.pretrain(steps=50, progress=False)
    model, result = toy_flow.run(base, "g2rpo", seed=0, num_iterations=3, eval_every=1,
                                 progress=False, ema_decay=0.9)
    _, plain = toy_flow.run(base, "g2rpo", seed=0, num_iterations=3, eval_every=1,
                            progress=False)
    end = result["curve"][-1]
    assert end == {**end, **toy_flow.evaluate(model, shift=toy_flow.TOY["shift"])}
    assert set(end) >= {"reward", "proxy", "fidelity", "live"}
    # The EMA changes what is evaluated, not how the weights train.
    assert [p["live"] for p in result["curve"]] == [
        {k: p[k] for k in ("reward", "proxy", "fidelity")} for p in plain["curve"]]
    assert end["live"]["reward"] != end["reward"]


def test_the_guard_rails_study_reports_gold_proxy_and_fidelity_with_intervals(tmp_path, capsys):
    toy_flow.main(["--guard-rails", "0,2", "--seeds", "2", "--iterations", "4",
                   "--pretrain-steps", "50", "--cache-dir", str(tmp_path / "cache"), "--out",
                   str(tmp_path / "study.png")])
    out = capsys.readouterr().out
    assert "| β | EMA | gold reward at 4 | 95% CI |  (2 seeds, trained on the proxy)" in out
    for beta in ("0", "2"):
        for ema in ("0", "0.99"):
            assert f"\n| {beta} | {ema} | " in out
    number, ci = r"\d\.\d{4}", r"\[-?\d\.\d{4}, -?\d\.\d{4}\]"

    assert re.search(rf"\| 2 \| 0\.99 \| [\d.]+ \| {ci} \| {number} \| {ci} \| [\d.e+-]+ \|", out)
    assert re.search(rf"\| 0 \| 0 \| [\d.]+ \| {ci} \| {number} \| {ci} \| – \|", out)
    assert (tmp_path / "study.png").is_file()
    rows = (tmp_path / "study.jsonl").read_text().splitlines()
    assert len(rows) == 2 * 2 * 4  # β × seeds × iterations: EMA on and off share the runs
