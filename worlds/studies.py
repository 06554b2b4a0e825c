"""What the small adapters' studies share: fine-tuning with evaluations along the way, 95 %
intervals over seeds and paired differences, and command-line flags generated from g2rpo.Config.

toy_flow.py (2-D) and worlds/digits_flow.py (8×8 digits) run the same studies on different
worlds; what differs (data, model, rewards, fidelity) lives in them, what is the same lives here.
"""

import argparse
import ast
import contextlib
import copy
import dataclasses
import inspect
import math
import os
import textwrap
from pathlib import Path

import torch

import g2rpo

# ----------------------------------------------------------------------------------------------
# Fine-tuning with evaluations: the curve a study reads.


def fine_tune(model, cfg, evaluate, velocity_fn, reward_fn, prompts, latent_shape,
              ref_velocity_fn=None, eval_every=10, progress=True, log=None, keep_live=False):
    """g2rpo.train on `model` (in place) with `evaluate(model) → {metric: float}` before training,
    every `eval_every` iterations and at the end. With cfg.ema_decay > 0 the evaluations hold the
    EMA weights (and the trained weights' under "live"), and `model` ends holding the EMA
    weights; the EMA does not change training (keep_live: a copy of the trained weights'
    model under "live"). Returns {"curve", "history", "nfe", "evals"}: nfe counts rollout model
    evaluations, evals adds the training passes' rows; each history row gains update_norm, the
    norm of the iteration's change of the trained weights."""
    ema = g2rpo.EMA(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
    weights = ema.applied if ema is not None else contextlib.nullcontext
    start = evaluate(model)
    curve = [dict(iteration=0, nfe=0, evals=0, **start,
                  **({"live": start} if ema is not None else {}))]
    nfe, evals = [0], [0]
    trained = [p for p in model.parameters() if p.requires_grad]
    previous = [torch.cat([p.detach().flatten() for p in trained])]

    def callback(it, m):
        now = torch.cat([p.detach().flatten() for p in trained])
        m["update_norm"] = (now - previous[0]).norm().item()  # ‖θ after − θ before‖ this iteration
        previous[0] = now
        nfe[0] += m["nfe"]  # rollout evaluations
        evals[0] += m["nfe"] + m["train_rows"]  # ... plus the training passes' rows
        if (it + 1) % eval_every == 0 or it + 1 == cfg.num_iterations:
            live = {"live": evaluate(model)} if ema is not None else {}
            with weights():
                curve.append(dict(iteration=it + 1, nfe=nfe[0], evals=evals[0],
                                  **evaluate(model), **live))

    history = g2rpo.train(model, velocity_fn, reward_fn, prompts, cfg, latent_shape=latent_shape,
                          callback=callback, log=log, progress=progress,
                          ref_velocity_fn=ref_velocity_fn, ema=ema)
    live = copy.deepcopy(model) if keep_live else None
    if ema is not None:  # the returned model is the one evaluated: the averages
        model.load_state_dict(ema.state_dict(), strict=False)  # weights only; buffers stay
    return {"curve": curve, "history": history, "nfe": nfe[0], "evals": evals[0],
            **({"live": live} if keep_live else {})}


def cached(path, build, load, rebuild=False):
    """The model saved at `path` (a state dict, read by `load(state_dict)`) if it exists and not
    `rebuild`, else `build()`, saved atomically (a temporary file, then a rename: never a
    half-written file, and the old one stays until the new one is complete)."""
    path = Path(path)
    if path.exists() and not rebuild:
        return load(torch.load(path, map_location="cpu", weights_only=True))
    model = build()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, path)
    return model


