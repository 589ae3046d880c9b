"""The noise-aware keep rules on synthetic results rows: pure, fast, no processes."""

import math
import random
import statistics

import pytest

from tui.decision import (Candidate, ConfirmRule, SingleRunRule, latest_measurement, make_keep_rule, margin,
                          noise_floor, plateau_count)
from tui.prompt import format_history
from tui.results import Row, summarize

# ---------------------------------------------------------------------------
# Synthetic results rows
# ---------------------------------------------------------------------------


def row(exp, val, status="keep", run=0, kind="", seed=""):
    return Row.parse({"exp": f"exp{exp}", "val_bpb": f"{val:.6f}" if status in ("keep", "discard") else "0.000000",
                      "status": status, "run": str(run), "kind": kind, "seed": str(seed), "commit": f"c{exp:06d}",
                      "description": f"idea {exp}", "notes": ""})


def baseline(*vals):
    return [row(0, v, run=i, kind="noise", seed=42 + i) for i, v in enumerate(vals)]


def experiment(exp, status, *vals):
    return [row(exp, v, status, run=i, kind="confirm" if i else "", seed=42 + i) for i, v in enumerate(vals)]


def cand(*runs, exp=9):
    return Candidate(exp, "abc1234", "idea", runs=list(runs), seeds=[None] + [42 + i for i in range(1, len(runs))])


BASE = baseline(1.00, 1.02, 1.04)  # mean 1.02, sigma 0.02 (2 dof)
SIGMA = 0.02


# ---------------------------------------------------------------------------
# Noise floor and the best
# ---------------------------------------------------------------------------


def test_noise_floor_is_the_spread_of_the_baseline_runs():
    nf = noise_floor(BASE)
    assert nf.sigma == pytest.approx(SIGMA) and nf.dof == 2 and nf.runs == 3 and nf.exp == 0
    assert nf.mean == pytest.approx(1.02) and nf.spread == pytest.approx(0.04) and not nf.floored
    assert noise_floor(BASE[:1]) is None  # one run says nothing about noise


def test_runs_that_agree_exactly_hit_the_floor_not_zero():
    rows = baseline(1.5, 1.5, 1.5)
    nf = noise_floor(rows)
    assert nf.sigma == 0 and nf.floored and nf.used == pytest.approx(1.5e-4)
    v = ConfirmRule().decide(cand(1.4999, 1.4999, 1.4999), rows)  # 1e-4 better: inside 2σ·√(2/3), σ = 1.5e-4
    assert v.action == "discard" and "(floor)" in v.reason


def test_best_is_the_mean_over_the_best_experiments_runs_not_a_lucky_minimum():
    rows = BASE + experiment(1, "keep", 0.95, 0.97)
    s = summarize(rows)
    assert (s.best_val_bpb, s.best_exp, s.best_runs) == (pytest.approx(0.96), 1, 2)
    v = ConfirmRule().decide(cand(0.955), rows)  # worse than the lucky 0.95, better than the mean 0.96
    assert v.action == "rerun" and "the best 0.960000 (exp1, 2 runs)" in v.reason


def test_summary_counts_experiments_not_runs():
    rows = BASE + experiment(1, "discard", 1.01, 1.03, 1.02) + experiment(2, "crash", 0) + [row(3, 0, "skip")]
    s = summarize(rows)
    assert (s.runs, s.kept, s.discarded, s.crashed, s.skipped, s.next_exp, s.trained) == (3, 1, 1, 1, 1, 4, 7)


def test_pooled_sigma_grows_its_degrees_of_freedom_with_confirmation_runs():
    rows = BASE + experiment(1, "discard", 1.01, 1.05) + experiment(2, "discard", 1.03) + \
        experiment(3, "discard", 1.00, 1.03, 1.06)
    groups = [[1.00, 1.02, 1.04], [1.01, 1.05], [1.00, 1.03, 1.06]]
    ss = sum(sum((v - statistics.mean(g)) ** 2 for v in g) for g in groups)
    nf = noise_floor(rows)
    assert nf.dof == 2 + 1 + 2 and nf.sigma == pytest.approx(math.sqrt(ss / 5))
    assert nf.runs == 3 and nf.exp == 0  # the measurement it started from


def test_remeasuring_starts_a_new_noise_epoch():
    rows = baseline(1.0, 1.1, 1.2) + experiment(1, "discard", 1.05, 1.15) + \
        [row(0, v, run=3 + i, kind="noise", seed=45 + i) for i, v in enumerate((1.10, 1.11, 1.12))]
    assert latest_measurement(rows) == (5, 8)
    nf = noise_floor(rows)
    assert nf.sigma == pytest.approx(0.01) and nf.dof == 2 and nf.mean == pytest.approx(1.11)
    s = summarize(rows)  # the remeasure runs also sharpen the reference's mean
    assert s.best_runs == 6 and s.best_val_bpb == pytest.approx(statistics.mean([1.0, 1.1, 1.2, 1.10, 1.11, 1.12]))


