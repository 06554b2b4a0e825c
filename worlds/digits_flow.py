"""G²RPO on real images a laptop can train: the 8×8 handwritten digits, scored by learned rewards.

The data are scikit-learn's `load_digits` (1,797 digits, 8×8, 17 grey levels; bundled, no
download), cut once into three disjoint parts: FLOW (the flow and the proxy reward learn from it),
GOLD (the gold reward's classifier) and HELD-OUT (the fidelity measures). A class-conditional
flow (prompt = the digit to draw) is pretrained by flow matching and cached on disk; then
g2rpo.train fine-tunes it against a preference for

  * upright digits: the slant of the strokes (the shear of the ink's second moments), a global
    shape decision settled at high noise; and
  * crisp strokes: pixels at full ink or none rather than grey, a detail settled at low noise;

both multiplied by a classifier's probability of the requested digit, so that drawing every
class as one upright, crisp glyph does not pay. The run trains on the PROXY, a small network
regressed on that preference over real and perturbed FLOW digits (its class term from a
classifier fit on FLOW); the GOLD is the definition itself with its class term from a classifier
fit on GOLD, which neither the flow nor the proxy saw. Fidelity: a third classifier's accuracy
(fit on HELD-OUT) and the nearest-neighbour distance of samples to real digits, relative to the
data's own (and to the flow's training digits, which shows memorisation).

    python -m worlds.digits_flow                         # G²RPO, one seed: before -> after, a PNG
    python -m worlds.digits_flow --method all --seeds 10 # the comparison tables (docs/digits.md)
    python -m worlds.digits_flow --study mgai --seeds 30 # what MGAI's gain comes from
    python -m worlds.digits_flow --study mgai-verdict --seeds 80  # its deciding arms, more seeds
    python -m worlds.digits_flow --study mgai-settings --seeds 10  # where granularities disagree
    python -m worlds.digits_flow --study credit          # the credited step's share of the spread
    python -m worlds.digits_flow --study hacking --seeds 10  # gold vs proxy, KL β, EMA, pictures
"""

import argparse
import dataclasses
import functools
import hashlib
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import g2rpo
from worlds import studies
from worlds.studies import ci_text, mean_ci, paired_difference

NUM_CLASSES = 10
SIDE = 8  # images are SIDE × SIDE, flattened to D = 64 in [-1, 1] (-1: no ink)
DIM = SIDE * SIDE
SPLIT_SEED = 0
SPLITS = {"flow": 1000, "gold": 400, "heldout": 397}  # disjoint; 1,797 in all
SLANT_WIDTH = 0.1  # upright(x) = exp(−slant² / (2·0.1²)); the data's slant has std 0.12
CRISP_FLOOR = 0.5  # crisp(x) = (mean x² − 0.5) / 0.5, clipped to [0, 1]; the data's: ~0.43

# The digits' hyper-parameters: the toy's (a log-prob averaged over D = 64, not ~1e5 elements).
DIGITS = dict(shift=1.0, clip_range=1e-2, lr=1e-4, weight_decay=1e-4, prompts_per_iteration=16,
              num_iterations=60, batch_size=1 << 16, window_every=8)
METHODS = {
    "full_sde": dict(method="full_sde"),
    "mixgrpo": dict(method="mixgrpo"),
    "g2rpo_wo_mgai": dict(method="g2rpo", granularities=(1,)),
    "g2rpo": dict(method="g2rpo", granularities=(1, 2, 3)),
}


def digits_config(method="g2rpo", seed=0, **overrides):
    """g2rpo.Config for the digits: the official recipe with the digits' clip, lr and batch."""
    return g2rpo.Config(**{**DIGITS, **METHODS[method], "seed": seed, **overrides})


# ----------------------------------------------------------------------------------------------
# Data.


@functools.lru_cache(maxsize=None)
def load_split(name):
    """(images (N, 64) float32 in [-1, 1], labels (N,) int64) of one part of the digits:
    "flow", "gold" or "heldout" (a fixed permutation, cut in the sizes of SPLITS)."""
    if name not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {name!r}")
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 8 - 1  # grey levels 0..16 → [-1, 1]
    y = torch.tensor(data.target, dtype=torch.int64)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(SPLIT_SEED))
    start = sum(SPLITS[s] for s in list(SPLITS)[:list(SPLITS).index(name)])
    index = order[start:start + SPLITS[name]]
    return x[index], y[index]


def check_images(x, classes=None):
    """Refuse what is not a batch of digits: (N, 64) or (N, 8, 8), finite, in [-1, 1], with N
    class ids in 0..9. Returns x as (N, 64) float32 and the classes as int64."""
    if not torch.is_tensor(x) or x.dim() not in (2, 3) or tuple(x.shape[1:]) not in (
            (DIM,), (SIDE, SIDE)):
        shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
        raise ValueError(f"images must be a tensor (N, {DIM}) or (N, {SIDE}, {SIDE}), got {shape}")
    x = x.reshape(len(x), DIM).float()
    if not torch.isfinite(x).all():
        raise ValueError("images must be finite, got NaN or inf")
    lo, hi = x.min().item(), x.max().item()
    if lo < -1 - 1e-4 or hi > 1 + 1e-4:
        raise ValueError(f"images must lie in [-1, 1] (clamp samples with to_image first), got "
                         f"values in [{lo:.3g}, {hi:.3g}]")
    if classes is None:
        return x
    classes = torch.as_tensor(classes)
    if classes.shape != (len(x),) or classes.dtype.is_floating_point:
        raise ValueError(f"classes must be {len(x)} integer ids, got {tuple(classes.shape)} "
                         f"{classes.dtype}")
    if len(classes) and not (0 <= classes.min() and classes.max() < NUM_CLASSES):
        raise ValueError(f"classes must lie in 0..{NUM_CLASSES - 1}, got "
                         f"{sorted(set(classes.tolist()))}")
    return x, classes.long()