def flow_matching(model, sample, steps, batch, lr, generator, progress=True, desc="pretrain"):
    """Pretrain `model` by flow matching: x_σ = (1 − σ)·x0 + σ·ε, σ ~ U(0, 1), regress v on
    ε − x0 (Adam, cosine schedule). sample(batch) → (x0 (B, D), classes (B,))."""
    g = generator
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    it = range(steps)
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(it, desc=desc, dynamic_ncols=True)
    for _ in it:
        x0, c = sample(batch)
        eps = torch.randn(batch, model.dim, generator=g)
        sigma = torch.rand(batch, generator=g)
        x = (1 - sigma[:, None]) * x0 + sigma[:, None] * eps
        loss = ((model(x, sigma, c) - (eps - x0)) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


def set_threads():
    """torch's threads for a command line: OMP_NUM_THREADS when it is set (the tests set 1),
    else as many as the machine has, up to 2."""
    threads = os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(int(threads) if threads else max(1, min(2, os.cpu_count() or 1)))


def velocity_fn(model):
    """The g2rpo velocity interface for a small adapter's model: (x (N, D), σ (N,), classes
    (N,)) → v (N, D)."""
    return lambda x, sigma, c: model(x, sigma, c)


def add_ema_rows(runs, beta, result, ema_decay):
    """File one run trained with an EMA under both rows of its β: (β, 0) reads the trained
    weights' evaluations ("live"), (β, ema_decay) the averages'. The EMA does not change
    training, so one run gives both."""
    live = {**result, "curve": [{**p, **p["live"]} for p in result["curve"]]}
    runs.setdefault((beta, 0.0), []).append(live)
    runs.setdefault((beta, ema_decay), []).append(result)


# ----------------------------------------------------------------------------------------------
# Sampling and measurements on a model v(x (N, D), σ (N,), classes (N,)) with a `dim` attribute;
# score(x, classes) → (N,) is the reward measured.


@torch.no_grad()
def sde_samples(model, classes, sde_steps, eta=0.7, num_steps=16, shift=1.0, seed=1234):
    """Samples with an SDE step at every grid index in sde_steps and ODE steps elsewhere."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(classes), model.dim, generator=g)
    sigmas = g2rpo.sigma_schedule(num_steps, shift)
    for i in range(num_steps):
        v = model(x, sigmas[i].expand(len(x)), classes)
        if i in sde_steps:
            x = g2rpo.sde_step(x, v, sigmas[i], sigmas[i + 1], eta, g)[0]
        else:
            x = g2rpo.ode_step(x, v, sigmas[i], sigmas[i + 1])
    return x


def ode_samples(model, classes, num_steps=16, shift=1.0, seed=1234):
    """Deterministic samples (η = 0) for the given classes from fixed noise."""
    return sde_samples(model, classes, sde_steps=(), num_steps=num_steps, shift=shift, seed=seed)


@torch.no_grad()
def credited_noise_share(model, step, sde_steps, classes, score, outer=16, inner=16, eta=0.7,
                         num_steps=16, shift=1.0, seed=0):
    """Share of the within-group reward variance explained by the noise of one step (first-order
    Sobol index), per condition, averaged over the conditions whose rewards vary:
    Var(E[r | ε_step]) / Var(r).

    Each group shares its initial noise; `outer` draws of ε_step, each finished `inner` times with
    fresh noise at the other SDE steps. Singular sampling is sde_steps = {step} (share 1 by
    construction); full-SDE sampling is sde_steps = the branch steps.
    """
    g = torch.Generator().manual_seed(seed)
    C, A, B = len(classes), outer, inner
    sigmas = g2rpo.sigma_schedule(num_steps, shift)
    c = torch.as_tensor(classes).repeat_interleave(A * B)  # rows (C, A, B)
    D = model.dim
    x = torch.randn(C, 1, 1, D, generator=g).expand(C, A, B, D).reshape(-1, D)
    credited = torch.randn(C, A, 1, D, generator=g).expand(C, A, B, D).reshape(-1, D)
    for i in range(num_steps):
        v = model(x, sigmas[i].expand(len(x)), c)
        if i in sde_steps:
            noise = credited if i == step else torch.randn(x.shape, generator=g)
            x = g2rpo.sde_step(x, v, sigmas[i], sigmas[i + 1], eta, noise=noise)[0]
        else:
            x = g2rpo.ode_step(x, v, sigmas[i], sigmas[i + 1])
    r = score(x, c).view(C, A, B)
    total = r.flatten(1).var(dim=1)  # (C,)
    # Var of the A conditional means, less the part the inner sampling noise adds to it.
    explained = r.mean(2).var(1) - r.var(2).mean(1) / B
    spread = total > 1e-12  # a condition whose rewards do not vary has no share to explain
    return (explained[spread] / total[spread]).clamp(0, 1).mean().item()


@torch.no_grad()
def granularity_disagreement(model, score, num_classes, granularities=(1, 2, 3),
                             branch_steps=tuple(range(8)), prompts=64, group_size=12, eta=0.7,
                             shift=1.0, seed=7, adv_clip=5.0, not_small=0.5, num_steps=16):
    """How much the granularities' group advantages differ, from one singular-sampling rollout of
    `prompts` prompts (classes in turn). Returns {"disagree": {λ: share of (k, prompt, member)
    whose advantage at λ has the opposite sign of λ = 1's}, "disagree_not_small": the same where
    |A_λ=1| > not_small, "scale": mean |clipped Σ_λ A_λ| / mean |A_λ=1| (MGAI's sum against one
    granularity's advantage; |Λ| when they all agree and nothing is clipped)}, on a grid of
    `num_steps` steps."""
    g = torch.Generator().manual_seed(seed)
    c = torch.arange(prompts) % num_classes
    sigmas = g2rpo.sigma_schedule(num_steps, shift)
    velocity = g2rpo.CountingVelocity(model, 1 << 16)
    x_T = torch.randn(prompts, model.dim, generator=g)
    out = g2rpo.singular_stochastic_sampling(velocity, c, x_T, sigmas, branch_steps, granularities,
                                             group_size, eta, g)
    K, L = len(branch_steps), len(granularities)
    members = c.repeat_interleave(group_size).repeat(K * L)
    r = score(out["samples"].reshape(-1, model.dim), members).view(K, L, prompts, group_size)
    adv = g2rpo.group_advantages(r)  # (K, L, P, G)
    summed = g2rpo.multi_granularity_advantages(r.transpose(1, 2), adv_clip,
                                                num_granularities=L)  # (K, P, G)
    big = adv[:, 0].abs() > not_small
    flips = {lam: (adv[:, 0] * adv[:, j]) < 0 for j, lam in enumerate(granularities) if j > 0}
    return {"disagree": {lam: f.float().mean().item() for lam, f in flips.items()},
            "disagree_not_small": {lam: f[big].float().mean().item() for lam, f in flips.items()},
            "scale": (summed.abs().mean() / adv[:, 0].abs().mean().clamp_min(1e-12)).item()}


# ----------------------------------------------------------------------------------------------
# Statistics over seeds.


def at_budget(result, budget, key="reward"):
    """`key` of a run once it has used `budget` model evaluations (rollout + training rows),
    linearly interpolated between its evaluation points."""
    points = result["curve"]
    if budget > points[-1]["evals"]:
        raise ValueError(f"budget {budget:,} is beyond the run's {points[-1]['evals']:,}")
    for a, b in zip(points, points[1:]):
        if b["evals"] >= budget:
            w = (budget - a["evals"]) / (b["evals"] - a["evals"])
            return a[key] + w * (b[key] - a[key])
    return points[0][key]


def mean_std(values):
    t = torch.tensor(values, dtype=torch.float64)
    return f"{t.mean():.4f} ± {t.std() if len(t) > 1 else 0.0:.4f}"


# Two-sided 95 % Student-t quantiles t_{0.975, df} for df = 1..30 (standard tables).
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
        2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
        2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t_quantile_975(df):
    """t_{0.975, df}: the table up to 30, then the Cornish–Fisher expansion around z = 1.96."""
    if df <= len(T975):
        return T975[df - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def mean_ci(values):
    """(mean, half-width of the 95 % confidence interval of the mean), Student t over n values."""
    t = torch.tensor(values, dtype=torch.float64)
    if len(t) < 2:
        return t.mean().item(), float("nan")
    return t.mean().item(), t_quantile_975(len(t) - 1) * t.std().item() / math.sqrt(len(t))


def ci_text(values, signed=False):
    """'[lo, hi]' of the 95 % CI of the mean ('–' for one value); signed for differences."""
    m, h = mean_ci(values)
    f = "+.4f" if signed else ".4f"
    # round first: an end within 5e-5 of 0 prints as 0.0000, not -0.0000
    end = lambda x: f"{round(x, 4) + 0.0:{f}}"
    return "–" if math.isnan(h) else f"[{end(m - h)}, {end(m + h)}]"


def paired_difference(a, b):
    """Mean and 95 % CI of a − b over seeds run on both (a, b lists in the same seed order);
    'excludes 0' only when the interval does."""
    d = [x - y for x, y in zip(a, b)]
    m, h = mean_ci(d)
    verdict = "–" if math.isnan(h) else ("excludes 0" if abs(m) > h else "includes 0")
    return f"{m:+.4f}", ci_text(d, signed=True), verdict


def proportion_ci(values, resamples=10_000, seed=0):
    """(mean, lo, hi): the mean of per-seed proportions (e.g. accuracies) with a 95 % percentile
    bootstrap interval over the seeds, which stays inside [0, 1] where a Student t interval of
    values near 1 runs past it. One value: (value, nan, nan)."""
    t = torch.tensor(values, dtype=torch.float64)
    if len(t) < 2:
        return t.mean().item(), float("nan"), float("nan")
    g = torch.Generator().manual_seed(seed)
    means = t[torch.randint(len(t), (resamples, len(t)), generator=g)].mean(1)
    lo, hi = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return t.mean().item(), lo, hi


def proportion_text(values, digits=4):
    """'0.8817 [0.8419, 0.9215]': proportion_ci as a table cell ('–' for the interval of one)."""
    m, lo, hi = proportion_ci(values)
    return f"{m:.{digits}f} " + ("–" if math.isnan(lo) else f"[{lo:.{digits}f}, {hi:.{digits}f}]")


# ----------------------------------------------------------------------------------------------
# What MGAI's gain comes from. MGAI sums |Λ| group advantages that mostly agree, so besides
# what the coarse completions say it changes the advantages' scale, and with it how often the
# clip at ±adv_clip binds; AdamW's step hardly depends on a constant scale (only through ε and
# the gradient-norm clip). Each arm below switches one of these channels.

NO_CLIP = 1e9  # an advantage clip nothing reaches: |scale·Σ_λ A_λ| <= scale·|Λ|·(G − 1)/√G


def mgai_arms(granularities=(1, 2, 3), adv_clip=5.0):
    """{arm: Config overrides}: G²RPO and G²RPO w/o MGAI, each with the clip on and off; w/o
    MGAI with its advantages ×|Λ| before the clip (the scale MGAI's sum has when the
    granularities agree), with the clip off (scale alone); and w/o MGAI clipped at
    adv_clip/|Λ| (clamp(|Λ|·A, ±c) = |Λ|·clamp(A, ±c/|Λ|): the clip alone)."""
    L = len(granularities)
    one = dict(granularities=(1,))
    return {"G²RPO": dict(granularities=tuple(granularities)),
            "G²RPO, clip off": dict(granularities=tuple(granularities), adv_clip=NO_CLIP),
            "w/o MGAI": one,
            f"w/o MGAI ×{L}": dict(one, adv_scale=float(L)),
            f"w/o MGAI ×{L}, clip off": dict(one, adv_scale=float(L), adv_clip=NO_CLIP),
            f"w/o MGAI, clip {adv_clip:g}/{L}": dict(one, adv_clip=adv_clip / L)}


def pure_clip_arm(granularities=(1, 2, 3), adv_clip=5.0):
    """The name of mgai_arms' last arm: w/o MGAI with the clip that MGAI's scale implies."""
    return list(mgai_arms(granularities, adv_clip))[-1]


def verdict_arms(granularities=(1, 2, 3), adv_clip=5.0):
    """The three of mgai_arms that carry the verdict, G²RPO, w/o MGAI and the pure-clip arm:
    half the runs of all six, so twice the seeds for the same time."""
    every = mgai_arms(granularities, adv_clip)
    return {arm: every[arm] for arm in ("G²RPO", "w/o MGAI",
                                        pure_clip_arm(granularities, adv_clip))}


def mgai_study(train, seeds, arms, progress=True, desc="MGAI arms"):
    """{arm: [train(seed, **overrides) per seed]} for every arm of `arms` (mgai_arms), the same
    seeds in the same order for each (so differences are paired); a progress bar over the runs."""
    from tqdm.auto import tqdm

    runs = {}
    with tqdm(total=len(arms) * len(seeds), desc=desc, disable=not progress,
              dynamic_ncols=True) as bar:
        for arm, overrides in arms.items():
            bar.set_postfix_str(arm)
            runs[arm] = []
            for seed in seeds:
                runs[arm].append(train(seed, **overrides))
                bar.update()
    return runs


def mgai_tables(runs, key, granularities=(1, 2, 3), adv_clip=5.0):
    """Markdown: per arm the final `key` (mean, 95 % CI over seeds) and, averaged over
    iterations and seeds, the share of advantages the clip changed, mean |A|, the gradient norm
    (before its clip) and the update norm ‖Δθ‖ per iteration; then every arm's paired difference
    against w/o MGAI and against G²RPO with its half-width (the smallest difference the study can
    see); then the verdict: MGAI over the pure-clip arm beside MGAI's whole effect."""
    final = {arm: [r["curve"][-1][key] for r in rs] for arm, rs in runs.items()}
    seeds = len(next(iter(runs.values())))
    mean_of = lambda rs, f: sum(sum(f(m) for m in r["history"]) / len(r["history"])
                                for r in rs) / len(rs)
    lines = [f"| arm | {key} [95% CI] | advantages clipped | mean \\|A\\| | grad norm | "
             f"update norm / iteration |  ({seeds} seeds, "
             f"{len(next(iter(runs.values()))[0]['history'])} iterations)",
             "|---|---|---|---|---|---|"]
    for arm, rs in runs.items():
        lines.append(f"| {arm} | {mean_ci(final[arm])[0]:.4f} {ci_text(final[arm])} | "
                     f"{mean_of(rs, lambda m: m['adv_clipped']):.1%} | "
                     f"{mean_of(rs, lambda m: sum(m['adv_abs_k']) / len(m['adv_abs_k'])):.3f} | "
                     f"{mean_of(rs, lambda m: m['grad_norm']):.3f} | "
                     f"{mean_of(rs, lambda m: m['update_norm']):.4f} |")
    if seeds < 2:
        return "\n".join(lines)
    diffs = lambda a, b: [x - y for x, y in zip(final[a], final[b])]
    lines += ["", f"| paired difference of {key} | arm − w/o MGAI | 95% CI | half-width | "
                  f"arm − G²RPO | 95% CI | half-width |", "|---|---|---|---|---|---|---|"]
    pairs = set()
    for arm in runs:
        cells = []
        for ref in ("w/o MGAI", "G²RPO"):
            if arm == ref:
                cells.append("– | – | –")
                continue
            pairs.add(frozenset((arm, ref)))
            m, h = mean_ci(diffs(arm, ref))
            cells.append(f"{round(m, 4) + 0.0:+.4f} | {ci_text(diffs(arm, ref), signed=True)} | "
                         f"±{h:.4f}")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    pure = pure_clip_arm(granularities, adv_clip)
    (whole, _), (beyond, half) = mean_ci(diffs("G²RPO", "w/o MGAI")), mean_ci(diffs("G²RPO", pure))
    verdict = (f"excludes 0: MGAI adds {beyond:+.4f} beyond the clip" if abs(beyond) > half else
               f"includes 0: what MGAI adds beyond the clip is smaller than {half:.4f} at this "
               f"power")
    lines += ["", f"{len(pairs)} distinct paired comparisons over {seeds} seeds, not corrected "
                  f"for their number. The verdict: G²RPO − ({pure}) = {beyond:+.4f} "
                  f"{ci_text(diffs('G²RPO', pure), signed=True)}, which {verdict}; MGAI's "
                  f"whole effect, G²RPO − w/o MGAI, is {whole:+.4f}, and the verdict's interval "
                  f"(width {2 * half:.4f}) is {'narrower' if 2 * half < abs(whole) else 'not narrower'} "
                  f"than it."]
    return "\n".join(lines)


def mgai_settings(settings, seeds, key, adv_clip=5.0):
    """MGAI where its granularities may disagree more. settings: {name: (train, disagreement,
    granularities)}, train(seed, **overrides) → a fine_tune result in that setting and
    disagreement() → granularity_disagreement's dict there. Markdown: per setting how often
    λ > 1 disagrees with λ = 1 in sign (all members / where |A_λ=1| > 0.5), G²RPO's final `key`,
    and G²RPO against w/o MGAI and against the pure-clip arm (paired over `seeds`)."""
    lines = [f"| setting | sign disagreement with λ = 1: all / where \\|A_λ=1\\| > 0.5 | G²RPO "
             f"{key} | G²RPO − w/o MGAI [95% CI] | G²RPO − pure clip [95% CI] | half-width |"
             f"  ({len(seeds)} paired seeds)", "|---|---|---|---|---|---|"]
    for name, (train, disagreement, granularities) in settings.items():
        arms = verdict_arms(granularities, adv_clip)
        final = {arm: [r["curve"][-1][key] for r in rs]
                 for arm, rs in mgai_study(train, seeds, arms, desc=name).items()}
        g2, wo, clip = final.values()
        d = disagreement()
        share = lambda x: "–" if math.isnan(x) else f"{x:.1%}"  # – : no |A_λ=1| > 0.5
        flips = ", ".join(f"λ={lam}: {share(d['disagree'][lam])} / "
                          f"{share(d['disagree_not_small'][lam])}" for lam in d["disagree"])
        over_wo, over_clip = ([x - y for x, y in zip(g2, other)] for other in (wo, clip))
        cell = lambda d: f"{mean_ci(d)[0]:+.4f} {ci_text(d, signed=True)}"
        lines.append(f"| {name} | {flips} | {mean_ci(g2)[0]:.4f} {ci_text(g2)} | {cell(over_wo)} "
                     f"| {cell(over_clip)} | ±{mean_ci(over_clip)[1]:.4f} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Command lines.


def config_field_help():
    """{field: its docstring} from g2rpo.Config's source: the CLI's help cannot drift from it."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(g2rpo.Config)))
    body = tree.body[0].body
    return {node.target.id: " ".join(doc.value.value.split())
            for node, doc in zip(body, body[1:])
            if isinstance(node, ast.AnnAssign) and isinstance(doc, ast.Expr)
            and isinstance(doc.value, ast.Constant) and isinstance(doc.value.value, str)}


def tuple_of(kind, what):
    """An argparse type: comma-separated `what` → a non-empty tuple of `kind`."""

    def parse(s):
        try:
            values = tuple(kind(x) for x in s.split(",") if x.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated {what}, got {s!r}") from None
        if not values:
            raise argparse.ArgumentTypeError(f"expected at least one {what[:-1]}, got {s!r}")
        return values

    return parse


int_tuple, float_tuple = tuple_of(int, "integers"), tuple_of(float, "numbers")


def add_config_flags(parser, defaults, names=None, title="algorithm (g2rpo.Config)",
                     notes=None):
    """One flag per g2rpo.Config field (help from the field's docstring, [default] from
    `defaults`, a Config); `names` maps a field to its flag names, or None for no flag.
    Every flag defaults to None (not given). Returns {field: its first flag name}."""
    names, notes = names or {}, notes or {}
    group = parser.add_argument_group(title)
    docs = config_field_help()
    flags = {}
    for field in dataclasses.fields(g2rpo.Config):
        flag_names = names.get(field.name, ("--" + field.name.replace("_", "-"),))
        if flag_names is None:
            continue
        value = getattr(defaults, field.name)
        default = ",".join(map(str, value)) if isinstance(value, tuple) else value
        default = notes.get(field.name, default)
        kind = {bool: argparse.BooleanOptionalAction, tuple: None}.get(type(value))
        kw = (dict(action=kind) if kind else
              dict(type=int_tuple if isinstance(value, tuple) else type(value)))
        group.add_argument(*flag_names, dest=field.name, default=None,
                           help=f"{docs.get(field.name, '')} [{default}]".replace("%", "%%"), **kw)
        flags[field.name] = flag_names[0]
    return flags


def parse_run_args(parser, argv, flags, methods, make_config, check=None):
    """Parse a small adapter's command line and check it before anything is trained: the
    Config flags given (args.overrides; --seed as args.seed), a flag the method does not use,
    --seeds and --pretrain-steps >= 1, the adapter's own `check(parser, args)`, every method's
    Config (`make_config(method, seed, **overrides)`), --out and --cache-dir writable. Errors
    name the flag and the value."""
    p, args = parser, parser.parse_args(argv)
    args.overrides = {f: getattr(args, f) for f in flags if getattr(args, f) is not None}
    args.seed = args.overrides.pop("seed", 0)
    if args.method != "all":  # a flag the method would silently ignore is refused
        for field in g2rpo.UNUSED_FIELDS[methods[args.method]["method"]]:
            if field in args.overrides:
                p.error(f"{flags[field]} is not used by --method {args.method}")
    for flag, value in (("--seeds", args.seeds), ("--pretrain-steps", args.pretrain_steps)):
        if value < 1:
            p.error(f"{flag} must be >= 1, got {value}")
    if check is not None:
        check(p, args)
    for method in (methods if args.method == "all" else [args.method]):
        try:
            cfg = make_config(method, args.seed, **args.overrides)
        except g2rpo.ConfigError as e:
            p.error(f"{flags.get(e.field, e.field)}: {e}")
        if cfg.num_iterations < 1:
            p.error(f"--iterations must be >= 1, got {cfg.num_iterations}")
    for flag, path in (("--out", Path(args.out).parent), ("--cache-dir", Path(args.cache_dir))):
        existing = next(d for d in (path, *path.parents) if d.exists())
        if flag == "--out" and existing != path:
            p.error(f"--out {args.out!r}: the directory {str(path)!r} does not exist")
        if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            p.error(f"{flag} {str(path)!r}: {str(existing)!r} is not a writable directory")
    if Path(args.out).is_dir():
        p.error(f"--out {args.out!r} is a directory; give a .png file name")
    return args