def test_noise_runs_due_top_up_a_measurement_cut_short_only():
    rule = ConfirmRule(noise_runs=3)
    assert rule.noise_runs_needed([]) == 0
    assert rule.noise_runs_needed(BASE[:1]) == 2
    assert rule.noise_runs_needed(BASE[:1] + [row(1, 0, "skip")]) == 2  # an LLM outage does not end it
    assert rule.noise_runs_needed(BASE) == 0
    assert rule.noise_runs_needed(BASE[:2] + experiment(1, "discard", 1.1)) == 0  # experiments went on: finished
    old_tag = [row(0, 1.02)] + experiment(1, "keep", 1.0, 1.0)  # a tag from before noise floors
    assert rule.noise_runs_needed(old_tag) == 3
    assert SingleRunRule(noise_runs=3).noise_runs_needed(old_tag) == 0  # single does not need one
    assert ConfirmRule(noise_runs=1).noise_runs_needed(BASE[:1]) == 0


# ---------------------------------------------------------------------------
# The confirm rule
# ---------------------------------------------------------------------------


def test_baseline_is_the_reference_and_starts_the_noise_measurement():
    v = ConfirmRule().decide(Candidate(0, "a", "baseline", runs=[1.02], seeds=[None], baseline=True), [])
    assert v.action == "keep" and v.noise and "noise floor run 1/3" in v.reason
    v = SingleRunRule(noise_runs=1).decide(Candidate(0, "a", "baseline", runs=[1.02], baseline=True), [])
    assert v.action == "keep" and not v.noise


def test_first_success_after_a_crashed_baseline_becomes_the_measured_reference():
    rows = [row(0, 0, "crash", kind="noise")]
    v = ConfirmRule().decide(cand(1.1, exp=1), rows)
    assert v.action == "keep" and v.noise and "kept without comparison" in v.reason
    assert "measuring the noise floor" in v.reason


def test_clear_loser_is_discarded_after_one_run():
    v = ConfirmRule().decide(cand(1.03), BASE)
    assert v.action == "discard" and v.reason.startswith("clear loser") and "1.020000 (exp0, 3 runs)" in v.reason
    assert ConfirmRule().decide(cand(1.02), BASE).action == "discard"  # equal is not better


def test_a_promising_run_gets_a_confirmation_run_with_the_next_seed():
    v = ConfirmRule().decide(cand(1.01), BASE)
    assert v.action == "rerun" and v.seed == 43 and "confirmation run 1/2 with seed 43" in v.reason
    m1 = margin(SIGMA, 1, 3)
    assert f"margin {m1:.6f}" in v.reason and "<=" in v.reason
    assert ConfirmRule().decide(Candidate(9, "a", "x", runs=[1.01, 1.0], seeds=[7, 8]), BASE).seed == 9


def test_even_a_huge_gain_is_not_kept_on_one_run():
    v = ConfirmRule().decide(cand(0.5), BASE)
    assert v.action == "rerun" and ">" in v.reason
    v = ConfirmRule(confirm_runs=0).decide(cand(0.5), BASE)  # unless confirmation is switched off
    assert v.action == "keep" and v.reason.startswith("kept on one run")
    assert ConfirmRule(confirm_runs=0).decide(cand(1.01), BASE).action == "discard"


def test_confirmed_when_the_mean_of_two_runs_clears_the_two_run_margin():
    m2 = margin(SIGMA, 2, 3)  # 2σ·√(1/2 + 1/3) = 0.0365
    v = ConfirmRule().decide(cand(0.97, 0.975), BASE)  # mean 0.9725, 0.0475 better
    assert v.action == "keep" and v.reason.startswith("confirmed") and f"margin {m2:.6f}" in v.reason
    assert "2σ·√(1/2+1/3)" in v.reason and "σ 0.020000, 2 dof" in v.reason


def test_inside_the_margin_after_every_run_is_discarded():
    rule = ConfirmRule()
    v = rule.decide(cand(1.00, 1.005), BASE)  # mean 0.0175 better, margin 0.0365: one more run
    assert v.action == "rerun" and v.seed == 44 and "confirmation run 2/2" in v.reason
    v = rule.decide(cand(1.00, 1.005, 0.995), BASE)  # mean 1.0, 0.02 better, margin 2σ·√(2/3) = 0.0327
    assert v.action == "discard" and v.reason.startswith("within the noise after 3 runs")
    assert f"margin {margin(SIGMA, 3, 3):.6f}" in v.reason
    v = ConfirmRule(confirm_runs=4).decide(cand(1.00, 1.005, 0.995), BASE)
    assert v.action == "rerun" and v.seed == 45


def test_a_mean_that_falls_back_to_the_best_stops_early():
    v = ConfirmRule().decide(cand(1.01, 1.04), BASE)
    assert v.action == "discard" and v.reason.startswith("no better")


# ---------------------------------------------------------------------------
# The single rule, plateau, prompt and status
# ---------------------------------------------------------------------------


