"""The sealed evaluation end to end: the real train.py and prepare.py in a temporary repository, a tiny dataset, the
real loop with a scripted LLM. The baseline's val_bpb is the evaluator's; an edit that prints a fake summary and
exits before exporting is a crash, never a keep."""

import sys
from pathlib import Path

import pytest

from fakes.agent import Recorder, file_answer, make_config
from fakes.repo import git, project_repo
from test_trainers import uniform_bpb
from trainer_fixtures import TINY_MODEL, edit_hparams, tiny_dataset  # noqa: F401  (tiny_dataset is a fixture)
from tui.orchestrator import Orchestrator
from tui.results import ResultsFile

END_OF_TRAINING = "    total_tokens = step * TOTAL_BATCH_SIZE"
FAKE_SUMMARY = END_OF_TRAINING + '\n    print("---")\n    print("val_bpb:          0.000001")\n    sys.exit(0)'


@pytest.mark.long  # two real training runs and one sealed evaluation: ~3 minutes on 2 cores (not in CI)
def test_real_trainer_a_fake_summary_is_not_kept_and_a_real_run_is_scored_by_the_evaluator(tiny_dataset, tmp_path,
                                                                                          server, monkeypatch):
    for name, value in {**tiny_dataset, "AUTORESEARCH_BACKEND": "cpu"}.items():
        monkeypatch.setenv(name, value)  # what run_env passes on to the trainer and the evaluator
    repo = project_repo(tmp_path / "repo")
    (repo / "train.py").write_text(edit_hparams((repo / "train.py").read_text(), **TINY_MODEL))
    git(repo, "commit", "-qam", "a tiny model")
    server.push(server.text(file_answer([(END_OF_TRAINING, FAKE_SUMMARY)], description="a record")))
    config = make_config(repo, server, max_experiments=2, scope="file", dataset="tiny", time_budget=2.0,
                         timeout=900.0, budget_allowance=900.0, python=sys.executable)
    summary = Orchestrator(config, [Recorder()]).run()
    rows = ResultsFile(Path(repo) / "results.tsv").load()
    assert summary.ok and [(r.exp, r.status) for r in rows] == [(0, "keep"), (1, "crash")]
    baseline, attack = rows
    assert 0 < baseline.val_bpb < 0.8 * uniform_bpb(tiny_dataset) and baseline.eval_seconds > 0
    log = (repo / "runs" / "exp0.log").read_text()
    assert "Exported the model for the sealed evaluation" in log
    assert f"sealed evaluation: val_bpb {baseline.val_bpb:.6f}" in log
    assert not (repo / "runs" / "work" / "exp0").exists()  # the export went with its run's directory
    assert "the run exported no model" in attack.notes and attack.val_bpb == 0.0
    assert "sys.exit(0)" not in (repo / "train.py").read_text()