def to_image(x):
    """Samples (N, 64) → images: clamped to the data's range [-1, 1], as a VAE's decode clamps."""
    return x.clamp(-1, 1)


# ----------------------------------------------------------------------------------------------
# The preference, its classifiers, the proxy and the fidelity measures.


def slant(x):
    """(N, 64) → (N,): columns the ink moves right per row upward, from its second moments
    (0: upright; the data: −0.04 ± 0.12)."""
    w = ((x + 1) / 2).view(-1, SIDE, SIDE).clamp_min(0)  # ink weights, (N, 8, 8)
    r = torch.arange(SIDE, dtype=x.dtype).view(1, SIDE, 1)  # row (down)
    c = torch.arange(SIDE, dtype=x.dtype).view(1, 1, SIDE)  # column (right)
    m = w.sum((1, 2)).clamp_min(1e-6)
    r0 = (w * r).sum((1, 2)) / m
    c0 = (w * c).sum((1, 2)) / m
    var_r = (w * (r - r0.view(-1, 1, 1)) ** 2).sum((1, 2)) / m
    cov = (w * (r - r0.view(-1, 1, 1)) * (c - c0.view(-1, 1, 1))).sum((1, 2)) / m
    return -cov / var_r.clamp_min(1e-6)


def upright(x):
    """(N, 64) → (N,) in [0, 1]: the coarse half of the preference, exp(−slant² / (2·w²))."""
    return torch.exp(-slant(x) ** 2 / (2 * SLANT_WIDTH**2))


def crisp(x):
    """(N, 64) → (N,) in [0, 1]: the fine half, (mean x² − 0.5) / 0.5 clipped; 1 when every
    pixel is full ink or none, lower the more grey there is."""
    return (((x**2).mean(1) - CRISP_FLOOR) / (1 - CRISP_FLOOR)).clamp(0, 1)


def shape(x):
    """Images → their ink shape, tanh(3x) / tanh(3): grey pulled toward full ink or none, so
    that distances compare strokes, not grey levels (the preference asks for crisp strokes)."""
    return torch.tanh(3 * x) / math.tanh(3)


class Classifier:
    """An open-set nearest-neighbour classifier fit on one split: p(c | x) ∝ Σ_{i in class c}
    exp(−|shape(x) − shape(x_i)|² / (2h²)), against an eleventh outcome, "not a digit", that
    weighs as one digit at distance r. h is a third of the split's median nearest-neighbour
    distance, r its 99th percentile: a real digit gets p(its class) ~0.9, an average of two
    digits ~0.4, noise 0. A linear classifier would not do: RL finds glyphs it is sure of."""

    def __init__(self, split):
        x, self.labels = load_split(split)
        self.split, self.refs = split, shape(x)
        d = torch.cdist(self.refs, self.refs)
        d.fill_diagonal_(float("inf"))
        nn_dist = d.min(dim=1).values
        self.h, self.r = nn_dist.median().item() / 3, nn_dist.quantile(0.99).item()

    def probs(self, x):
        """(N, 64) images → (N, 11): the 10 classes' probabilities, then "not a digit"."""
        x = check_images(x)
        log_k = -torch.cdist(shape(x), self.refs) ** 2 / (2 * self.h**2)  # (N, M)
        log_s = torch.stack([torch.logsumexp(log_k[:, self.labels == c], 1)
                             for c in range(NUM_CLASSES)], 1)  # (N, 10)
        none = torch.full((len(x), 1), -self.r**2 / (2 * self.h**2))
        return torch.softmax(torch.cat([log_s, none], 1), 1)

    def prob_of(self, x, classes):
        """(N,) probability of each image's requested class."""
        x, classes = check_images(x, classes)
        return self.probs(x).gather(1, classes[:, None])[:, 0]


class Preference:
    """The preference's definition: p(c | x) · (upright(x) + crisp(x)) / 2, in [0, 1], with
    p from a Classifier fit on `split`. GOLD is Preference("gold")."""

    def __init__(self, split):
        self.classifier = Classifier(split)

    def __call__(self, x, classes):
        x, classes = check_images(x, classes)
        return self.classifier.prob_of(x, classes) * (upright(x) + crisp(x)) / 2


def perturb(x, generator):
    """Real digits → digits as a writer or a scanner might have drawn them: sheared (changes the
    slant), blurred (greyer) or sharpened (crisper), noisy; each image gets a random mix."""
    n = len(x)
    u = lambda: torch.rand(n, 1, generator=generator)
    img = x.view(n, 1, SIDE, SIDE)
    shear = (torch.rand(n, generator=generator) - 0.5) * 0.8  # columns per row, ±0.4
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1
    theta[:, 0, 1] = shear
    grid = F.affine_grid(theta, img.shape, align_corners=False)
    img = F.grid_sample(img + 1, grid, align_corners=False, padding_mode="zeros") - 1
    blur = F.avg_pool2d(F.pad(img, (1, 1, 1, 1), value=-1), 3, stride=1).view(n, DIM)
    x = img.view(n, DIM)
    kind = torch.rand(n, 1, generator=generator)
    blurred = x + u() * (blur - x)
    k = 1 + 3 * u()
    sharpened = torch.tanh(k * x) / torch.tanh(k)
    x = torch.where(kind < 1 / 3, blurred, torch.where(kind < 2 / 3, sharpened, x))
    x = x + 0.3 * u() * torch.randn(n, DIM, generator=generator)
    return x.clamp(-1, 1)


