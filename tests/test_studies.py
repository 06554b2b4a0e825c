"""The small worlds' studies: the arms that separate what MGAI's gain comes from, the statistics
their tables print, and every table- or figure-printing path of toy_flow.py and
worlds/digits_flow.py run on a tiny budget (two seeds, a few iterations), its rows and columns
checked.
"""

import math
import re

import pytest
import torch

import g2rpo
import toy_flow
from worlds import digits_flow, studies

NUMBER, SIGNED = r"\d\.\d{4}", r"[+-]\d\.\d{4}"
CI, SIGNED_CI = rf"\[{NUMBER}, {NUMBER}\]", rf"\[{SIGNED}, {SIGNED}\]"
TINY = ["--prompts-per-iteration", "2"]  # G = 12: a clip at 5/3 binds (max |A| = 11/√12)


@pytest.fixture(scope="module")
def toy_base():
    return toy_flow.pretrain(steps=300, seed=0, progress=False)


def rows(printed, first_cell):
    """The markdown rows of `printed` whose first cell is `first_cell`, split into cells."""
    return [[c.strip() for c in line.strip("|").split(" | ")] for line in printed.splitlines()
            if line.startswith(f"| {first_cell} |")]


# ----------------------------------------------------------------------------------------------
# The arms isolate what they claim.


def test_the_arms_switch_one_channel_each():
    arms = studies.mgai_arms((1, 2, 3), adv_clip=5.0)
    assert list(arms) == ["G²RPO", "G²RPO, clip off", "w/o MGAI", "w/o MGAI ×3",
                          "w/o MGAI ×3, clip off", "w/o MGAI, clip 5/3"]
    assert arms["w/o MGAI, clip 5/3"] == dict(granularities=(1,), adv_clip=5.0 / 3)
    assert studies.pure_clip_arm((1, 4), 2.0) == "w/o MGAI, clip 2/2"
    # clip off: no advantage can reach NO_CLIP, even scaled (max |A| of a group is (G − 1)/√G)
    r = torch.tensor([[1.0] + [0.0] * 11] * 3)  # (L, G): one outlier, every granularity
    assert g2rpo.multi_granularity_advantages(r, studies.NO_CLIP, scale=3.0).abs().max() == \
        pytest.approx(3 * 3 * 11 / math.sqrt(12), rel=1e-5)
    # clamp(3·A, ±5) = 3·clamp(A, ±5/3): the pure-clip arm is the scaled arm in other units
    one = torch.tensor([[[9.0, 0.0, 1.0, 2.0, 3.0, 4.0, 1.0, 0.5]]])  # (P, L = 1, G)
    scaled = g2rpo.multi_granularity_advantages(one, 5.0, scale=3.0)
    assert scaled.abs().max() == 5.0  # the clip binds
    torch.testing.assert_close(scaled, 3 * g2rpo.multi_granularity_advantages(one, 5.0 / 3))


def test_adamw_hardly_sees_the_scale_and_the_pure_clip_arm_is_the_scaled_one(toy_base):
    """With the gradient-norm clip out of reach, AdamW's step depends on a constant advantage
    scale only through ε: ×3 with the clip off trains almost as w/o MGAI does, and the clip at
    5/3 almost as ×3 with the clip at 5 (2 % of the training change on this CPU), while the clip
    that ×3 makes bind moves the weights 8× as far from w/o MGAI's."""
    arms = studies.mgai_arms()
    short = dict(num_iterations=2, prompts_per_iteration=4, max_grad_norm=1e9,
                 eval_every=10**9, progress=False)
    flat = lambda model: torch.cat([p.detach().flatten() for p in model.parameters()])
    weights = {arm: flat(toy_flow.run(toy_base, "g2rpo", 0, **short, **arms[arm])[0])
               for arm in ("w/o MGAI", "w/o MGAI ×3, clip off", "w/o MGAI ×3",
                           "w/o MGAI, clip 5/3")}
    change = (weights["w/o MGAI"] - flat(toy_base)).norm()
    apart = lambda a, b: ((weights[a] - weights[b]).norm() / change).item()
    scale_alone = apart("w/o MGAI", "w/o MGAI ×3, clip off")
    units = apart("w/o MGAI ×3", "w/o MGAI, clip 5/3")
    assert scale_alone < 0.05 and units < 0.05, (scale_alone, units)
    assert apart("w/o MGAI", "w/o MGAI ×3") > 3 * max(scale_alone, units)


