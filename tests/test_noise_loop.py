"""The noise floor and the confirm rule in the real loop: temp git repos, the stand-in trainer (val_bpb = f(block) +
seeded noise) as a real subprocess, a real HTTP LLM server; kill -9 and restart through dashboard.py."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from fakes.agent import TEST_KEY, Recorder, hp_answer, make_config, wait_for
from fakes.repo import FAKE_TRAIN, agent_repo, git
from tui.config import AgentConfig, ConfigError
from tui.decision import noise_floor
from tui.orchestrator import Orchestrator
from tui.results import COLUMNS, ResultsFile, summarize

ROOT = Path(__file__).resolve().parent.parent
BRANCH = "autoresearch/t1"
NOISE = 0.002  # the stand-in trainer's run-to-run standard deviation in these tests
NOISY = FAKE_TRAIN.read_text().replace('MODE = "ok"', 'MODE = "noisy"')


@pytest.fixture
def repo(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTORESEARCH_FAKE_NOISE", str(NOISE))
    return agent_repo(tmp_path / "repo", NOISY)



def confirm_config(repo, server, **overrides):
    return make_config(repo, server, **{"keep_rule": "confirm", "noise_runs": 3, "confirm_runs": 2, **overrides})


def run_agent(repo, server, rec=None, **overrides):
    rec = rec or Recorder()
    orch = Orchestrator(confirm_config(repo, server, **overrides), [rec])
    return orch.run(), rec, orch


def rows(repo):
    return [r.format() for r in ResultsFile(Path(repo) / "results.tsv").load()]


def table(repo):
    return [(r["exp"], r["status"], r["run"], r["seed"], r["kind"]) for r in rows(repo)]


def subjects(repo):
    return git(repo, "log", "--format=%s", BRANCH).splitlines()


def null_answer(i, **block):
    """A change that does nothing: a new unused constant (the prompt layer rejects comment-only edits)."""
    return hp_answer(f"null change {i}", extra=f"NULL_EDIT = {i}", **{"mode": "noisy", **block})


# ---------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------


def test_noise_floor_then_a_real_gain_confirmed_and_a_null_change_discarded(repo, server):
    server.push(server.text(hp_answer("lr 0.02", lr=0.02, mode="noisy")), server.text(null_answer(1, lr=0.02)))
    summary, rec, _ = run_agent(repo, server, max_experiments=3)
    assert summary.ok
    t = table(repo)
    # the baseline ran three times with seeds 42 (the trainer's default), 43, 44: the noise floor
    assert t[:3] == [("exp0", "keep", "0", "", "noise"), ("exp0", "keep", "1", "43", "noise"),
                     ("exp0", "keep", "2", "44", "noise")]
    # lr 0.02 is 0.01 better (5σ): kept after one confirmation run with seed 43
    assert t[3:5] == [("exp1", "keep", "0", "", ""), ("exp1", "keep", "1", "43", "confirm")]
    # the null change is not kept, whatever its runs did
    assert {s for e, s, *_ in t[5:]} == {"discard"} and {e for e, *_ in t[5:]} == {"exp2"}
    r = rows(repo)
    assert "noise floor run 3/3 (seed 44); noise floor: σ" in r[2]["notes"]
    assert r[3]["notes"].startswith("confirmed: mean val_bpb") and "2σ·√(1/2+1/3)" in r[3]["notes"]
    assert r[3]["notes"] == r[4]["notes"]
    assert "Seed 43" in (repo / "runs" / "exp1-run1.log").read_text()
    assert "Seed 44" in (repo / "runs" / "exp0-run2.log").read_text()
    assert len(server.chat_requests()) == 2  # one LLM call per experiment, none for the extra runs

    best = (float(r[3]["val_bpb"]) + float(r[4]["val_bpb"])) / 2
    assert f"Best val_bpb so far: {best:.6f} (exp1)" in server.prompts()[1]  # the mean, not the lucky run
    assert "Noise: re-running the same script moves val_bpb by about" in server.prompts()[1]
    st, _, extra = rec.of("stats")[-1]
    assert (st.runs, st.kept, st.discarded, st.best_exp) == (3, 2, 1, 1) and st.best_val_bpb == pytest.approx(best)
    assert set(extra) == {"noise σ", "margin", "plateau"}
    logs = rec.logs()
    assert any(m.startswith("noise floor: σ") and "keep margin" in m for m in logs)
    assert any(m.startswith("exp1: confirmation run 1/2 with seed 43") and "margin" in m for m in logs)
    starts = [(i.exp, i.run, i.seed) for i in rec.of("start")]
    assert starts[:4] == [(0, 0, None), (0, 1, 43), (0, 2, 44), (1, 0, None)] and (1, 1, 43) in starts
    assert subjects(repo) == ["exp1: lr 0.02", "initial"]
    assert not (repo / "runs" / "pending-t1.json").exists()
    assert rec.of("end")[3].val_bpb == pytest.approx(best)  # the experiment's result is its mean


def test_plateau_asks_for_a_new_direction_and_says_so(tmp_path, server):
    repo = agent_repo(tmp_path / "repo")  # deterministic trainer: a null change ties the best, a clear loser
    server.default_chat = lambda body: server.text(null_answer(len(server.chat_requests()), mode="ok"))
    summary, rec, _ = run_agent(repo, server, max_experiments=5, plateau=2)
    assert summary.ok
    assert [s for _, s, *_ in table(repo)] == ["keep"] * 3 + ["discard"] * 4
    assert all(r["notes"].startswith("clear loser") for r in rows(repo)[3:])
    prompts = server.prompts()
    assert not any("PLATEAU" in p for p in prompts[:2])
    assert "PLATEAU: the last 2 experiments were not kept. Change direction" in prompts[2]
    assert "PLATEAU: the last 3 experiments" in prompts[3]
    warnings = [m for m in rec.logs("warning") if m.startswith("plateau:")]
    assert warnings == ["plateau: 2 experiments without a keep, asking the LLM for a new direction"]
    assert any(s == "thinking" and "plateau" in m for s, m in rec.of("state"))
    assert rec.of("stats")[-1][2]["plateau"] == "4/2 new direction"


def test_a_crash_in_a_confirmation_run_fails_the_experiment(repo, server):
    (repo / "runs").mkdir()
    (repo / "runs" / "crash-seed-43").write_text("")
    server.push(server.text(hp_answer("lr 0.02", lr=0.02, mode="noisy", extra="SEED_GATES = True")))
    summary, rec, _ = run_agent(repo, server, max_experiments=2)
    assert summary.ok
    assert table(repo)[3:] == [("exp1", "crash", "0", "", ""), ("exp1", "crash", "1", "43", "confirm")]
    assert all(r["val_bpb"] == "0.000000" for r in rows(repo)[3:]) and "boom" in rows(repo)[3]["notes"]
    assert subjects(repo) == ["initial"]


def test_abort_during_a_confirmation_run_reverts_and_keeps_nothing(repo, server):
    server.push(server.text(hp_answer("lr 0.02", lr=0.02, mode="noisy", steps=40, step_sleep=0.05)))
    rec, box = Recorder(), []

    class AbortOnConfirm(Recorder):
        def on_step(self, step):
            starts = rec.of("start")
            if starts and starts[-1].exp == 1 and starts[-1].run == 1 and step.step == 1:
                box[0].abort()

    orch = Orchestrator(confirm_config(repo, server, max_experiments=3), [rec, AbortOnConfirm()])
    box.append(orch)
    summary = orch.run()
    assert summary.ok and summary.aborted
    assert [e for e, *_ in table(repo)] == ["exp0"] * 3
    assert subjects(repo) == ["initial"] and not (repo / "runs" / "pending-t1.json").exists()


# ---------------------------------------------------------------------------
# Restarts
# ---------------------------------------------------------------------------


def test_resume_restores_the_noise_floor_and_the_best_mean(repo, server):
    server.push(server.text(hp_answer("lr 0.02", lr=0.02, mode="noisy")))
    assert run_agent(repo, server, max_experiments=2)[0].ok
    before = rows(repo)
    nf = noise_floor(ResultsFile(repo / "results.tsv").load())
    server.push(server.text(null_answer(1, lr=0.02)))
    summary, rec, _ = run_agent(repo, server, max_experiments=3)
    assert summary.ok
    after = rows(repo)
    assert after[:len(before)] == before and {r["exp"] for r in after[len(before):]} == {"exp2"}  # no re-measuring
    assert any(m.startswith(f"noise floor: σ {nf.sigma:.6f} (") for m in rec.logs())
    assert rec.of("stats")[0][2]["noise σ"] == f"{nf.used:.4f}"
    best = summarize(ResultsFile(repo / "results.tsv").load()[:len(before)]).best_val_bpb
    assert f"Best val_bpb so far: {best:.6f} (exp1)" in server.prompts()[-1]


def test_a_noise_measurement_cut_short_is_completed_on_the_next_start(repo, server):
    rec, box = Recorder(), []

    class StopAfterFirstRun(Recorder):
        def on_experiment_end(self, result):
            box[0].stop()

    orch = Orchestrator(confirm_config(repo, server, max_experiments=2), [rec, StopAfterFirstRun()])
    box.append(orch)
    assert orch.run().ok
    assert table(repo) == [("exp0", "keep", "0", "", "noise")]
    assert any("stopped after 1/3 runs" in m for m in rec.logs())

    summary, rec, _ = run_agent(repo, server, max_experiments=1)
    assert summary.ok and server.chat_requests() == []
    assert table(repo) == [("exp0", "keep", "0", "", "noise"), ("exp0", "keep", "1", "43", "noise"),
                           ("exp0", "keep", "2", "44", "noise")]
    assert "noise floor run 3/3" in rows(repo)[2]["notes"]


def test_remeasure_noise_runs_the_best_commit_again_as_a_new_measurement(repo, server):
    server.push(server.text(hp_answer("lr 0.02", lr=0.02, mode="noisy")))
    assert run_agent(repo, server, max_experiments=2)[0].ok
    n_before = len(rows(repo))
    summary, rec, _ = run_agent(repo, server, max_experiments=2, remeasure_noise=True)
    assert summary.ok
    new = table(repo)[n_before:]
    assert new == [("exp1", "keep", "2", "44", "noise"), ("exp1", "keep", "3", "45", "noise"),
                   ("exp1", "keep", "4", "46", "noise")]
    assert any(m.startswith("re-measuring the noise floor on exp1") for m in rec.logs())
    nf = noise_floor(ResultsFile(repo / "results.tsv").load())
    assert nf.exp == 1 and nf.runs == 3 and nf.dof == 2  # a new epoch: the old spread no longer counts
    assert summarize(ResultsFile(repo / "results.tsv").load()).best_runs == 5


def test_old_results_files_gain_the_new_columns(repo, server):
    old = "commit\tval_bpb\tmemory_gb\tstatus\tdescription\texp\ttag\n"
    (repo / "results.tsv").write_text(old)
    assert run_agent(repo, server, max_experiments=1)[0].ok
    rf = ResultsFile(repo / "results.tsv")
    rf.load()
    assert set(COLUMNS) <= set(rf.header) and {"seed", "run", "kind"} <= set(rf.header)
    assert len(rows(repo)) == 3


# ---------------------------------------------------------------------------
# kill -9 through the command line
# ---------------------------------------------------------------------------


def clean_env(**extra):
    from tui.credentials import is_child_hidden
    env = {k: v for k, v in os.environ.items() if not is_child_hidden(k)}
    env.update(PYTHONUNBUFFERED="1", ANTHROPIC_API_KEY=TEST_KEY, AUTORESEARCH_FAKE_NOISE=str(NOISE), **extra)
    return env


def agent_cmd(server, *extra):
    return [sys.executable, str(ROOT / "dashboard.py"), "--agent", "--headless", "--tag", "t1", "--model",
            "claude-sonnet-4-6", "--base-url", server.base_url, "--script", "train.py", "--timeout", "60",
            "--keep-rule", "confirm", "--noise-runs", "3", "--confirm-runs", "2", *extra]


def stepping(log: Path) -> bool:
    return log.exists() and "step 00001" in log.read_text(errors="replace")


def kill_9_during(repo, server, log_name, *extra):
    """kill -9 the agent while the run logging to runs/<log_name> trains; the trainer's pid. Unsandboxed, so that the
    trainer outlives its agent (a bubblewrap sandbox dies with it) and the restart has it to kill."""
    p = subprocess.Popen(agent_cmd(server, "--sandbox", "none", *extra), cwd=repo, env=clean_env(),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: stepping(repo / "runs" / log_name), timeout=60)
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=10)
    finally:
        p.kill()
        p.communicate()
    trainer = int((repo / "runs" / "work" / log_name.removesuffix(".log") / "trainer.pid").read_text())
    return trainer


def restart(repo, server, *extra):
    r = subprocess.run(agent_cmd(server, "--sandbox", "none", *extra), cwd=repo, env=clean_env(), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def test_kill_9_mid_confirmation_continues_the_confirmation_on_restart(repo, server):
    (repo / "runs").mkdir()
    slow = repo / "runs" / "slow-seed-43"
    slow.write_text("")  # the confirmation run (seed 43) of exp1 crawls: it is killed with its agent
    server.push(server.text(hp_answer("lr 0.02", lr=0.02, mode="noisy", extra="SEED_GATES = True")))
    trainer = kill_9_during(repo, server, "exp1-run1.log", "--max", "2")
    assert [e for e, *_ in table(repo)] == ["exp0"] * 3  # nothing of exp1 recorded yet
    assert subjects(repo)[0] == "exp1: lr 0.02"
    pending = json.loads((repo / "runs" / "pending-t1.json").read_text())
    assert pending["exp"] == 1 and len(pending["values"]) == 1
    first_log = (repo / "runs" / "exp1.log").read_text()

    slow.unlink()
    out = restart(repo, server, "--max", "2")
    assert "exp1 was interrupted during its confirmation runs: continuing it (1 run done" in out
    assert f"killed the training run (pid {trainer})" in out
    assert not psutil.pid_exists(trainer) or psutil.Process(trainer).status() == psutil.STATUS_ZOMBIE
    assert len(server.chat_requests()) == 1  # no second LLM call for exp1
    assert table(repo)[3:] == [("exp1", "keep", "0", "", ""), ("exp1", "keep", "1", "43", "confirm")]
    assert float(rows(repo)[3]["val_bpb"]) == pytest.approx(float(pending["values"][0]), abs=1e-6)
    assert (repo / "runs" / "exp1.log").read_text() == first_log  # the first run was not redone
    assert subjects(repo) == ["exp1: lr 0.02", "initial"] and not (repo / "runs" / "pending-t1.json").exists()
    assert git(repo, "status", "--porcelain", "--untracked-files=no").strip() == ""


def test_kill_9_mid_noise_measurement_completes_it_on_restart(tmp_path, server, monkeypatch):
    monkeypatch.setenv("AUTORESEARCH_FAKE_NOISE", str(NOISE))
    repo = agent_repo(tmp_path / "repo", NOISY.replace('STEP_SLEEP = 0.0\n', 'STEP_SLEEP = 0.0\nSEED_GATES = True\n'))
    (repo / "runs").mkdir()
    slow = repo / "runs" / "slow-seed-43"
    slow.write_text("")
    kill_9_during(repo, server, "exp0-run1.log", "--max", "1")
    assert table(repo) == [("exp0", "keep", "0", "", "noise")]
    slow.unlink()
    out = restart(repo, server, "--max", "1")
    assert table(repo) == [("exp0", "keep", "0", "", "noise"), ("exp0", "keep", "1", "43", "noise"),
                           ("exp0", "keep", "2", "44", "noise")]
    assert "noise floor: σ" in out and server.chat_requests() == []


# ---------------------------------------------------------------------------
# Options
# ---------------------------------------------------------------------------


def test_options_are_checked_and_reach_the_config(tmp_path):
    import dashboard
    args = dashboard.build_parser().parse_args(["--agent", "--headless", "--keep-rule", "single", "--noise-runs",
                                                "5", "--confirm-runs", "0", "--remeasure-noise", "--plateau", "0"])
    cfg = dashboard.agent_config(args)
    assert (cfg.keep_rule, cfg.noise_runs, cfg.confirm_runs, cfg.remeasure_noise, cfg.plateau) == \
        ("single", 5, 0, True, 0)
    cfg = dashboard.agent_config(dashboard.build_parser().parse_args(["--agent", "--headless"]))
    assert (cfg.keep_rule, cfg.noise_runs, cfg.confirm_runs, cfg.remeasure_noise, cfg.plateau) == \
        ("confirm", 3, 2, False, 15)
    with pytest.raises(ConfigError, match="--keep-rule confirm needs --noise-runs 2 or more"):
        AgentConfig(repo=tmp_path, noise_runs=1).resolved()
    r = subprocess.run([sys.executable, str(ROOT / "dashboard.py"), "--agent", "--headless", "--confirm-runs", "-1"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "must be 0 or more" in r.stderr
    r = subprocess.run([sys.executable, str(ROOT / "dashboard.py"), "--help"], capture_output=True, text=True)
    for flag in ("--keep-rule", "--noise-runs", "--confirm-runs", "--remeasure-noise", "--plateau"):
        assert flag in r.stdout, flag