class ProxyNet(nn.Module):
    """r_φ(x, c) in [0, 1]: two 3×3 convolutions on the 8×8 image, then an MLP on [features,
    one-hot class]."""

    def __init__(self, channels=32, hidden=128):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(1, channels, 3, padding=1), nn.SiLU(),
                                  nn.Conv2d(channels, channels, 3, padding=1, stride=2), nn.SiLU())
        self.head = nn.Sequential(nn.Linear(channels * 16 + NUM_CLASSES, hidden), nn.SiLU(),
                                  nn.Linear(hidden, 1))

    def forward(self, x, classes):
        h = self.conv(x.view(-1, 1, SIDE, SIDE)).flatten(1)  # (N, C·4·4)
        h = torch.cat([h, F.one_hot(classes, NUM_CLASSES).to(x)], 1)
        return torch.sigmoid(self.head(h)[:, 0])  # the preference's range, [0, 1]


def proxy_pool(x, y, size, generator):
    """`size` (image, class) pairs to regress the proxy on: FLOW digits perturbed; a quarter
    blended with another digit (neither well drawn); a tenth replaced by noise (no digit at
    all); each paired with its own class (p ~ 0.7) or another one (what a wrong digit scores)."""
    g = generator
    i = torch.randint(len(x), (size,), generator=g)
    xs = perturb(x[i], g)
    blend = torch.rand(size, 1, generator=g) < 0.25
    w = 0.3 + 0.4 * torch.rand(size, 1, generator=g)
    xs = torch.where(blend, w * xs + (1 - w) * xs.roll(1, 0), xs)
    junk = torch.rand(size, 1, generator=g) < 0.1
    noise = torch.randn(size, DIM, generator=g)
    noise = torch.where(torch.rand(size, 1, generator=g) < 0.5, noise.sign(), noise.clamp(-1, 1))
    xs = torch.where(junk, noise, xs)
    other = torch.randint(NUM_CLASSES, (size,), generator=g)
    return xs, torch.where(torch.rand(size, generator=g) < 0.7, y[i], other)


def proxy_ascent(net, x, c, steps=20, step_size=0.05):
    """Images the proxy likes more than it should: signed-gradient ascent on r_φ from x."""
    x = x.clone()
    for _ in range(steps):
        x.requires_grad_(True)
        grad, = torch.autograd.grad(net(x, c).sum(), x)
        x = (x.detach() + step_size * grad.sign()).clamp(-1, 1)
    return x.detach()


class Proxy:
    """The reward a run trains on: ProxyNet regressed (MSE) on Preference("flow") over a pool
    of FLOW pairs (proxy_pool). After each of `rounds` fits the pool gains images found by
    gradient ascent on the proxy itself (proxy_ascent), scored by the definition: a reward
    model hardened where it was easiest to fool, as reward models are patched in practice,
    and still a model that RL can game. Fit in ~23 s (2 Xeon cores); deterministic for a seed."""

    def __init__(self, steps=600, batch=256, lr=2e-3, rounds=3, adversarial=2000, seed=0):
        x, y = load_split("flow")
        definition = Preference("flow")
        g = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        self.net = ProxyNet()
        xs, cs = proxy_pool(x, y, 20 * len(x), g)
        targets = definition(xs, cs)  # the classifier is called once per pool image
        for r in range(rounds + 1):
            opt = torch.optim.Adam(self.net.parameters(), lr=lr)
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
            for _ in range(steps):
                j = torch.randint(len(xs), (batch,), generator=g)
                loss = F.mse_loss(self.net(xs[j], cs[j]), targets[j])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
            if r < rounds:
                j = torch.randint(len(xs), (adversarial,), generator=g)
                found = proxy_ascent(self.net, xs[j], cs[j])
                xs, cs = torch.cat([xs, found]), torch.cat([cs, cs[j]])
                targets = torch.cat([targets, definition(found, cs[j])])
        self.net.requires_grad_(False).eval()

    @torch.no_grad()
    def __call__(self, x, classes):
        x, classes = check_images(x, classes)
        return self.net(x, classes)


def nn_distance(x, reference):
    """(N,) Euclidean distance of each image to its nearest image in `reference` (M, 64)."""
    return torch.cdist(x, reference).min(dim=1).values


class Fidelity:
    """What the run never trains on: a classifier fit on HELD-OUT (accuracy on the requested
    class; "not a digit" counts as wrong) and nearest-neighbour distances between ink shapes.
    nn_data: mean distance to the nearest HELD-OUT digit, over the same for FLOW digits (1: as
    close to real digits as real digits are). nn_train: mean distance to the nearest FLOW
    digit, over the same for HELD-OUT digits (well below 1: the samples copy the flow's
    training digits)."""

    def __init__(self):
        self.classifier = Classifier("heldout")
        self.flow, self.heldout = shape(load_split("flow")[0]), shape(load_split("heldout")[0])
        self.data_to_heldout = nn_distance(self.flow, self.heldout).mean().item()
        self.heldout_to_flow = nn_distance(self.heldout, self.flow).mean().item()

    def __call__(self, x, classes):
        x, classes = check_images(x, classes)
        accuracy = (self.classifier.probs(x).argmax(1) == classes).float().mean().item()
        x = shape(x)
        return {"accuracy": accuracy,
                "nn_data": nn_distance(x, self.heldout).mean().item() / self.data_to_heldout,
                "nn_train": nn_distance(x, self.flow).mean().item() / self.heldout_to_flow}


@functools.lru_cache(maxsize=None)
def judges(proxy_seed=0):
    """(gold, proxy, fidelity): the three measures, built once per process (~25 s on 2 cores,
    nearly all of it the proxy's fit)."""
    return Preference("gold"), Proxy(seed=proxy_seed), Fidelity()


def reward_fn(samples, prompts, which="proxy"):
    """The g2rpo reward interface: samples (N, 64), prompts (N class ids) → (N,)."""
    gold, proxy, _ = judges()
    return {"gold": gold, "proxy": proxy}[which](to_image(samples),
                                                 torch.as_tensor(prompts, device=samples.device))


