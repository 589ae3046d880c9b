"""Races with the user, tried the way a hostile (or just busy) user would: real git repositories, the stand-in
trainer as a real subprocess, the real Anthropic SDK against a local server. The user acts while a run trains (from
the first progress line of that experiment) or between two starts of the agent."""

import subprocess
from pathlib import Path

import pytest

from fakes.agent import Recorder, hp_answer, make_config
from fakes.repo import FAKE_PREPARE, agent_repo, git
from tui.orchestrator import Orchestrator
from tui.results import ResultsFile

BRANCH = "autoresearch/t1"


@pytest.fixture
def repo(tmp_path):
    return agent_repo(tmp_path / "repo")


def run_agent(repo, server, during=None, exp=1, **overrides):
    """Run the loop; `during(repo)` is called once, on the first progress line of experiment `exp`."""
    rec, fired = Recorder(), []

    def hook(step):
        starts = rec.of("start")
        if during and not fired and starts and starts[-1].exp == exp:
            fired.append(True)
            during(repo)

    rec.on_step_hook = hook
    summary = Orchestrator(make_config(repo, server, **overrides), [rec]).run()
    return summary, rec


def statuses(repo):
    return [(r.exp, r.status) for r in ResultsFile(Path(repo) / "results.tsv").load()]


def subjects(repo, ref=BRANCH):
    return git(repo, "log", "--format=%s", ref).splitlines()


def script(repo):
    return (Path(repo) / "train.py").read_text()


# ---------------------------------------------------------------------------
# 1. git checkout main while an experiment trains
# ---------------------------------------------------------------------------


def test_checkout_of_another_branch_during_a_run_stops_the_loop_and_touches_nothing(repo, server):
    main_before = git(repo, "rev-parse", "main").strip()
    original = script(repo)
    server.push(server.text(hp_answer("worse lr", lr=0.05)), server.text(hp_answer("lr 0.02", lr=0.02)))
    summary, rec = run_agent(repo, server, during=lambda r: git(r, "checkout", "-q", "main"), max_experiments=3)

    assert not summary.ok and "checked out" in summary.reason and BRANCH in summary.reason
    assert git(repo, "rev-parse", "main").strip() == main_before  # no revert commit, no experiment on main
    assert git(repo, "rev-parse", "--abbrev-ref", "HEAD").strip() == "main" and script(repo) == original
    assert git(repo, "status", "--porcelain", "--untracked-files=no").strip() == ""
    assert subjects(repo)[0] == "exp1: worse lr"  # the experiment stays on its branch, unrecorded
    assert statuses(repo) == [(0, "keep")]

    # the next start repairs it: exp1 is reverted as interrupted and runs again
    server.push(server.text(hp_answer("lr 0.02", lr=0.02)))
    summary, rec = run_agent(repo, server, max_experiments=2)
    assert summary.ok and statuses(repo) == [(0, "keep"), (1, "keep")]
    assert any("exp1 was interrupted" in m for m in rec.logs("warning"))
    assert git(repo, "rev-parse", "main").strip() == main_before


def test_a_commit_by_the_user_on_the_agent_branch_during_a_run_is_left_alone(repo, server):
    server.push(server.text(hp_answer("worse lr", lr=0.05)))

    def user_commits(r):
        (r / "docs" / "notes.md").write_text("my commit while it trains\n")
        git(r, "commit", "-qam", "user: notes")

    summary, _ = run_agent(repo, server, during=user_commits, max_experiments=3)
    assert not summary.ok and "moved" in summary.reason
    assert subjects(repo)[:2] == ["user: notes", "exp1: worse lr"]  # no reset under the user's commit
    assert (repo / "docs" / "notes.md").read_text() == "my commit while it trains\n"


# ---------------------------------------------------------------------------
# 2. the user edits train.py during a run
# ---------------------------------------------------------------------------


