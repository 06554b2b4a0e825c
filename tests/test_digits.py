"""The digits adapter: its data, its learned rewards, its sampler, a short run, its command line.

One pretrained flow (a short pretraining, cached in a temporary folder) and one set of judges
(the proxy, the gold and the fidelity measures, built once per process) serve the whole module.
"""

import dataclasses
import json

import pytest
import torch

import g2rpo
from worlds import digits_flow, studies


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A pretrained digits flow (1,500 Adam steps: recognisable digits, ~6 s)."""
    torch.manual_seed(0)
    return digits_flow.load_or_pretrain(tmp_path_factory.mktemp("digits"), steps=1500,
                                        progress=False)


# ----------------------------------------------------------------------------------------------
# Data.


def test_splits_have_the_expected_shapes_values_and_do_not_overlap():
    from sklearn.datasets import load_digits

    parts = {name: digits_flow.load_split(name) for name in digits_flow.SPLITS}
    for name, (x, y) in parts.items():
        assert x.shape == (digits_flow.SPLITS[name], 64) and x.dtype == torch.float32
        assert y.shape == (digits_flow.SPLITS[name],) and y.dtype == torch.int64
        assert x.min() == -1 and x.max() == 1  # 17 grey levels 0..16 → -1 .. 1 in steps of 1/8
        assert torch.equal(x * 8, (x * 8).round()) and set(y.tolist()) == set(range(10))
    rows = torch.cat([x for x, _ in parts.values()])
    data = load_digits()
    full = torch.tensor(data.data, dtype=torch.float32) / 8 - 1
    assert len(rows) == len(full) == 1797
    # together the splits are the data set, each digit once (sorted rows match)
    key = lambda t: sorted(map(tuple, t.tolist()))
    assert key(rows) == key(full)
    with pytest.raises(ValueError, match="split must be one of"):
        digits_flow.load_split("test")


# ----------------------------------------------------------------------------------------------
# The preference and the reward models.


def test_slant_and_crispness_are_what_they_say():
    x, _ = digits_flow.load_split("gold")
    img = x.view(-1, 8, 8)
    # a vertical bar is upright; shearing it right (top to the right) gives slant > 0
    bar = torch.full((1, 8, 8), -1.0)
    bar[0, 1:7, 3] = 1
    leaning = torch.full((1, 8, 8), -1.0)
    for row in range(1, 7):
        leaning[0, row, 3 + (6 - row) // 2] = 1
    assert digits_flow.slant(bar.view(1, 64)).abs().item() < 1e-6
    assert digits_flow.slant(leaning.view(1, 64)).item() > 0.3
    assert digits_flow.upright(bar.view(1, 64)).item() == pytest.approx(1.0)
    # crispness: 1 for a binary image, lower with grey; the data sits well below 1
    assert digits_flow.crisp(bar.view(1, 64)).item() == 1.0
    assert digits_flow.crisp(torch.zeros(1, 64)).item() == 0.0
    assert 0.3 < digits_flow.crisp(img.view(-1, 64)).mean().item() < 0.6


def test_gold_classifier_knows_real_digits_and_refuses_non_digits():
    gold = digits_flow.Classifier("gold")
    x, y = digits_flow.load_split("heldout")  # digits it never saw
    p = gold.probs(x)
    assert p.shape == (len(x), 11) and torch.allclose(p.sum(1), torch.ones(len(x)))
    assert (p.argmax(1) == y).float().mean() > 0.9
    noise = torch.randn(50, 64, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    assert (gold.probs(noise).argmax(1) == 10).all()  # "not a digit"
    blended = (x[:50] + x[50:100]) / 2
    assert gold.prob_of(blended, y[:50]).mean() < 0.6 < gold.prob_of(x[:50], y[:50]).mean()


def test_reward_models_are_deterministic_for_a_seed():
    x, y = digits_flow.load_split("heldout")
    small = dict(steps=30, batch=64, rounds=1, adversarial=50)
    a, b = digits_flow.Proxy(seed=3, **small), digits_flow.Proxy(seed=3, **small)
    assert torch.equal(a(x, y), b(x, y))
    assert not torch.equal(a(x, y), digits_flow.Proxy(seed=4, **small)(x, y))
    gold = digits_flow.Preference("gold")
    assert torch.equal(gold(x, y), digits_flow.Preference("gold")(x, y))
    r = gold(x, y)
    assert ((0 <= r) & (r <= 1)).all()


@pytest.mark.parametrize("images, classes, message", [
    (torch.zeros(4, 63), [0, 1, 2, 3], "images must be a tensor"),
    (torch.zeros(4, 7, 7), [0, 1, 2, 3], "images must be a tensor"),
    (torch.full((2, 64), 1.5), [0, 1], r"must lie in \[-1, 1\]"),
    (torch.full((2, 64), float("nan")), [0, 1], "must be finite"),
    (torch.zeros(2, 64), [0, 1, 2], "classes must be 2 integer ids"),
    (torch.zeros(2, 64), [0, 10], r"classes must lie in 0..9"),
    (torch.zeros(2, 64), torch.tensor([0.0, 1.0]), "integer ids"),
])
def test_reward_models_refuse_bad_input(images, classes, message):
    gold, proxy, fidelity = digits_flow.judges()
    for judge in (gold, proxy, fidelity):
        with pytest.raises(ValueError, match=message):
            judge(images, classes)


def test_proxy_tracks_gold_on_digits_it_never_saw():
    gold, proxy, _ = digits_flow.judges()
    x, y = digits_flow.load_split("heldout")
    x = digits_flow.perturb(x, torch.Generator().manual_seed(1))
    wrong = (y + 1) % 10
    r = torch.corrcoef(torch.stack([gold(x, y), proxy(x, y)]))[0, 1]
    assert r > 0.7
    assert proxy(x, wrong).mean() < 0.5 * proxy(x, y).mean()  # the class matters to it


# ----------------------------------------------------------------------------------------------
# The flow and its sampler.


def test_the_eta_zero_sampler_is_the_ode_exactly(base):
    c = torch.arange(10).repeat_interleave(3)
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(len(c), 64, generator=g)
    sigmas = g2rpo.sigma_schedule(16, 1.0)
    with torch.no_grad():
        for i in range(16):
            x = g2rpo.ode_step(x, base(x, sigmas[i].expand(len(x)), c), sigmas[i], sigmas[i + 1])
    assert torch.equal(digits_flow.samples(base, c), x.clamp(-1, 1))
    # and an SDE step anywhere changes the samples: the sampler is not ignoring sde_steps
    sde = studies.sde_samples(base, c, {3}, num_steps=16, shift=1.0, seed=1234)
    assert not torch.allclose(sde, x)


def test_pretrained_flow_draws_the_requested_digits(base):
    m = digits_flow.evaluate(base)
    assert m["accuracy"] > 0.8  # the held-out classifier recognises most ODE samples
    assert 0.7 < m["nn_data"] < 1.5  # about as far from real digits as real digits are
    assert m["nn_train"] > 0.7  # not copies of the flow's training digits
    assert m["gold"] < 0.6  # well below the preference's maximum of 1


def test_load_or_pretrain_uses_its_cache(tmp_path):
    a = digits_flow.load_or_pretrain(tmp_path, steps=20, progress=False)
    files = list(tmp_path.glob("digits_flow_*.pt"))
    assert len(files) == 1 and not list(tmp_path.glob("*.tmp"))
    b = digits_flow.load_or_pretrain(tmp_path, steps=20, progress=False)
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())


# ----------------------------------------------------------------------------------------------
# Training.


def test_a_short_run_raises_the_proxy_and_evaluation_does_not_change_training(base):
    short = dict(num_iterations=6, prompts_per_iteration=8, progress=False)
    model, r = digits_flow.run(base, "g2rpo", 0, eval_every=1, **short)
    start, end = r["curve"][0], r["curve"][-1]
    assert len(r["curve"]) == 7 and end["proxy"] > start["proxy"] + 0.05
    quiet, _ = digits_flow.run(base, "g2rpo", 0, eval_every=10**9, **short)
    assert all(torch.equal(v, quiet.state_dict()[k]) for k, v in model.state_dict().items())


def test_scale_matched_control_multiplies_the_advantages_before_the_clip():
    r = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    one = g2rpo.multi_granularity_advantages(r, adv_clip=5.0)
    torch.testing.assert_close(g2rpo.multi_granularity_advantages(r, 5.0, scale=3.0), 3 * one)
    clipped = g2rpo.multi_granularity_advantages(r, adv_clip=2.0, scale=3.0)
    assert clipped.abs().max() == 2.0
    cfg = digits_flow.digits_config("g2rpo", **studies.mgai_arms()["w/o MGAI ×3"])
    assert cfg.granularities == (1,) and cfg.adv_scale == 3.0 and cfg.adv_clip == 5.0
    with pytest.raises(g2rpo.ConfigError, match="adv_scale must be > 0"):
        digits_flow.digits_config("g2rpo", adv_scale=0.0)


def test_granularity_statistics_are_consistent(base):
    score = lambda x, c: digits_flow.judges()[1](digits_flow.to_image(x), c)
    out = studies.granularity_disagreement(base, score, 10, prompts=10, branch_steps=(0, 4))
    for lam in (2, 3):
        assert 0 <= out["disagree"][lam] <= 0.5 and 0 <= out["disagree_not_small"][lam] <= 1
    assert 0 < out["scale"] <= 3 + 1e-6


# ----------------------------------------------------------------------------------------------
# The command line.


@pytest.mark.parametrize("argv, message", [
    (["--seeds", "0"], "--seeds must be >= 1, got 0"),
    (["--eta", "0"], "--eta: eta must be > 0"),
    (["--adv-scale", "-1"], "--adv-scale: adv_scale must be > 0"),
    (["--method", "mixgrpo", "--granularities", "1,2"],
     "--granularities is not used by --method mixgrpo"),
    (["--study", "hacking", "--kl-beta", "1"], "--study hacking sets --kl-beta"),
    (["--study", "hacking", "--kl-betas", "0,-1"], "every β must be >= 0"),
    (["--study", "credit", "--method", "all"], "runs one --method (not all)"),
    (["--study", "mgai", "--adv-clip", "2"], "--study mgai sets --adv-clip itself"),
    (["--study", "mgai-settings", "--branch-steps", "0,1"], "sets --branch-steps itself"),
    (["--study", "mgai", "--method", "mixgrpo"], "--method must be g2rpo"),
    (["--study", "mgai-verdict", "--granularities", "1"], "mgai-verdict sets --granularities"),
    (["--out", "/nonexistent/x.png"], "does not exist"),
])
def test_cli_checks_its_flags_before_training(tmp_path, capsys, argv, message):
    cache = tmp_path / "cache"
    with pytest.raises(SystemExit) as e:
        digits_flow.main([*argv, "--cache-dir", str(cache)])
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not cache.exists()  # stopped before pretraining


def test_cli_has_one_flag_per_config_field_and_runs_the_main_job(tmp_path, capsys):
    with pytest.raises(SystemExit):
        digits_flow.main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for field in dataclasses.fields(g2rpo.Config):
        if field.name != "method":  # --method chooses it
            flag = {"num_iterations": "--iterations"}.get(field.name,
                                                          "--" + field.name.replace("_", "-"))
            assert flag in help_text
    out = tmp_path / "run.png"
    digits_flow.main(["--pretrain-steps", "30", "--cache-dir", str(tmp_path / "cache"), "--out",
                      str(out), "--iterations", "2", "--group-size", "4", "--branch-steps",
                      "0,5", "--prompts-per-iteration", "4"])
    printed = capsys.readouterr().out
    assert "g2rpo seed 0: gold" in printed and " -> " in printed
    rows = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1]
    assert all(r["nfe"] == g2rpo.count_model_evals(16, (0, 5), (1, 2, 3), 4) * 4 for r in rows)
    assert out.is_file() and out.stat().st_size > 10_000
