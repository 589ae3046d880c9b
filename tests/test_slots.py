"""Several slots (--workers 2): real repositories, the stand-in trainer as real processes, the scripted LLM server.

The stand-in trainer's block is laid out so that the learning rate (with the run length, STEPS) and the depth are
separate hunks: two candidates that change one each merge cleanly; two that both change the learning rate conflict.
val_bpb = 1 + 100 (lr - 0.02)^2 + 0.01 |depth - 6|: the baseline (lr 0.01, depth 4) is 1.03.
"""

import time
from pathlib import Path

import pytest

from fakes.agent import Recorder, file_answer, make_config
from fakes.repo import FAKE_TRAIN, agent_repo, git
from tui.orchestrator import Orchestrator
from tui.results import ResultsFile, summarize

BRANCH = "autoresearch/t1"
SOURCE = (FAKE_TRAIN.read_text().replace("DEPTH = 4\n", "")
          .replace("STEPS = 5\n", "STEPS = 5\n# the model\nDEPTH = 4\n").replace("STEP_SLEEP = 0.0", "STEP_SLEEP = 0.1"))
SLOW_LR = file_answer([("LEARNING_RATE = 0.01", "LEARNING_RATE = 0.02"), ("STEPS = 5", "STEPS = 25")],
                      description="lr 0.02, longer")  # 1.02 on the baseline, 2.5 s of training
DEPTH = file_answer([("DEPTH = 4", "DEPTH = 4.5")], description="depth 4.5")  # 1.025 on the baseline
LOWER_LR = file_answer([("LEARNING_RATE = 0.01", "LEARNING_RATE = 0.015")], description="lr 0.015")  # 1.0225
WORSE = file_answer([("LEARNING_RATE = 0.01", "LEARNING_RATE = 0.005")], description="lr 0.005")  # worse


@pytest.fixture
def repo(tmp_path):
    return agent_repo(tmp_path / "repo", SOURCE)


class Timeline(Recorder):
    """When each experiment's runs started and ended (on the engine's thread, monotonic seconds)."""

    def __init__(self):
        super().__init__()
        self.starts, self.ends = {}, {}

    def on_experiment_start(self, info):
        super().on_experiment_start(info)
        self.starts.setdefault(info.exp, time.monotonic())

    def on_experiment_end(self, result):
        super().on_experiment_end(result)
        self.ends[result.exp] = time.monotonic()


def run_slots(repo, server, max_experiments, rec=None, **overrides):
    rec = rec or Timeline()
    cfg = make_config(repo, server, scope="file", workers=2, max_experiments=max_experiments, sandbox="none",
                      **overrides)
    return Orchestrator(cfg, [rec]).run(), rec


def rows(repo):
    return ResultsFile(Path(repo) / "results.tsv").load()


def subjects(repo, ref=BRANCH):
    return git(repo, "log", "--format=%s", ref).splitlines()


def rev(repo, ref):
    return git(repo, "rev-parse", ref).strip()


def test_two_slots_at_once_and_a_win_on_an_old_parent_is_reapplied_and_confirmed(repo, server):
    server.push(server.text(SLOW_LR), server.text(DEPTH), server.text(WORSE))
    summary, rec = run_slots(repo, server, max_experiments=4)
    assert summary.ok, summary.reason
    # exp1 (slow) and exp2 started side by side on the baseline; exp2 was kept while exp1 still trained
    assert rec.starts[2] < rec.ends[1] and rec.starts[1] < rec.ends[2] and rec.ends[2] < rec.ends[1]
    r = rows(repo)
    table = [(x.exp, x.status, x.run, x.kind) for x in r]
    assert table[0] == (0, "keep", 0, "") and (2, "keep", 0, "") in table and (3, "discard", 0, "") in table
    exp1 = [x for x in r if x.exp == 1]
    # its first number was measured on the baseline: kept for the record, not scored; then measured on exp2
    assert [(x.status, x.run, x.kind) for x in exp1] == [("keep", 0, "superseded"), ("keep", 1, "confirm")]
    base, exp2 = rev(repo, "main"), rev(repo, "refs/autoresearch/t1/exp2")
    assert exp1[0].parent == base[:7] and exp1[1].parent == exp2[:7]
    assert exp1[0].val_bpb == pytest.approx(1.02) and exp1[1].val_bpb == pytest.approx(1.015)
    assert {x.worker for x in r} == {"slot 1 cpu", "slot 2 cpu"}
    s = summarize(r)
    assert s.best_exp == 1 and s.best_val_bpb == pytest.approx(1.015) and s.best_runs == 1
    # the branch moved on the keeps only: exp2, then exp1 re-applied on it; exp3 stays on its own ref
    assert subjects(repo)[:2] == [f"exp1: lr 0.02, longer (re-applied on {exp2[:7]})", "exp2: depth 4.5"]
    assert rev(repo, BRANCH) == rev(repo, "refs/autoresearch/t1/exp1")
    assert subjects(repo, "refs/autoresearch/t1/exp3")[0] == "exp3: lr 0.005" and "exp3: lr 0.005" not in subjects(repo)
    work = (repo / "train.py").read_text()
    assert "LEARNING_RATE = 0.02" in work and "DEPTH = 4.5" in work  # the work tree holds the best
    assert git(repo, "status", "--porcelain", "--untracked-files=no").strip() == ""
    # the LLM saw the experiment in flight when it was asked for the next one
    assert "Experiments training right now" in server.prompts()[1] and "- exp1: lr 0.02, longer" in \
        server.prompts()[1]
    assert not list((repo / "runs").glob("pending-*"))


def test_a_win_that_no_longer_applies_on_the_new_best_is_discarded_with_the_reason(repo, server):
    server.push(server.text(SLOW_LR), server.text(LOWER_LR))
    summary, rec = run_slots(repo, server, max_experiments=3)
    assert summary.ok, summary.reason
    r = {x.exp: x for x in rows(repo)}
    assert r[2].status == "keep" and r[1].status == "discard"
    assert "no longer applies on the new best" in r[1].notes
    assert subjects(repo)[:2] == ["exp2: lr 0.015", "initial"]
    assert "LEARNING_RATE = 0.015" in (repo / "train.py").read_text()
