"""The orchestrator end to end, in-process: real temporary git repos, the stand-in trainer as a real subprocess, and
real HTTP LLM servers driven through the real SDKs."""

import io
import json
import threading
import time
from pathlib import Path

import psutil
import pytest

from fakes.agent import TEST_KEY, Recorder, file_answer, gone, hp_answer, make_config, needs_bwrap
from fakes.llm_servers import FakeLLMServer
from fakes.repo import FAKE_TRAIN, USER_TRACKED, agent_repo, git, user_files_state
from tui.headless import run_headless
from tui.lock import AgentLock
from tui.orchestrator import Orchestrator
from tui.results import ResultsFile

BRANCH = "autoresearch/t1"


@pytest.fixture
def repo(tmp_path):
    return agent_repo(tmp_path / "repo")



def run_agent(repo, server, rec=None, **overrides):
    rec = rec or Recorder()
    orch = Orchestrator(make_config(repo, server, **overrides), [rec])
    return orch.run(), rec, orch


def rows(repo):
    return [r.format() for r in ResultsFile(Path(repo) / "results.tsv").load()]


def statuses(repo):
    return [(r["exp"], r["status"]) for r in rows(repo)]


def subjects(repo, ref=BRANCH):
    return git(repo, "log", "--format=%s", ref).splitlines()


def tracked_clean(repo):
    return git(repo, "status", "--porcelain", "--untracked-files=no").strip() == ""


def script(repo):
    return (Path(repo) / "train.py").read_text()


def dead(pid):
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


# ---------------------------------------------------------------------------
# The main path
# ---------------------------------------------------------------------------


def test_good_edit_kept_worse_edit_reverted_user_files_untouched(repo, server):
    before = user_files_state(repo)
    server.push(server.text(hp_answer("raise LR to 0.02", lr=0.02), 1000, 200),
                server.text(hp_answer("raise LR to 0.05", lr=0.05), 1000, 200))
    t0 = time.monotonic()
    summary, rec, orch = run_agent(repo, server, max_experiments=3)
    elapsed = time.monotonic() - t0
    assert summary.ok and "reached --max 3" in summary.reason

    r = rows(repo)
    assert [(x["exp"], x["status"], x["val_bpb"]) for x in r] == [
        ("exp0", "keep", "1.030000"), ("exp1", "keep", "1.020000"), ("exp2", "discard", "1.110000")]
    assert r[0]["description"] == "baseline" and r[1]["description"] == "raise LR to 0.02"
    assert r[1]["commit"] == git(repo, "rev-parse", "--short=7", BRANCH).strip()
    assert (r[1]["memory_gb"], r[1]["steps"], r[1]["backend"], r[1]["chip"], r[1]["dataset"]) == \
        ("0.8", "5", "cpu", "Fake CPU", "testdata")
    assert r[1]["llm_tokens"] == "1200" and float(r[1]["llm_cost"]) == pytest.approx(0.006)

    # git: the branch holds only the kept experiment; the discarded one stays reachable for its diff
    assert subjects(repo) == ["exp1: raise LR to 0.02", "initial"]
    assert git(repo, "rev-parse", "--abbrev-ref", "HEAD").strip() == BRANCH
    assert "LEARNING_RATE = 0.02" in script(repo) and tracked_clean(repo)
    assert "LEARNING_RATE = 0.05" in git(repo, "show", "refs/autoresearch/t1/exp2:train.py")
    assert user_files_state(repo) == before

    # the second prompt saw the first result
    prompts = server.prompts()
    assert "Best val_bpb so far: 1.020000 (exp1)" in prompts[1] and "raise LR to 0.02" in prompts[1]
    assert "LEARNING_RATE = 0.02" in prompts[1] and "Fake CPU" in prompts[1]

    states = rec.states()
    for s in ("initializing", "baseline", "thinking", "committing", "training", "evaluating", "stopping", "stopped"):
        assert s in states, s
    assert states[-1] == "stopped"
    st, usage, _ = rec.of("stats")[-1]
    assert (st.runs, st.kept, st.discarded, st.best_val_bpb, st.best_exp, usage.tokens) == (3, 2, 1, 1.02, 1, 2400)
    assert usage.cost_usd == pytest.approx(0.012)
    log = (repo / "runs" / "exp2.log").read_text()  # the trainer exported; the sealed evaluation scored it
    assert "sealed evaluation: val_bpb 1.110000 on 4,096 tokens" in log and "\nval_bpb:" not in log
    assert all(x["eval_seconds"] for x in r)  # recorded apart from the trainer's seconds
    assert [s.step for s in rec.of("step")][:5] == [0, 1, 2, 3, 4]
    pids = [p for p in rec.of("pid") if p]
    assert len(pids) == 3 and all(dead(p) for p in pids)

    # loop overhead (git, prompt, parsing, bookkeeping, the post-run integrity scan, the sandbox, startup) per
    # experiment, beyond training, evaluation and the LLM: a guard against a runaway, not the benchmark figure
    trained = sum(float(x["seconds"]) + float(x["eval_seconds"]) for x in r)
    assert (elapsed - trained) / 3 < 6.0