# ----------------------------------------------------------------------------------------------
# The flow model and its pretraining.


class DigitsFlow(nn.Module):
    """v_θ(x, σ, c): an MLP on [pixels, Fourier(σ), class embedding] (4 hidden layers of 256)."""

    dim = DIM

    def __init__(self, hidden=256, num_freqs=8, class_dim=32):
        super().__init__()
        self.register_buffer("freqs", 2.0 ** torch.arange(num_freqs) * math.pi)
        self.embed = nn.Embedding(NUM_CLASSES, class_dim)
        self.net = nn.Sequential(
            nn.Linear(DIM + 2 * num_freqs + class_dim, hidden), nn.SiLU(),
            nn.Linear(hidden, hidden), nn.SiLU(),
            nn.Linear(hidden, hidden), nn.SiLU(),
            nn.Linear(hidden, hidden), nn.SiLU(),
            nn.Linear(hidden, DIM),
        )

    def forward(self, x, sigma, c):
        s = sigma[:, None] * self.freqs  # (N, F)
        return self.net(torch.cat([x, s.sin(), s.cos(), self.embed(c)], dim=-1))  # (N, 64)


def pretrain(steps=3000, batch=256, lr=1e-3, seed=0, progress=True):
    """Flow matching on the FLOW digits: x_σ = (1 − σ)·x0 + σ·ε, regress v on ε − x0."""
    x_data, y_data = load_split("flow")
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = DigitsFlow()

    def sample(n):
        i = torch.randint(len(x_data), (n,), generator=g)
        return x_data[i], y_data[i]

    return studies.flow_matching(model, sample, steps, batch, lr, g, progress,
                                 "pretrain digits flow")


def load_or_pretrain(cache_dir=".cache", steps=3000, seed=0, retrain=False, progress=True):
    """The pretrained digits flow, from cache_dir if a matching file exists, else trained and
    saved (atomically)."""
    x, y = load_split("flow")
    data = hashlib.sha1(x.numpy().tobytes() + y.numpy().tobytes()).hexdigest()[:10]
    spec = json.dumps(dict(steps=steps, seed=seed, data=data, hidden=256,
                           torch=torch.__version__.split("+")[0]), sort_keys=True)
    path = Path(cache_dir) / f"digits_flow_{hashlib.sha1(spec.encode()).hexdigest()[:10]}.pt"

    def load(state):
        model = DigitsFlow()
        model.load_state_dict(state)
        return model.eval()

    build = lambda: pretrain(steps=steps, seed=seed, progress=progress)
    return studies.cached(path, build, load, rebuild=retrain)


velocity_fn = studies.velocity_fn


def frozen_copy(model):
    """The reference policy for the KL term: a copy of `model` that no optimizer sees."""
    ref = DigitsFlow()
    ref.load_state_dict(model.state_dict())
    return ref.requires_grad_(False).eval()


# ----------------------------------------------------------------------------------------------
# Evaluation and runs.

EVAL_PER_CLASS = 30  # ODE samples per digit in every evaluation (300 in all, fixed noise)


@torch.no_grad()
def samples(model, classes, seed=1234, shift=1.0):
    """Images (N, 64) of the ODE (η = 0) from fixed noise for the given classes."""
    return to_image(studies.ode_samples(model, torch.as_tensor(classes), shift=shift, seed=seed))


def evaluate(model, per_class=EVAL_PER_CLASS, seed=1234, shift=1.0):
    """Gold, proxy and fidelity of ODE samples on fixed noise, with the preference's halves."""
    c = torch.arange(NUM_CLASSES).repeat_interleave(per_class)
    x = samples(model, c, seed, shift)
    gold, proxy, fidelity = judges()
    return {"gold": gold(x, c).mean().item(), "proxy": proxy(x, c).mean().item(),
            **fidelity(x, c), "upright": upright(x).mean().item(), "crisp": crisp(x).mean().item()}


def run(base_model, method="g2rpo", seed=0, eval_every=10, progress=True, log=None,
        reward="proxy", keep_live=False, **overrides):
    """Fine-tune a copy of base_model with one method against `reward` ("proxy", the learned
    reward; "gold", the definition itself); returns (model, result dict). Every curve point
    reports gold, proxy and fidelity. With kl_beta > 0 the reference is a frozen copy of
    base_model; with ema_decay > 0 the curve and the returned model hold the EMA weights (the
    trained ones under "live", and in result["live"] with keep_live)."""
    if reward not in ("proxy", "gold"):
        raise ValueError(f"reward must be proxy or gold, got {reward!r}")
    cfg = digits_config(method, seed, **overrides)
    torch.manual_seed(seed)
    model = DigitsFlow()
    model.load_state_dict(base_model.state_dict())
    reference = frozen_copy(base_model) if cfg.kl_beta > 0 else None
    result = studies.fine_tune(model, cfg, functools.partial(evaluate, shift=cfg.shift),
                               velocity_fn(model), functools.partial(reward_fn, which=reward),
                               list(range(NUM_CLASSES)), (DIM,),
                               reference and velocity_fn(reference), eval_every, progress, log,
                               keep_live=keep_live)
    return model, {"method": method, "seed": seed, "reward": reward,
                   "config": dataclasses.asdict(cfg), **result}


# ----------------------------------------------------------------------------------------------
# The studies.

COMPARED = (("g2rpo", "full_sde"), ("g2rpo", "mixgrpo"), ("g2rpo", "g2rpo_wo_mgai"),
            ("g2rpo_wo_mgai", "full_sde"))
REPORTED = ("gold", "proxy", "accuracy", "nn_data", "nn_train")


def cell(values, key=None):
    """'mean [95% CI]' over seeds: Student t, or for accuracy (a proportion) a bootstrap
    interval, which stays inside [0, 1]."""
    if key == "accuracy":
        return studies.proportion_text(values)
    return f"{mean_ci(values)[0]:.4f} {ci_text(values)}"


