"""benchmarks/noise_sim.py, short: the confirm rule with the REAL train.py on null changes (~5 min on 2 cores: marked
long, run with `uv run pytest -m long`, not in CI)."""

import importlib.util
from pathlib import Path

import pytest

from tui.results import ResultsFile, group_experiments

ROOT = Path(__file__).resolve().parent.parent


def load_sim():
    spec = importlib.util.spec_from_file_location("noise_sim", ROOT / "benchmarks" / "noise_sim.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.long
def test_confirm_rule_with_the_real_trainer_rarely_keeps_null_changes(tmp_path, monkeypatch):
    for var in ("AUTORESEARCH_TIME_BUDGET", "OMP_NUM_THREADS", "ANTHROPIC_API_KEY"):
        monkeypatch.setenv(var, "")  # run_mode sets them in os.environ; monkeypatch restores them afterwards
    sim = load_sim()
    env = sim.prepare_dataset(tmp_path)
    for k in env:
        monkeypatch.setenv(k, "")
    r = sim.run_mode("confirm", 6, tmp_path, env, budget=2.0, noise_runs=3)
    assert r["ok"], r["reason"]
    rows = ResultsFile(Path(r["repo"]) / "results.tsv").load()
    exps = group_experiments(rows)
    assert [(x.run, x.kind) for x in exps[0].rows] == [(0, "noise"), (1, "noise"), (2, "noise")]
    assert r["null_experiments"] == 6 and r["noise_sigma"] > 0
    # never kept on one run; at most one lucky keep in six (expected rate ~2 %, so one keep happens ~1 run in 9;
    # two would need two independent 2σ flukes, which is what the rule exists to prevent)
    assert all(len(e.rows) >= 2 for e in exps[1:] if e.status == "keep")
    assert r["false_keeps"] <= 1, r
    assert all(len(e.rows) <= 3 for e in exps[1:])