def test_syntax_error_gets_one_corrective_retry(repo, server):
    bad = hp_answer("broken", fenced=False).replace("LEARNING_RATE = 0.01", "LEARNING_RATE = (0.02")
    server.push(server.text(bad), server.text(hp_answer("fixed", lr=0.02)))
    summary, rec, _ = run_agent(repo, server, max_experiments=2)
    assert statuses(repo) == [("exp0", "keep"), ("exp1", "keep")]
    retry = server.chat_requests()[1].body["messages"]
    assert [m["role"] for m in retry] == ["user", "assistant", "user"]
    assert "could not be used" in retry[2]["content"] and "not valid Python" in retry[2]["content"]
    assert "LEARNING_RATE = (0.02" in retry[1]["content"]
    assert any("asking once more" in m for m in rec.logs("warning"))


def test_bad_answer_format_twice_is_a_skip_and_the_loop_goes_on(repo, server):
    server.push(server.text("I think we should raise the learning rate."),
                server.text("Sure! Here it is:\nLEARNING_RATE = 0.02"),
                server.text(hp_answer("lr 0.02", lr=0.02)))
    summary, rec, _ = run_agent(repo, server, max_experiments=3)
    assert summary.ok
    assert statuses(repo) == [("exp0", "keep"), ("exp1", "skip"), ("exp2", "keep")]
    assert "exp0..exp2: 2 experiments with a result, 1 skipped (no experiment ran" in summary.reason  # not hidden
    skip = rows(repo)[1]
    assert "unusable answer" in skip["notes"] and "DESCRIPTION" in skip["notes"] and skip["commit"] == "-"
    assert "DESCRIPTION" in server.prompts()[1]  # the corrective message repeats the format
    assert subjects(repo) == ["exp2: lr 0.02", "initial"] and tracked_clean(repo)


def test_runtime_crash_traceback_reaches_the_next_prompt(repo, server):
    server.push(server.text(hp_answer("crashy", mode="crash")), server.text(hp_answer("lr 0.02", lr=0.02)))
    summary, rec, _ = run_agent(repo, server, max_experiments=3)
    assert statuses(repo) == [("exp0", "keep"), ("exp1", "crash"), ("exp2", "keep")]
    crash = rows(repo)[1]
    assert crash["val_bpb"] == "0.000000" and crash["memory_gb"] == "0.0"
    assert "exit code 1" in crash["notes"] and "ValueError: boom" in crash["notes"]
    second = server.prompts()[1]
    assert "Traceback (most recent call last)" in second and "ValueError: boom: shapes (4, 8)" in second
    assert 'MODE = "ok"' in second  # the crashing edit was reverted before the next prompt
    assert subjects(repo) == ["exp2: lr 0.02", "initial"]