def comparison_tables(table, pretrained=None):
    """Markdown: per method the final gold, proxy and fidelity (mean, 95 % CI over seeds) and
    its cost; the same at the largest budget of model evaluations every method reaches; the
    paired differences of gold (same seeds) at the end and at that budget."""
    final = {m: {k: [r["curve"][-1][k] for r in rs] for k in REPORTED} for m, rs in table.items()}
    budget = min(r["evals"] for rs in table.values() for r in rs)
    same = {m: {k: [studies.at_budget(r, budget, k) for r in rs] for k in REPORTED}
            for m, rs in table.items()}
    first = next(iter(table.values()))
    head = " | ".join(f"{k} [95% CI]" for k in REPORTED)
    lines = [f"| method | {head} | model evals / iteration |  ({len(first)} seeds, "
             f"{first[0]['config']['num_iterations']} iterations)",
             "|---|" + "---|" * (len(REPORTED) + 1)]
    if pretrained is not None:
        lines.append("| pretrained | " + " | ".join(f"{pretrained[k]:.4f}" for k in REPORTED)
                     + " | – |")
    for m, rs in table.items():
        h = rs[0]["history"][0]
        lines.append(f"| {m} | " + " | ".join(cell(final[m][k], k) for k in REPORTED)
                     + f" | {h['nfe'] + h['train_rows']:,} |")
    lines += ["", f"| method | gold at {budget:,} model evals [95% CI] | proxy [95% CI] | "
                  f"accuracy [95% CI] | iterations used |  (the largest budget all reach)",
              "|---|---|---|---|---|"]
    for m, rs in table.items():
        per_it = rs[0]["evals"] / rs[0]["config"]["num_iterations"]
        lines.append(f"| {m} | {cell(same[m]['gold'])} | {cell(same[m]['proxy'])} | "
                     f"{cell(same[m]['accuracy'], 'accuracy')} | {budget / per_it:.1f} |")
    pairs = [(a, b) for a, b in COMPARED if a in table and b in table]
    if pairs and len(first) > 1:
        lines += ["", "| paired difference of gold (same seeds) | at the end | 95% CI | | at the "
                      "same budget | 95% CI | |", "|---|---|---|---|---|---|---|"]
        for a, b in pairs:
            lines.append(f"| {a} − {b} | "
                         + " | ".join(paired_difference(final[a]["gold"], final[b]["gold"]))
                         + " | "
                         + " | ".join(paired_difference(same[a]["gold"], same[b]["gold"]))
                         + " |")
    return "\n".join(lines)


def mgai_table(base_model, seeds, shift=1.0):
    """Markdown: how often λ = 2, 3 disagree with λ = 1 in sign (overall, and where
    |A_λ=1| > 0.5) and MGAI's scale, under the proxy on the pretrained flow; mean and 95 % CI
    over `seeds` rollouts of 64 prompts × 8 branch steps × 12 members."""
    score = lambda x, c: judges()[1](to_image(x), c)
    rows = [studies.granularity_disagreement(base_model, score, NUM_CLASSES, shift=shift, seed=s)
            for s in seeds]
    def cell(values):
        m, h = mean_ci(values)
        return f"{m:.1%} [{max(m - h, 0):.1%}, {m + h:.1%}]"

    lines = ["| sign disagreement with λ = 1 | λ = 2 [95% CI] | λ = 3 [95% CI] |",
             "|---|---|---|"]
    for key, name in (("disagree", "all members"), ("disagree_not_small", "where \\|A_λ=1\\| > 0.5")):
        lines.append(f"| {name} | " + " | ".join(cell([r[key][lam] for r in rows])
                                                  for lam in (2, 3)) + " |")
    scale = [r["scale"] for r in rows]
    lines.append(f"\nMGAI's summed advantage is {mean_ci(scale)[0]:.2f} {ci_text(scale)} times one "
                 f"granularity's (mean |A|; 3 if all agreed and none were clipped).")
    return "\n".join(lines)


def mgai_runs(base_model, seeds, reward="proxy", arms=None, **overrides):
    """`arms` (default: all of studies.mgai_arms) on the digits (G²RPO's recipe otherwise), the
    same seeds for every arm, evaluated at the end: {arm: [result per seed]}."""
    train = lambda seed, **arm: run(base_model, "g2rpo", seed, eval_every=10**9, progress=False,
                                    reward=reward, **{**overrides, **arm})[1]
    return studies.mgai_study(train, seeds, arms or studies.mgai_arms())


# Where the granularities might disagree more than at the default (T = 16, Λ = {1, 2, 3}):
# fewer sampling steps, so a coarse completion is a rougher approximation, or coarser strides.
MGAI_SETTINGS = {
    "T = 16, Λ = {1, 2, 3} (default)": dict(),
    "T = 8, Λ = {1, 2, 3}, branch steps 0–3": dict(num_steps=8, branch_steps=(0, 1, 2, 3)),
    "T = 16, Λ = {1, 4, 8}": dict(granularities=(1, 4, 8)),
}


def mgai_settings_table(base_model, seeds, settings=MGAI_SETTINGS, reward="proxy", **overrides):
    """Markdown (studies.mgai_settings): per setting the granularities' sign disagreement under
    the proxy on the pretrained flow and MGAI's effect over w/o MGAI and over the pure-clip arm."""
    score = lambda x, c: judges()[1](to_image(x), c)
    table = {}
    for name, setting in settings.items():
        setting = {**overrides, **setting}
        cfg = digits_config("g2rpo", **setting)
        train = lambda seed, setting=setting, **arm: run(
            base_model, "g2rpo", seed, eval_every=10**9, progress=False, reward=reward,
            **{**setting, **arm})[1]
        disagreement = lambda cfg=cfg: studies.granularity_disagreement(
            base_model, score, NUM_CLASSES, cfg.granularities, cfg.branch_steps, shift=cfg.shift,
            num_steps=cfg.num_steps)
        table[name] = (train, disagreement, cfg.granularities)
    return studies.mgai_settings(table, seeds, "gold")