def test_single_rule_keeps_any_run_below_the_best_mean():
    rule = SingleRunRule()
    assert rule.decide(cand(1.019), BASE).action == "keep"
    assert rule.decide(cand(1.021), BASE).action == "discard"
    assert "for information only" in rule.noise_summary(BASE)
    assert make_keep_rule("single").name == "single" and make_keep_rule("confirm", plateau=3).plateau == 3
    with pytest.raises(ValueError, match="choose one of confirm, single"):
        make_keep_rule("bogus")


def test_plateau_counts_non_keeps_since_the_last_keep():
    rows = BASE + experiment(1, "discard", 1.1) + [row(2, 0, "skip")] + experiment(3, "crash", 0)
    assert plateau_count(rows) == 2
    rule = ConfirmRule(plateau=3)
    assert not rule.status_note(rows) and not any("PLATEAU" in n for n in rule.prompt_notes(rows))
    rows += experiment(4, "discard", 1.2)
    assert "plateau: 3 experiments without a keep" in rule.status_note(rows)
    assert any(n.startswith("PLATEAU: the last 3 experiments were not kept. Change direction")
               for n in rule.prompt_notes(rows))
    assert rule.stats_extra(rows)["plateau"] == "3/3 new direction"
    rows += experiment(5, "keep", 0.9, 0.9)
    assert plateau_count(rows) == 0 and rule.stats_extra(rows)["plateau"] == "0/3"
    assert ConfirmRule(plateau=0).status_note(BASE + experiment(1, "discard", 1.1) * 30) == ""


def test_noise_floor_reaches_the_prompt_the_status_panel_and_the_log_line():
    rule = ConfirmRule()
    notes = rule.prompt_notes(BASE)
    assert any("moves val_bpb by about 0.0200" in n and f"about {margin(SIGMA, 2, 3):.4f} after 2 runs" in n
               for n in notes)
    extra = rule.stats_extra(BASE)
    assert extra["noise σ"] == "0.0200" and extra["margin"] == f"{margin(SIGMA, 2, 3):.4f}"
    line = rule.noise_summary(BASE)
    assert line.startswith("noise floor: σ 0.020000 (2 dof, from 3 runs of exp0, mean 1.020000, spread 0.040000)")
    assert f"keep margin {margin(SIGMA, 2, 3):.6f} after 2 runs" in line
    assert rule.stats_extra(BASE[:1])["noise σ"] == "measuring"


def test_prompt_history_shows_one_line_per_experiment_with_its_mean():
    text = format_history(BASE + experiment(1, "discard", 1.01, 1.03), 30)
    lines = text.splitlines()
    assert "runs" in lines[0] and len(lines) == 3
    assert "1.020000    3" in lines[1] and "1.020000    2" in lines[2]


# ---------------------------------------------------------------------------
# The rules on simulated tags: false keeps of null changes, and power
# ---------------------------------------------------------------------------


def simulate_tag(rule, rng, n_exp=20, effect=0.0, sigma=0.01):
    """Drive a rule the way the orchestrator does, with Gaussian run-to-run noise. Experiments change the true
    val_bpb by `effect` (0: null changes). Returns (keeps, training runs)."""
    truth, rows = 1.0, []

    def draw():
        return truth + rng.gauss(0.0, sigma)

    c = Candidate(0, "base", "baseline", runs=[draw()], seeds=[None], baseline=True)
    v = rule.decide(c, rows)
    rows.append(row(0, c.runs[0], "keep", kind="noise" if v.noise else ""))
    for i in range(rule.noise_runs_needed(rows)):
        rows.append(row(0, draw(), "keep", run=1 + i, kind="noise"))
    keeps = 0
    for n in range(1, n_exp + 1):
        c = Candidate(n, f"c{n}", "x", runs=[draw() + effect], seeds=[None])
        v = rule.decide(c, rows)
        while v.action == "rerun":
            c.runs.append(draw() + effect)
            c.seeds.append(v.seed)
            v = rule.decide(c, rows)
        rows += experiment(n, v.action, *c.runs)
        if v.action == "keep":
            keeps += 1
            truth += effect
    return keeps, len(rows)


def test_null_changes_are_rarely_kept_by_confirm_and_often_by_single():
    rng = random.Random(8)
    tags, n_exp = 150, 20
    confirm = [simulate_tag(ConfirmRule(), rng, n_exp) for _ in range(tags)]
    single = [simulate_tag(SingleRunRule(), rng, n_exp) for _ in range(tags)]
    confirm_rate = sum(k for k, _ in confirm) / (tags * n_exp)
    single_rate = sum(k for k, _ in single) / (tags * n_exp)
    assert confirm_rate <= 0.05, confirm_rate
    assert single_rate >= 0.10, single_rate
    runs_per_exp = (sum(r for _, r in confirm) - 3 * tags) / (tags * n_exp)
    assert 1.2 <= runs_per_exp <= 2.0, runs_per_exp  # what confirmation costs on null changes


def test_real_improvements_of_three_sigma_are_mostly_kept():
    rng = random.Random(9)
    kept = sum(simulate_tag(ConfirmRule(), rng, n_exp=1, effect=-0.03)[0] for _ in range(300))
    assert kept / 300 >= 0.8, kept