def test_the_history_records_the_clipped_share_and_the_update_norm(toy_base):
    cfg = dict(num_iterations=2, group_size=6, prompts_per_iteration=4, eval_every=10**9,
               progress=False)
    model, r = toy_flow.run(toy_base, "g2rpo", 0, adv_clip=0.5, num_iterations=1,
                            **{k: v for k, v in cfg.items() if k != "num_iterations"})
    (m,) = r["history"]
    change = torch.cat([(v - toy_base.state_dict()[k]).flatten()
                        for k, v in model.state_dict().items()])
    assert m["update_norm"] == pytest.approx(change.norm().item(), rel=1e-5)
    assert 0.2 < m["adv_clipped"] < 1  # a clip at 0.5 touches most standardised advantages
    _, off = toy_flow.run(toy_base, "g2rpo", 0, adv_clip=studies.NO_CLIP, **cfg)
    assert all(m["adv_clipped"] == 0 for m in off["history"])


def test_proportion_intervals_stay_inside_zero_one():
    near_one = [1.0, 0.99, 1.0, 1.0, 0.98]
    m, h = studies.mean_ci(near_one)
    assert m + h > 1  # the t interval runs past 1 ...
    mean, lo, hi = studies.proportion_ci(near_one)
    assert mean == pytest.approx(m) and 0.98 <= lo < mean < hi <= 1.0  # ... the bootstrap's not
    assert studies.proportion_ci(near_one) == (mean, lo, hi)  # deterministic
    assert studies.proportion_text([0.5]) == "0.5000 –"
    # the digits' figures draw the intervals their tables print: the bootstrap for accuracy
    assert digits_flow.interval(near_one, "accuracy") == (mean, lo, hi)
    assert digits_flow.interval(near_one, "gold") == pytest.approx((m, m - h, m + h))
    assert digits_flow.interval([0.5], "accuracy") == (0.5, 0.5, 0.5)


# ----------------------------------------------------------------------------------------------
# The toy's printed studies.


def test_toy_mgai_study_prints_every_arm_with_its_mechanism_and_paired_differences(tmp_path,
                                                                                   capsys):
    toy_flow.main(["--study", "mgai", "--seeds", "2", "--iterations", "2", "--pretrain-steps",
                   "50", "--cache-dir", str(tmp_path), *TINY])
    out = capsys.readouterr().out
    assert "sign disagreement with λ = 1" in out
    for arm in studies.mgai_arms():
        (final,) = rows(out, arm)[:1]
        assert re.fullmatch(rf"{NUMBER} {CI}", final[1]), final
        clipped = float(final[2].rstrip("%")) / 100
        assert (clipped == 0) == ("clip off" in arm or arm == "w/o MGAI"), (arm, final)
        assert float(final[3]) > 0 and float(final[5]) > 0  # mean |A|, update norm
        paired = rows(out, arm)[1]
        assert len(paired) == 7
        for c in range(1, 7, 3):
            assert paired[c:c + 3] == ["–", "–", "–"] or (
                re.fullmatch(SIGNED, paired[c]) and re.fullmatch(SIGNED_CI, paired[c + 1])
                and re.fullmatch(rf"±{NUMBER}", paired[c + 2])), paired
    assert "9 distinct paired comparisons over 2 seeds" in out
    assert re.search(rf"G²RPO − \(w/o MGAI, clip 5/3\) = {SIGNED} {SIGNED_CI}, which "
                     rf"(excludes|includes) 0", out)


def test_toy_mgai_verdict_runs_only_the_three_deciding_arms(tmp_path, capsys):
    toy_flow.main(["--study", "mgai-verdict", "--seeds", "2", "--iterations", "1",
                   "--pretrain-steps", "50", "--cache-dir", str(tmp_path), *TINY])
    out = capsys.readouterr().out
    verdict = studies.verdict_arms()
    assert list(verdict) == ["G²RPO", "w/o MGAI", "w/o MGAI, clip 5/3"]
    assert all(verdict[arm] == studies.mgai_arms()[arm] for arm in verdict)
    for arm in studies.mgai_arms():
        assert len(rows(out, arm)) == (2 if arm in verdict else 0), arm
    assert "3 distinct paired comparisons over 2 seeds" in out
    assert re.search(rf"G²RPO − \(w/o MGAI, clip 5/3\) = {SIGNED} {SIGNED_CI}", out)


def test_toy_mgai_settings_print_disagreement_beside_the_effect(tmp_path, capsys):
    toy_flow.main(["--study", "mgai-settings", "--seeds", "2", "--iterations", "1",
                   "--pretrain-steps", "50", "--cache-dir", str(tmp_path), *TINY])
    out = capsys.readouterr().out
    for name, setting in toy_flow.MGAI_SETTINGS.items():
        (row,) = rows(out, name)
        lams = setting.get("granularities", (1, 2, 3))[1:]
        assert re.fullmatch(", ".join(rf"λ={lam}: \d+\.\d%( / (\d+\.\d%|–))" for lam in lams),
                            row[1]), row
        assert re.fullmatch(rf"{NUMBER} {CI}", row[2])
        assert all(re.fullmatch(rf"{SIGNED} {SIGNED_CI}", c) for c in row[3:5]), row
        assert re.fullmatch(rf"±{NUMBER}", row[5])