def credit_table(base_model, seeds, branch_steps=tuple(range(8)), shift=1.0):
    """Markdown: per branch step k, the share of a group's proxy-reward spread that the noise of
    step k explains (a first-order Sobol index) when every branch step is an SDE step (full-SDE)
    and when k is the only one (singular: 1 by construction); mean and 95 % CI over seeds (a
    bootstrap interval: a share stays inside [0, 1])."""
    score = lambda x, c: judges()[1](to_image(x), c)
    classes = list(range(NUM_CLASSES))
    lines = ["| branch step k | σ_k | full-SDE: share explained by step k [95% CI] | singular "
             "(1 by construction; computed as a check) |", "|---|---|---|---|"]
    sigmas = g2rpo.sigma_schedule(16, shift)
    for k in branch_steps:
        full = [studies.credited_noise_share(base_model, k, set(branch_steps), classes, score,
                                             shift=shift, seed=s) for s in seeds]
        single = studies.credited_noise_share(base_model, k, {k}, classes, score, shift=shift,
                                              seed=seeds[0])
        lines.append(f"| {k} | {sigmas[k]:.3f} | {studies.proportion_text(full, 3)} | "
                     f"{single:.3f} |")
    return "\n".join(lines)


HACKING_BETAS = (0.0, 1.0, 10.0)
HACKING_ITERATIONS = 120  # twice the default run
HACKING_EMA = 0.99  # per optimizer step: 8 per iteration, a horizon of ~12 iterations
HACKING_AT = (20, 40, 60, 80, 100, 120)


def hacking_study(base_model, betas, seeds, method="g2rpo", ema_decay=HACKING_EMA, eval_every=20,
                  **overrides):
    """Train on the proxy with each β over `seeds`, evaluating the trained weights (EMA off) and
    their EMA (on; it does not change training, so both come from the same runs). Returns
    ({(β, decay or 0): [result per seed]}, {(β, decay): the first seed's final model})."""
    from tqdm.auto import tqdm

    runs, models = {}, {}
    overrides.setdefault("num_iterations", HACKING_ITERATIONS)
    with tqdm(total=len(betas) * len(seeds), desc="hacking study", dynamic_ncols=True) as bar:
        for beta in betas:
            bar.set_postfix_str(f"β = {beta:g}")
            for seed in seeds:
                model, r = run(base_model, method, seed, eval_every=eval_every, progress=False,
                               kl_beta=beta, ema_decay=ema_decay, keep_live=True, **overrides)
                studies.add_ema_rows(runs, beta, r, ema_decay)
                if seed == seeds[0]:
                    models[(beta, 0.0)], models[(beta, ema_decay)] = r["live"], model
                bar.update()
    return runs, models


def hacking_tables(runs):
    """Markdown: gold at HACKING_AT (those the runs reach), then proxy and fidelity at the end."""
    first = next(iter(runs.values()))
    end = first[0]["curve"][-1]["iteration"]
    at = [i for i in HACKING_AT if i < end] + [end]
    point = lambda r, i: next(p for p in r["curve"] if p["iteration"] == i)
    lines = ["| β | EMA | " + " | ".join(f"gold at {i}" for i in at)
             + f" |  (mean [95% CI], {len(first)} seeds, trained on the proxy)",
             "|---|---|" + "---|" * len(at)]
    for (beta, decay), rs in runs.items():
        lines.append(f"| {beta:g} | {decay:g} | "
                     + " | ".join(cell([point(r, i)["gold"] for r in rs]) for i in at) + " |")
    lines += ["", f"| β | EMA | peak gold (any evaluation) | proxy at {end} | accuracy at {end} "
                  f"| nn_data at {end} |", "|---|---|---|---|---|---|"]
    for (beta, decay), rs in runs.items():
        peak = [max(p["gold"] for p in r["curve"]) for r in rs]
        lines.append(f"| {beta:g} | {decay:g} | {cell(peak)} | "
                     + " | ".join(cell([r["curve"][-1][k] for r in rs], k)
                                  for k in ("proxy", "accuracy", "nn_data")) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Figures: digits are pictures.


def tile(images, cols):
    """(N, 64) images in [-1, 1] → one (rows·9 − 1, cols·9 − 1) array of 8×8 tiles, ink dark,
    one light pixel between tiles."""
    images = images.reshape(-1, SIDE, SIDE)
    rows = math.ceil(len(images) / cols)
    sheet = torch.full((rows * (SIDE + 1) - 1, cols * (SIDE + 1) - 1), -1.0)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        sheet[r * (SIDE + 1):r * (SIDE + 1) + SIDE, c * (SIDE + 1):c * (SIDE + 1) + SIDE] = img
    return (-sheet).numpy()  # matplotlib's grey: high = light, so ink (+1) → dark


def show_samples(ax, model, title, per_class=6, seed=7, shift=1.0):
    """A grid of ODE samples: one row per digit 0..9, `per_class` fixed noises each."""
    c = torch.arange(NUM_CLASSES).repeat_interleave(per_class)
    ax.imshow(tile(samples(model, c, seed, shift), per_class), cmap="gray", vmin=-1, vmax=1)
    ax.set(title=title, xticks=[], yticks=[])


def interval(values, key=None):
    """(mean, lo, hi) over seeds, as `cell` prints it: Student t, or for accuracy a bootstrap
    interval; one value: (value, value, value)."""
    if key == "accuracy":
        m, lo, hi = studies.proportion_ci(values)
    else:
        m, h = mean_ci(values)
        lo, hi = m - h, m + h
    return (m, m, m) if math.isnan(lo) else (m, lo, hi)


def band(ax, x, runs, key, label, **style):
    """The mean over runs of curve[key] against x, with its 95 % CI (`interval`) as a band."""
    mean, lo, hi = torch.tensor([interval([r["curve"][j][key] for r in runs], key)
                                 for j in range(len(x))]).T
    line, = ax.plot(x, mean, label=label, **style)
    ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.15)