def test_hang_is_killed_at_the_deadline_with_its_process_group(repo, server):
    server.push(server.text(hp_answer("hang", mode="hang")))
    t0 = time.monotonic()
    summary, rec, _ = run_agent(repo, server, max_experiments=2, timeout=2.0)
    assert time.monotonic() - t0 < 12
    assert statuses(repo) == [("exp0", "keep"), ("exp1", "crash")]
    assert "timed out" in rows(repo)[1]["notes"]
    assert any("sleep(600)" in c for c in rec.commands.values()) and any("train.py" in c for c in rec.commands.values())
    assert all(gone(p) for p in rec.processes.values())  # the trainer and its grandchild
    assert 'MODE = "ok"' in script(repo) and tracked_clean(repo)


@pytest.mark.parametrize("mode,note", [("nan", "FAIL"), ("nanbpb", "not a finite")])
def test_nan_is_a_crash(repo, server, mode, note):
    server.push(server.text(hp_answer(mode, mode=mode)))
    run_agent(repo, server, max_experiments=2)
    assert statuses(repo) == [("exp0", "keep"), ("exp1", "crash")]
    assert note in rows(repo)[1]["notes"]
    assert subjects(repo) == ["initial"]


@pytest.mark.parametrize("sandbox,note", [
    ("none", "protected files (prepare.py)"),  # changed, found, undone
    pytest.param("auto", "Read-only file system: 'prepare.py'", marks=needs_bwrap)])  # never changed
def test_changing_a_protected_file_is_a_crash_and_is_undone(repo, server, sandbox, note):
    original = (repo / "prepare.py").read_bytes()
    # this edit would "win" (lr 0.02) if the tampering went unnoticed
    server.push(server.text(hp_answer("cheat", mode="tamper", lr=0.02)))
    run_agent(repo, server, max_experiments=2, sandbox=sandbox)
    assert statuses(repo) == [("exp0", "keep"), ("exp1", "crash")]
    assert note in rows(repo)[1]["notes"]
    assert (repo / "prepare.py").read_bytes() == original and tracked_clean(repo)


def test_unicode_output_is_decoded_intact(repo, server):
    server.push(server.text(hp_answer("unicode", mode="unicode", lr=0.02)))
    summary, rec, _ = run_agent(repo, server, max_experiments=2)
    assert "données d'entraînement — 你好 ✓ naïve" in rec.of("output")
    assert "你好" in (repo / "runs" / "exp1.log").read_text(encoding="utf-8")


# ---------------------------------------------------------------------------
# LLM faults
# ---------------------------------------------------------------------------


def test_rate_limit_then_success(repo, server):
    server.push(server.error(429, "rate limited", retry_after="0.3"), server.text(hp_answer("lr", lr=0.02)))
    summary, rec, _ = run_agent(repo, server, max_experiments=2)
    assert statuses(repo) == [("exp0", "keep"), ("exp1", "keep")]
    waits = [m for s, m in rec.of("state") if s == "waiting"]
    assert waits and "429" in waits[0] and "in 0.3s" in waits[0]
    reqs = server.chat_requests()
    assert reqs[1].at - reqs[0].at >= 0.3


def test_an_answer_trickling_past_llm_timeout_is_abandoned_and_asked_again_smaller(repo, server):
    slow = server.trickling(server.text(hp_answer("the trickled answer", lr=0.05)), every=0.05)  # ~25 s in all
    server.push(slow, server.text(hp_answer("the prompt answer", lr=0.02)))
    summary, rec, _ = run_agent(repo, server, max_experiments=2, llm_timeout=1.0)
    assert statuses(repo) == [("exp0", "keep"), ("exp1", "keep")]
    assert rows(repo)[1]["description"] == "the prompt answer"
    first, second = [r.body for r in server.chat_requests()]
    assert second["max_tokens"] < first["max_tokens"]  # never the identical request again
    assert any("no complete answer within 1s; asking once more with a smaller request" in m
               for m in rec.logs("warning"))