def test_an_edit_of_the_script_during_a_run_is_rescued_before_the_revert(repo, server):
    server.push(server.text(hp_answer("worse lr", lr=0.05)))
    summary, rec = run_agent(repo, server, max_experiments=2,
                             during=lambda r: (r / "train.py").write_text(script(r) + "# my own idea\n"))
    assert summary.ok and statuses(repo) == [(0, "keep"), (1, "discard")]
    saved = list((repo / "runs").glob("rescued-*-train.py"))
    assert len(saved) == 1 and saved[0].read_text().endswith("# my own idea\n")
    assert any(str(saved[0]) in m for m in rec.logs("warning"))
    assert "# my own idea" not in script(repo) and "LEARNING_RATE = 0.01" in script(repo)


def test_an_edit_during_a_kept_run_is_rescued_before_the_next_experiment_is_written(repo, server):
    server.push(server.text(hp_answer("lr 0.02", lr=0.02)), server.text(hp_answer("depth 5", lr=0.02, depth=5)))
    summary, rec = run_agent(repo, server, max_experiments=3,
                             during=lambda r: (r / "train.py").write_text(script(r) + "# keep this\n"))
    assert summary.ok and statuses(repo)[:2] == [(0, "keep"), (1, "keep")]
    saved = list((repo / "runs").glob("rescued-*-train.py"))
    assert len(saved) == 1 and saved[0].read_text().endswith("# keep this\n")


# ---------------------------------------------------------------------------
# 3. a restart from another branch after the branch was pushed never undoes a revert
# ---------------------------------------------------------------------------


def test_restart_after_push_never_reverts_a_revert(repo, server, tmp_path):
    subprocess.run(["git", "init", "-q", "--bare", str(tmp_path / "remote.git")], check=True)
    git(repo, "remote", "add", "origin", str(tmp_path / "remote.git"))
    original = script(repo)
    server.push(server.text(hp_answer("worse lr", lr=0.05)))
    summary, _ = run_agent(repo, server, max_experiments=2,
                           during=lambda r: git(r, "push", "-q", "origin", BRANCH))
    assert summary.ok and statuses(repo) == [(0, "keep"), (1, "discard")]
    assert subjects(repo)[:2] == ["exp1: revert (discard)", "exp1: worse lr"]  # pushed: reverted by a commit
    assert script(repo) == original

    for _ in range(2):  # it used to flip the change back in on every restart
        git(repo, "checkout", "-q", "main")
        summary, rec = run_agent(repo, server, max_experiments=2)
        assert summary.ok
        assert subjects(repo)[:2] == ["exp1: revert (discard)", "exp1: worse lr"]
        assert script(repo) == original and not any("interrupted" in m for m in rec.logs())


def test_an_experiment_with_a_row_is_never_reverted_on_restart(repo, server):
    server.push(server.text(hp_answer("lr 0.02", lr=0.02)))
    assert run_agent(repo, server, max_experiments=2)[0].ok
    kept = script(repo)
    rows = ResultsFile(repo / "results.tsv")
    rows.ensure()
    data = (repo / "results.tsv").read_text().splitlines(keepends=True)
    # a kept experiment whose status later reads "discard" (an older version, an edited file): HEAD is still exp1
    (repo / "results.tsv").write_text("".join(data[:2]) + data[2].replace("\tkeep\t", "\tdiscard\t", 1))
    git(repo, "checkout", "-q", "main")
    summary, rec = run_agent(repo, server, max_experiments=2)
    assert summary.ok and script(repo) == kept and subjects(repo)[0] == "exp1: lr 0.02"


# ---------------------------------------------------------------------------
# 4. resuming after prepare.py changed on main
# ---------------------------------------------------------------------------


def test_resume_after_prepare_changed_on_main_is_not_tampering(repo, server):
    assert run_agent(repo, server, max_experiments=1)[0].ok
    git(repo, "checkout", "-q", "main")
    (repo / "prepare.py").write_text(FAKE_PREPARE + "# a fix on main\n")
    git(repo, "commit", "-qam", "prepare: a fix on main")
    server.push(server.text(hp_answer("lr 0.02", lr=0.02)))
    summary, rec = run_agent(repo, server, max_experiments=2)
    assert summary.ok and statuses(repo) == [(0, "keep"), (1, "keep")]
    assert not any("protected" in m for m in rec.logs())
    assert "# a fix on main" not in (repo / "prepare.py").read_text()  # the branch's own prepare.py