def test_toy_guard_rails_study_prints_its_tables_and_figure(tmp_path, capsys):
    out_png = tmp_path / "g.png"
    toy_flow.main(["--guard-rails", "0,1", "--seeds", "2", "--iterations", "2",
                   "--pretrain-steps", "50", "--cache-dir", str(tmp_path), "--out", str(out_png),
                   *TINY])
    out = capsys.readouterr().out
    assert out_png.is_file() and out_png.with_suffix(".jsonl").is_file()
    table = [line for line in out.splitlines() if line.startswith("| ")]
    assert table, out
    for beta in ("0", "1"):
        assert any(line.startswith(f"| {beta} |") for line in table), beta


# ----------------------------------------------------------------------------------------------
# The digits' printed studies (a 30-step flow in a temporary folder; the judges are built once
# per process).

DIGITS = lambda tmp_path: ["--pretrain-steps", "30", "--cache-dir", str(tmp_path / "cache"),
                           *TINY]


def test_digits_comparison_tables_have_every_method_and_accuracy_inside_zero_one(tmp_path,
                                                                                 capsys):
    out_png = tmp_path / "m.png"
    digits_flow.main(["--method", "all", "--seeds", "2", "--iterations", "2", "--out",
                      str(out_png), "--branch-steps", "0,4", *DIGITS(tmp_path)])
    out = capsys.readouterr().out
    assert out_png.is_file()
    head = " | ".join(f"{k} [95% CI]" for k in digits_flow.REPORTED)
    assert f"| method | {head} | model evals / iteration |" in out
    for method in digits_flow.METHODS:
        final, same = rows(out, method)[:2]
        assert all(re.fullmatch(rf"{NUMBER} {CI}", c) for c in final[1:6]), final
        lo, hi = map(float, re.findall(r"\d\.\d{4}", final[3])[1:])
        assert 0 <= lo <= hi <= 1  # accuracy: a bootstrap interval inside [0, 1]
        assert re.fullmatch(r"\d+\.\d", same[4])  # iterations used at the common budget
    for a, b in digits_flow.COMPARED:
        (pair,) = rows(out, f"{a} − {b}")
        assert pair[3] in ("excludes 0", "includes 0") and re.fullmatch(SIGNED_CI, pair[2])


def test_digits_mgai_study_and_settings_print_their_tables(tmp_path, capsys):
    digits_flow.main(["--study", "mgai", "--seeds", "2", "--iterations", "1",
                      *DIGITS(tmp_path)])
    out = capsys.readouterr().out
    assert len(rows(out, "all members")[0]) == 3
    for arm in studies.mgai_arms():
        assert len(rows(out, arm)) == 2, arm  # its final gold, its paired differences
    assert "G²RPO − (w/o MGAI, clip 5/3) = " in out
    digits_flow.main(["--study", "mgai-verdict", "--seeds", "2", "--iterations", "1",
                      *DIGITS(tmp_path)])
    out = capsys.readouterr().out
    assert "all members" not in out  # the disagreement table is --study mgai's
    for arm in studies.mgai_arms():
        assert len(rows(out, arm)) == (2 if arm in studies.verdict_arms() else 0), arm
    assert "3 distinct paired comparisons over 2 seeds" in out
    digits_flow.main(["--study", "mgai-settings", "--seeds", "2", "--iterations", "1",
                      *DIGITS(tmp_path)])
    out = capsys.readouterr().out
    for name in digits_flow.MGAI_SETTINGS:
        (row,) = rows(out, name)
        assert len(row) == 6 and re.fullmatch(rf"±{NUMBER}", row[5]), row


def test_digits_credit_table_labels_the_singular_column(tmp_path, capsys):
    digits_flow.main(["--study", "credit", "--seeds", "2", *DIGITS(tmp_path)])
    out = capsys.readouterr().out
    assert "| singular (1 by construction; computed as a check) |" in out
    for k in range(8):
        (row,) = rows(out, str(k))
        assert re.fullmatch(r"\d\.\d{3} \[\d\.\d{3}, \d\.\d{3}\]", row[2]), row
        assert row[3] == "1.000"  # singular: the credited step's noise is the only noise


def test_digits_hacking_study_prints_its_tables_and_figure(tmp_path, capsys):
    out_png = tmp_path / "h.png"
    digits_flow.main(["--study", "hacking", "--kl-betas", "0,1", "--seeds", "2", "--iterations",
                      "2", "--out", str(out_png), *DIGITS(tmp_path)])
    out = capsys.readouterr().out
    assert out_png.is_file()
    assert "| β | EMA | gold at 2 |" in out and "| β | EMA | peak gold (any evaluation) |" in out
    for beta in ("0", "1"):
        for decay in ("0", "0.99"):
            gold, end = rows(out, f"{beta} | {decay}")
            lo, hi = map(float, re.findall(r"\d\.\d{4}", end[4])[1:])  # accuracy at the end
            assert 0 <= lo <= hi <= 1, end