def test_overload_storm_skips_the_experiment_pauses_and_goes_on(repo, server):
    server.push(*[server.error(529, "Overloaded") for _ in range(3)], server.text(hp_answer("lr", lr=0.02)))
    summary, rec, _ = run_agent(repo, server, max_experiments=3, llm_attempts=3, outage_pause=0.2)
    assert summary.ok
    assert statuses(repo) == [("exp0", "keep"), ("exp1", "skip"), ("exp2", "keep")]
    assert "LLM unavailable after 3 attempts" in rows(repo)[1]["notes"] and "529" in rows(repo)[1]["notes"]
    assert any(s == "paused" and "LLM unavailable" in m for s, m in rec.of("state"))


def test_too_many_skips_in_a_row_stop_the_loop(repo, server):
    server.default_chat = lambda body: server.error(503, "down")
    summary, rec, _ = run_agent(repo, server, max_experiments=20, llm_attempts=2, max_consecutive_skips=3)
    assert not summary.ok and "3 experiments in a row were skipped" in summary.reason
    assert [s for _, s in statuses(repo)] == ["keep", "skip", "skip", "skip"]


def test_auth_failure_at_start_stops_before_touching_git(repo, server):
    server.push_check(server.error(401, "invalid x-api-key"))
    summary, rec, _ = run_agent(repo, server)
    assert not summary.ok
    assert "authentication failed" in summary.reason and "--setup-key --provider anthropic" in summary.reason
    assert rec.states()[-1] == "failed"
    assert BRANCH not in git(repo, "branch", "--list") and rows(repo) == []
    AgentLock(repo / ".agent.lock").acquire().release()  # the lock was released


def test_auth_failure_mid_loop_stops_with_a_clear_message(repo, server):
    server.push(server.error(401, "invalid x-api-key"))
    summary, rec, _ = run_agent(repo, server, max_experiments=5)
    assert not summary.ok and "authentication failed" in summary.reason
    assert statuses(repo) == [("exp0", "keep")]
    assert subjects(repo) == ["initial"] and tracked_clean(repo)
    assert any("authentication failed" in m for m in rec.logs("error"))


# ---------------------------------------------------------------------------
# Refusals and recovery
# ---------------------------------------------------------------------------


def test_dirty_work_tree_is_refused_naming_the_files(repo, server):
    (repo / USER_TRACKED).write_text("my unsaved work\n")
    (repo / "prepare.py").write_text("# edited\n")
    summary, rec, _ = run_agent(repo, server)
    assert not summary.ok
    assert "uncommitted changes" in summary.reason and USER_TRACKED in summary.reason and "prepare.py" in summary.reason
    assert (repo / USER_TRACKED).read_text() == "my unsaved work\n"
    assert server.chat_requests() == [] and BRANCH not in git(repo, "branch", "--list")


def test_uncommitted_training_script_is_saved_then_restored(repo, server):
    (repo / "train.py").write_text(script(repo).replace("DEPTH = 4", "DEPTH = 7"))
    summary, rec, _ = run_agent(repo, server, max_experiments=1)
    assert summary.ok and statuses(repo) == [("exp0", "keep")]
    saved = list((repo / "runs").glob("rescued-*-train.py"))
    assert len(saved) == 1 and "DEPTH = 7" in saved[0].read_text()
    assert "DEPTH = 4" in script(repo) and any("saved them to" in m for m in rec.logs("warning"))


def test_a_second_agent_is_refused(repo, server):
    with AgentLock(repo / ".agent.lock"):
        summary, rec, _ = run_agent(repo, server)
    assert not summary.ok and "another agent is already running" in summary.reason
    assert BRANCH not in git(repo, "branch", "--list")


