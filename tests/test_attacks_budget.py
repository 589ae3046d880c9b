"""Attacks 2 and 3 of issue 12 through the real loop: an edit that rebinds the evaluation or the budget from the
hyperparameter block, and a trainer that simply trains longer than its budget. The scripted LLM returns the edit; the
stand-in trainer runs as a real subprocess in a real git repository."""

from pathlib import Path

import pytest

from fakes.agent import Recorder, file_answer, hp_answer, make_config
from fakes.repo import FAKE_TRAIN, agent_repo, git
from tui.orchestrator import Orchestrator
from tui.results import ResultsFile

# the stand-in trainer, importing what the real one imports from prepare.py
TRAIN = FAKE_TRAIN.read_text().replace("import zlib\n", "import zlib\n\nfrom prepare import TIME_BUDGET\n", 1)


@pytest.fixture
def repo(tmp_path):
    return agent_repo(tmp_path / "repo", TRAIN)


def run(repo, server, **overrides):
    rec = Recorder()
    return Orchestrator(make_config(repo, server, **overrides), [rec]).run(), rec


def rows(repo):
    return ResultsFile(Path(repo) / "results.tsv").load()


@pytest.mark.parametrize("line", ["TIME_BUDGET = 24", "evaluate_bpb = lambda *a, **k: 0.000001"])
def test_rebinding_the_budget_or_the_evaluation_from_the_hparams_block_is_refused(repo, server, line):
    hostile = hp_answer("more time", lr=0.02, extra=line)
    server.push(server.text(hostile), server.text(hostile))  # the corrective retry gets the same answer
    summary, rec = run(repo, server, max_experiments=2)
    assert summary.ok and [(r.exp, r.status) for r in rows(repo)] == [(0, "keep"), (1, "skip")]
    notes = rows(repo)[1].notes
    assert "unusable answer" in notes and ("outside the hyperparameter block" in notes or "literal value" in notes)
    assert line not in (repo / "train.py").read_text()
    assert git(repo, "log", "--format=%s", "autoresearch/t1").splitlines() == ["initial"]


def test_a_trainer_that_trains_past_its_budget_is_not_kept_whatever_it_reports(repo, server):
    # a better val_bpb (lr 0.02), bought by training 4 s on a 1 s budget: the printed numbers look fine
    edit = file_answer([("LEARNING_RATE = 0.01", "LEARNING_RATE = 0.02\ntime.sleep(4)  # the budget is a suggestion")],
                       description="lr 0.02, and a little more time")
    server.push(server.text(edit))
    summary, rec = run(repo, server, max_experiments=2, scope="file", time_budget=1.0, budget_allowance=1.5)
    assert summary.ok and [(r.exp, r.status) for r in rows(repo)] == [(0, "keep"), (1, "crash")]
    assert "past the 1s budget" in rows(repo)[1].notes
    assert "LEARNING_RATE = 0.01" in (repo / "train.py").read_text()  # reverted