def figure(panels, curves, path, command, curve_keys=("gold", "proxy", "accuracy", "nn_data")):
    """Sample grids (`panels`: [(title, model)]) above curves (`curves`: {label: [results]}),
    mean and 95 % CI over seeds; the command that regenerates it written under it."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = max(len(panels), len(curve_keys))
    fig, grid = plt.subplots(2, cols, figsize=(3.3 * cols, 7.4), squeeze=False)
    for ax in [*grid[0][len(panels):], *grid[1][len(curve_keys):]]:
        ax.axis("off")
    for ax, (title, model) in zip(grid[0], panels):
        show_samples(ax, model, title)
    titles = {"gold": "gold (held-out definition)", "proxy": "proxy (trained on)",
              "accuracy": "held-out classifier accuracy", "nn_data": "NN distance / data's own"}
    for ax, key in zip(grid[1], curve_keys):
        for label, rs in curves.items():
            band(ax, [p["iteration"] for p in rs[0]["curve"]], rs, key,
                 label if len(rs) == 1 else f"{label} ({len(rs)} seeds)")
        ax.set(title=titles.get(key, key), xlabel="iteration")
    grid[1][0].legend(fontsize=7)
    fig.text(0.5, 0.005, command, ha="center", fontsize=8, family="monospace")
    fig.tight_layout(rect=(0, 0.025, 1, 1))
    fig.savefig(path, dpi=80)
    plt.close(fig)


def hacking_figure(runs, models, path, command):
    """Gold and proxy against iterations for every (β, EMA), and what the samples look like
    at the end for seed 0: gamed (β = 0, EMA off) against each guard rail."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, grid = plt.subplots(2, max(3, len(models)), figsize=(3.3 * max(3, len(models)), 7.4),
                             squeeze=False)
    betas = list(dict.fromkeys(beta for beta, _ in runs))
    colours = plt.get_cmap("viridis")(torch.linspace(0, 0.9, len(betas)).tolist())
    for ax, key in zip(grid[0], ("gold", "proxy", "accuracy")):
        for (beta, decay), rs in runs.items():
            band(ax, [p["iteration"] for p in rs[0]["curve"]], rs, key,
                 f"β = {beta:g}" + (f", EMA {decay:g}" if decay else ""),
                 color=colours[betas.index(beta)], ls="--" if decay else "-")
        ax.set(title=f"{key} (trained on the proxy)", xlabel="iteration")
    grid[0][0].legend(fontsize=7)
    for ax in grid[0][3:]:
        ax.axis("off")
    for ax, ((beta, decay), model) in zip(grid[1], models.items()):
        end = runs[(beta, decay)][0]["curve"][-1]
        show_samples(ax, model, f"β {beta:g}, EMA {decay:g}: gold {end['gold']:.2f}, "
                                f"proxy {end['proxy']:.2f}")
        ax.title.set_fontsize(8)
    for ax in grid[1][len(models):]:
        ax.axis("off")
    fig.text(0.5, 0.005, command, ha="center", fontsize=8, family="monospace")
    fig.tight_layout(rect=(0, 0.025, 1, 1))
    fig.savefig(path, dpi=80)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# The command line.

# Config fields with a flag name of their own, or none (--method picks the method).
FLAG_NAMES = {"num_iterations": ("--iterations", "--num-iterations"), "method": None}
STUDIES = ("credit", "hacking", "mgai", "mgai-verdict", "mgai-settings")
# Config fields each study sets itself, per arm or per setting: a flag for one is refused.
STUDY_SETS = {"mgai": ("granularities", "adv_clip", "adv_scale"),
              "mgai-verdict": ("granularities", "adv_clip", "adv_scale"),
              "mgai-settings": ("granularities", "adv_clip", "adv_scale", "num_steps",
                                "branch_steps")}


def parse_args(argv=None):
    """The digits' flags (one per g2rpo.Config field, generated from it), all checked before
    anything is trained: errors name the flag and the value."""
    p = argparse.ArgumentParser(prog="python -m worlds.digits_flow", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--method", default="g2rpo", choices=[*METHODS, "all"],
      help="which method (all: each, and the comparison tables) (default: g2rpo)")
    a("--study", choices=STUDIES, default=None,
      help="credit: the credited step's share of a group's reward spread; hacking: gold vs "
           "proxy over a long run with --kl-betas and EMA off / on; mgai: the arms that separate "
           "what MGAI's gain comes from; mgai-verdict: only the three of them that carry the "
           "verdict (G²RPO, w/o MGAI, the pure clip), for more seeds in the same time; "
           "mgai-settings: MGAI where the granularities might disagree more (docs/digits.md)")
    a("--seeds", type=int, default=1,
      help="runs per method, seeds --seed, --seed + 1, ... (tables: 95 %% CIs) (default: 1)")
    a("--out", default="digits_g2rpo.png",
      help="PNG (sample grids and curves); the per-iteration metrics go to the same name with "
           ".jsonl (default: digits_g2rpo.png)")
    a("--cache-dir", default=".cache", help="where the pretrained flow is cached (default: .cache)")
    a("--pretrain-steps", type=int, default=3000, help="Adam steps of pretraining (default: 3000)")
    a("--retrain", action="store_true", help="ignore the cached pretrained flow")
    a("--reward", default="proxy", choices=("proxy", "gold"),
      help="what to train on: proxy, the learned reward model, or gold, the definition with "
           "its held-out classifier; evaluations report both (default: proxy)")
    a("--kl-betas", type=studies.float_tuple, default=HACKING_BETAS, metavar="B1,B2,...",
      help=f"--study hacking: the KL weights β compared (default: "
           f"{','.join(map(str, HACKING_BETAS))}); --ema-decay sets the EMA (default "
           f"{HACKING_EMA}), --iterations the length (default {HACKING_ITERATIONS})")
    a("--verbose", action="store_true", help="print one metrics line per iteration")
    flags = studies.add_config_flags(
        p, digits_config("g2rpo"), FLAG_NAMES, "algorithm (g2rpo.Config; the digits' defaults in "
        "brackets)", {"granularities": "1,2,3 for g2rpo, 1 for g2rpo_wo_mgai"})
    return studies.parse_run_args(p, argv, flags, METHODS, digits_config, _check_study_flags)