def test_resume_continues_numbering_with_the_best_so_far(repo, server):
    server.push(server.text(hp_answer("lr 0.02", lr=0.02)))
    assert run_agent(repo, server, max_experiments=2)[0].ok
    server.push(server.text(hp_answer("depth 5", lr=0.02, depth=5)), server.text(hp_answer("lr 0.03", lr=0.03)))
    summary, rec, _ = run_agent(repo, server, max_experiments=4)
    assert summary.ok
    assert statuses(repo) == [("exp0", "keep"), ("exp1", "keep"), ("exp2", "keep"), ("exp3", "discard")]
    assert any("resuming at exp2" in m for m in rec.logs())
    assert "Best val_bpb so far: 1.020000 (exp1)" in server.prompts()[1]
    assert subjects(repo) == ["exp2: depth 5", "exp1: lr 0.02", "initial"]


def test_interrupted_experiment_commit_is_reverted_on_start(repo, server):
    assert run_agent(repo, server, max_experiments=1)[0].ok
    # what a kill -9 after "git commit" leaves behind: an experiment commit without a result row
    (repo / "train.py").write_text(script(repo).replace("DEPTH = 4", "DEPTH = 9"))
    git(repo, "commit", "-qam", "exp1: deeper")
    server.push(server.text(hp_answer("lr 0.02", lr=0.02)))
    summary, rec, _ = run_agent(repo, server, max_experiments=2)
    assert summary.ok and statuses(repo) == [("exp0", "keep"), ("exp1", "keep")]
    assert any("exp1 was interrupted" in m for m in rec.logs("warning"))
    assert subjects(repo) == ["exp1: lr 0.02", "initial"] and "DEPTH = 9" not in script(repo)


def test_crashed_baseline_makes_the_first_success_a_keep_that_says_so(tmp_path, server):
    repo = agent_repo(tmp_path / "repo", FAKE_TRAIN.read_text().replace('MODE = "ok"', 'MODE = "crash"'))
    server.push(server.text(hp_answer("fix", mode="ok")))
    summary, rec, _ = run_agent(repo, server, max_experiments=2)
    assert statuses(repo) == [("exp0", "crash"), ("exp1", "keep")]
    assert "kept without comparison" in rows(repo)[1]["notes"] and "baseline did not complete" in rows(repo)[1]["notes"]
    assert any("baseline crashed" in m for m in rec.logs("error"))


# ---------------------------------------------------------------------------
# Commands from another thread (what the dashboard's keys do)
# ---------------------------------------------------------------------------


def _on_first_step_of(rec, orch_box, exp, command):
    fired = []

    def hook(step):
        starts = rec.of("start")
        if not fired and starts and starts[-1].exp == exp:
            fired.append(True)
            threading.Thread(target=lambda: getattr(orch_box[0], command)()).start()

    rec.on_step_hook = hook


def _run_with_command(repo, server, exp, command, **overrides):
    rec, box = Recorder(), []
    _on_first_step_of(rec, box, exp, command)
    orch = Orchestrator(make_config(repo, server, **overrides), [rec])
    box.append(orch)
    return orch.run(), rec, orch


def test_skip_current_kills_training_records_a_skip_and_continues(repo, server):
    server.push(server.text(hp_answer("slow", mode="slow")), server.text(hp_answer("lr", lr=0.02)))
    t0 = time.monotonic()
    summary, rec, _ = _run_with_command(repo, server, 1, "skip_current", max_experiments=3)
    assert time.monotonic() - t0 < 15 and summary.ok
    assert statuses(repo) == [("exp0", "keep"), ("exp1", "skip"), ("exp2", "keep")]
    assert "skipped by the user" in rows(repo)[1]["notes"]
    assert subjects(repo) == ["exp2: lr", "initial"]
    assert all(dead(p) for p in rec.of("pid") if p)


def test_abort_kills_now_reverts_and_records_nothing(repo, server):
    server.push(server.text(hp_answer("slow", mode="slow")))
    t0 = time.monotonic()
    summary, rec, orch = _run_with_command(repo, server, 1, "abort", max_experiments=5)
    assert time.monotonic() - t0 < 15
    assert summary.ok and summary.aborted and summary.reason == "stopped on request"
    assert rec.processes and all(gone(p) for p in rec.processes.values())
    assert statuses(repo) == [("exp0", "keep")]  # exp1 runs again next time
    assert subjects(repo) == ["initial"] and tracked_clean(repo) and 'MODE = "ok"' in script(repo)
    assert orch.training_pid is None
    AgentLock(repo / ".agent.lock").acquire().release()


def test_stop_finishes_the_current_experiment_then_stops(repo, server):
    server.push(server.text(hp_answer("lr", lr=0.02, steps=8, step_sleep=0.05)))
    summary, rec, _ = _run_with_command(repo, server, 1, "stop", max_experiments=5)
    assert summary.ok and not summary.aborted and summary.reason == "stopped on request"
    assert statuses(repo) == [("exp0", "keep"), ("exp1", "keep")]
    assert len(server.chat_requests()) == 1


def test_pause_after_the_current_experiment_then_resume(repo, server):
    server.push(server.text(hp_answer("lr", lr=0.02)), server.text(hp_answer("lr3", lr=0.03)))
    rec, box = Recorder(), []
    _on_first_step_of(rec, box, 1, "pause")
    seen = []

    class ResumeWhenPaused(Recorder):
        def on_state(self, state, message):
            if state.value == "paused" and not seen:
                seen.append(statuses(repo))
                threading.Timer(0.3, box[0].resume).start()

    orch = Orchestrator(make_config(repo, server, max_experiments=3), [rec, ResumeWhenPaused()])
    box.append(orch)
    summary = orch.run()
    assert summary.ok
    assert seen == [[("exp0", "keep"), ("exp1", "keep")]]  # paused only after exp1 was recorded
    assert statuses(repo) == [("exp0", "keep"), ("exp1", "keep"), ("exp2", "discard")]


# ---------------------------------------------------------------------------
# Scopes and providers
# ---------------------------------------------------------------------------


def test_file_scope_search_replace_edit_is_kept(repo, server):
    server.push(server.text(file_answer([("    loss = 3.0 - 0.1 * step", "    loss = 2.5 - 0.1 * step"),
                                         ("LEARNING_RATE = 0.01", "LEARNING_RATE = 0.02")], "lower loss and lr")))
    summary, rec, _ = run_agent(repo, server, max_experiments=2, scope="file")
    assert statuses(repo) == [("exp0", "keep"), ("exp1", "keep")]
    assert "loss = 2.5 - 0.1 * step" in script(repo)
    assert "import json" in server.prompts()[0]  # the whole script was shown
    assert "<<<<<<< SEARCH" in server.chat_requests()[0].body["system"]


@pytest.mark.parametrize("kind", ["openai", "ollama"])
def test_other_providers_drive_the_loop(repo, monkeypatch, kind):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    s = FakeLLMServer(kind).start()
    try:
        s.push(s.text(hp_answer("lr", lr=0.02), 500, 100))
        summary, rec, _ = run_agent(repo, s, provider=kind, max_experiments=2)
        assert summary.ok and statuses(repo) == [("exp0", "keep"), ("exp1", "keep")]
        assert rows(repo)[1]["llm_tokens"] == "600" and rows(repo)[1]["llm_cost"] == "0.000000"  # local: free
    finally:
        s.stop()


# ---------------------------------------------------------------------------
# Secrets
# ---------------------------------------------------------------------------