def _check_study_flags(p, args):
    """The checks of this file's own flags (studies.parse_run_args runs the shared ones)."""
    if args.study is not None and args.method == "all":
        p.error(f"--study {args.study} runs one --method (not all)")
    if args.study in STUDY_SETS:
        if args.method != "g2rpo":
            p.error(f"--study {args.study} compares G²RPO's arms: --method must be g2rpo")
        for field in STUDY_SETS[args.study]:
            if field in args.overrides:
                flag = "--" + field.replace("_", "-")
                p.error(f"--study {args.study} sets {flag} itself (per arm or setting)")
    if args.study == "hacking":
        if "kl_beta" in args.overrides or args.reward != "proxy":
            p.error("--study hacking sets --kl-beta (each of --kl-betas) and trains on the proxy")
        for beta in args.kl_betas:
            if not (math.isfinite(beta) and beta >= 0):
                p.error(f"--kl-betas: every β must be >= 0 and finite, got {beta}")
        if args.overrides.get("ema_decay", HACKING_EMA) == 0:
            p.error("--study hacking compares EMA off and on: --ema-decay must be > 0")


def describe(m, before=None):
    """One line of metrics; with `before`, each as before -> after."""
    fmt = {"gold": ".4f", "proxy": ".4f", "accuracy": ".3f", "nn_data": ".2f", "nn_train": ".2f"}
    return "  ".join(f"{k} " + (f"{before[k]:{f}} -> " if before else "") + f"{m[k]:{f}}"
                     for k, f in fmt.items())


def main(argv=None):
    args = parse_args(argv)
    studies.set_threads()
    command = "python -m worlds.digits_flow " + " ".join(sys.argv[1:] if argv is None else argv)
    start = time.time()
    base = load_or_pretrain(args.cache_dir, args.pretrain_steps, retrain=args.retrain)
    judges()
    before = evaluate(base)
    print(f"pretrained flow: {describe(before)}  ({time.time() - start:.1f} s)")
    seeds = list(range(args.seed, args.seed + args.seeds))
    metrics_path = Path(args.out).with_suffix(".jsonl")
    if args.study == "credit":
        print(credit_table(base, seeds))
        print(f"(credit study {time.time() - start:.1f} s)")
        return
    if args.study in ("mgai", "mgai-verdict"):
        if args.study == "mgai":
            print(mgai_table(base, seeds))
        arms = studies.mgai_arms() if args.study == "mgai" else studies.verdict_arms()
        print(studies.mgai_tables(mgai_runs(base, seeds, args.reward, arms, **args.overrides),
                                  "gold"))
        print(f"(MGAI study {time.time() - start:.1f} s)")
        return
    if args.study == "mgai-settings":
        print(mgai_settings_table(base, seeds, reward=args.reward, **args.overrides))
        print(f"(MGAI settings {time.time() - start:.1f} s)")
        return
    if args.study == "hacking":
        overrides = dict(args.overrides)
        ema_decay = overrides.pop("ema_decay", HACKING_EMA)
        runs, models = hacking_study(base, args.kl_betas, seeds, args.method, ema_decay,
                                     **overrides)
        print(hacking_tables(runs))
        with open(metrics_path, "w") as f:
            for (beta, decay), rs in runs.items():
                for r in rs if decay else ():  # each run once (both rows share its history)
                    for m in r["history"]:
                        f.write(json.dumps({"kl_beta": beta, "ema_decay": decay,
                                            "seed": r["seed"], **m}) + "\n")
        hacking_figure(runs, models, args.out, command)
        print(f"saved {args.out} and {metrics_path}  (hacking study {time.time() - start:.1f} s)")
        return
    methods = list(METHODS) if args.method == "all" else [args.method]
    table, panels = {}, [("pretrained", base)]
    metrics_path.write_text("")
    for method in methods:
        t0 = time.time()
        for seed in seeds:
            model, r = run(base, method, seed, eval_every=5 if len(methods) > 1 else 10,
                           progress=len(methods) == 1 and args.seeds == 1,
                           log=print if args.verbose else None, reward=args.reward,
                           **args.overrides)
            with open(metrics_path, "a") as f:  # one JSON line per iteration
                for m in r["history"]:
                    f.write(json.dumps({"method": method, "seed": seed, **m}) + "\n")
            print(f"{method} seed {seed}: {describe(r['curve'][-1], before)}  (trained on the "
                  f"{args.reward}; {r['evals']:,} model evals)")
            table.setdefault(method, []).append(r)
            if seed == args.seed:
                panels.append((f"{method} (seed {seed})", model))
        if len(methods) > 1:
            print(f"({method}: {time.time() - t0:.1f} s)")
    if len(methods) > 1 or args.seeds > 1:
        print(comparison_tables(table, before))
    figure(panels, table, args.out, command)
    print(f"saved {args.out} and {metrics_path}  (total {time.time() - start:.1f} s)")


if __name__ == "__main__":
    main()