def test_no_key_in_child_env_log_results_commits_or_status(repo, server, monkeypatch):
    secrets = {"OPENAI_API_KEY": "sk-openai-SECRET-4444", "HF_TOKEN": "hf_SECRETTOKEN5555",
               "MY_DB_PASSWORD": "hunter2-SECRET-6666", "AWS_SECRET_ACCESS_KEY": "aws-SECRET-7777"}
    for k, v in secrets.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("AUTORESEARCH_FAKE_PRINT_ENV", "1")  # each run's environment goes into its log
    values = [TEST_KEY, *secrets.values()]
    # a model that (somehow) echoes the key: it must be redacted from the commit message and results
    server.push(server.text(hp_answer(f"lr 0.02 {TEST_KEY}", lr=0.02)), server.text(hp_answer("crash", mode="crash")))
    out, err = io.StringIO(), io.StringIO()
    code = run_headless(make_config(repo, server, max_experiments=3), out=out, err=err)
    assert code == 0

    dumps = [ln for log in sorted((repo / "runs").glob("exp*.log"))
             for ln in log.read_text().splitlines() if ln.startswith("fake_train env: ")]
    assert len(dumps) == 3
    for d in dumps:
        env = json.loads(d[len("fake_train env: "):])
        assert not {"ANTHROPIC_API_KEY", *secrets} & set(env)
        assert not [v for v in env.values() if any(s in v for s in values)]
        assert env["PYTHONUNBUFFERED"] == "1"
    texts = {
        "console": out.getvalue() + err.getvalue(),
        "results": (repo / "results.tsv").read_text(),
        "status": (repo / ".runner_status.json").read_text(),
        "git": git(repo, "log", "-p", "--all"),
        "runs": "".join(p.read_text() for p in (repo / "runs").glob("*.log")),
    }
    for where, text in texts.items():
        assert not [v for v in values if v in text], where
    assert "[redacted]" in texts["results"] and "[redacted]" in texts["git"]
    status = json.loads(texts["status"])
    assert status["alive"] is False and status["kept"] == 2 and status["crashed"] == 1


# ---------------------------------------------------------------------------
# Extension points (the dashboard and the noise-aware keep rule build on these)
# ---------------------------------------------------------------------------


def test_keep_rule_can_ask_for_a_rerun_with_another_seed(repo, server):
    from tui.decision import KeepRule, Verdict

    class ConfirmOnce(KeepRule):
        name = "confirm-once"
        seen = []

        def decide(self, candidate, history):
            self.seen.append((candidate.exp, list(candidate.runs), list(candidate.seeds)))
            if candidate.baseline:
                return Verdict("keep", "baseline")
            if len(candidate.runs) == 1:
                return Verdict("rerun", "confirming", seed=7)
            return Verdict("keep", f"confirmed over {len(candidate.runs)} runs")

        def prompt_notes(self, history):
            return ["NOTE FROM THE KEEP RULE"]

    server.push(server.text(hp_answer("lr", lr=0.02)))
    rule = ConfirmOnce()
    orch = Orchestrator(make_config(repo, server, max_experiments=2), [], keep_rule=rule)
    assert orch.run().ok
    assert rule.seen == [(0, [1.03], [None]), (1, [1.02], [None]), (1, [1.02, 1.02], [None, 7])]
    assert [(r["exp"], r["status"], r["notes"]) for r in rows(repo)][1:] == [
        ("exp1", "keep", "confirmed over 2 runs"), ("exp1", "keep", "confirmed over 2 runs")]
    assert "Seed 7" in (repo / "runs" / "exp1-run1.log").read_text()
    assert "NOTE FROM THE KEEP RULE" in server.prompts()[0]


def test_a_failing_listener_never_stops_the_loop(repo, server):
    class Broken(Recorder):
        def on_step(self, step):
            raise RuntimeError("display bug")

    rec = Recorder()
    server.push(server.text(hp_answer("lr", lr=0.02)))
    orch = Orchestrator(make_config(repo, server, max_experiments=2), [Broken(), rec])
    assert orch.run().ok and statuses(repo) == [("exp0", "keep"), ("exp1", "keep")]
    errors = [m for m in rec.logs("error") if "display bug" in m]
    assert len(errors) == 1 and "Broken.on_step" in errors[0]


def test_stop_before_the_loop_starts_is_a_clean_stop(repo, server):
    server.push_check(server.error(503, "warming up"), server.error(503, "warming up"))
    orch = Orchestrator(make_config(repo, server, llm_attempts=3, backoff_base=2.0, backoff_cap=2.0))
    threading.Timer(0.3, orch.stop).start()
    t0 = time.monotonic()
    summary = orch.run()
    assert time.monotonic() - t0 < 2.0
    assert summary.ok and summary.reason == "stopped on request" and rows(repo) == []
