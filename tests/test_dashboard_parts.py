"""The dashboard's non-screen parts: memory sampling (real process trees), read-only results.tsv, log following, the
detail view's diff and log tail (real git repos). None of this imports textual."""

import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from fakes.repo import git, make_repo
from tui.results import ResultsFile, Row
from tui.sysmem import MemoryMonitor, parse_nvidia_apps, parse_nvidia_gpus, sample, tree_memory
from tui.watch import LogFollower, experiment_diff, experiment_log, experiment_ref, log_tail, read_results, signature

# a parent that holds ~40 MB and starts a child that holds ~40 MB, then waits
TREE = """
import subprocess, sys, time
blob = bytearray(40 << 20)
code = "import time; b = bytearray(40 << 20); print('up', flush=True); time.sleep(60)"
child = subprocess.Popen([sys.executable, "-c", code], stdout=sys.stdout)
print(child.pid, flush=True)
time.sleep(60)
"""


@pytest.fixture
def tree():
    p = subprocess.Popen([sys.executable, "-c", TREE], stdout=subprocess.PIPE, text=True, start_new_session=True)
    child = int(p.stdout.readline())
    assert p.stdout.readline().strip() == "up"
    yield p, child
    os.killpg(p.pid, 9)
    p.wait()


def test_trainer_memory_counts_the_whole_process_tree(tree):
    p, child = tree
    total, procs, method = tree_memory(p.pid)
    assert procs == 2 and method == "rss"
    alone = psutil.Process(p.pid).memory_info().rss
    assert total > alone + 30 * (1 << 20)  # the child's 40 MB is in the figure, not just the parent's
    s = sample(p.pid)
    assert s.trainer_procs == 2 and 0 < s.system_used < s.system_total
    assert tree_memory(2 ** 22 + 12345) is None  # no such process


def test_monitor_reports_samples_and_keeps_the_peak_per_pid(tree):
    p, _ = tree
    got = []
    mon = MemoryMonitor(got.append, interval=0.05, nvidia=False)
    mon.pid = p.pid
    mon.start()
    try:
        end = time.monotonic() + 5
        while len(got) < 3 and time.monotonic() < end:
            time.sleep(0.02)
        assert len(got) >= 3 and got[-1].trainer_procs == 2
        assert got[-1].trainer_peak >= got[-1].trainer
        mon.pid = None
        mon.poke()
        n = len(got)
        while len(got) < n + 2 and time.monotonic() < end:
            time.sleep(0.02)
        assert got[-1].trainer is None and got[-1].trainer_peak is None
    finally:
        mon.stop()


def test_nvidia_smi_output_parsing():
    gpus = parse_nvidia_gpus("NVIDIA H100 80GB HBM3, 31000, 81559\nNVIDIA H100 80GB HBM3, [N/A], 81559\n")
    assert len(gpus) == 1 and gpus[0].name == "NVIDIA H100 80GB HBM3"
    assert gpus[0].used == 31000 << 20 and gpus[0].total == 81559 << 20
    assert parse_nvidia_apps("1234, 28000\n1234, 1000\n99, [N/A]\nNo running processes found\n") == \
        {1234: 29000 << 20}
    assert parse_nvidia_gpus("") == [] and parse_nvidia_apps(None) == {}


# ---------------------------------------------------------------------------
# results.tsv, read-only
# ---------------------------------------------------------------------------


def test_results_are_read_without_touching_a_file_being_written(tmp_path):
    rf = ResultsFile(tmp_path / "results.tsv")
    rf.append(Row(exp=0, status="keep", val_bpb=1.03, description="tab\there"))
    with open(rf.path, "ab") as f:
        f.write(b"abc1234\t1.02")  # a row half written by the agent
    before = rf.path.read_bytes()
    rows = read_results(rf.path)
    assert [(r.exp, r.val_bpb, r.description) for r in rows] == [(0, 1.03, "tab\there")]
    assert rf.path.read_bytes() == before  # ResultsFile.load() would have truncated it
    sig = signature(rf.path)
    with open(rf.path, "ab") as f:
        f.write(b"\n")
    assert signature(rf.path) != sig and len(read_results(rf.path)) == 2
    assert read_results(tmp_path / "missing.tsv") == [] and signature(tmp_path / "missing.tsv") is None


# ---------------------------------------------------------------------------
# Logs
# ---------------------------------------------------------------------------


def progress(step, total=10):
    return f"\rstep {step:05d} ({100 * (step + 1) / total:.1f}%) | loss: {3 - 0.1 * step:.6f} | lrm: 1.00 | " \
           f"dt: 10ms | tok/sec: 4,000 | mfu: 1.0% | epoch: 1 | remaining: {total - step}s"


def test_log_tail_collapses_progress_lines(tmp_path):
    log = tmp_path / "exp1.log"
    log.write_bytes(("Backend: cpu (cpu)\nnaïve café\n" + "".join(progress(i) for i in range(10)) +
                     "\n---\nval_bpb:          1.020000\n").encode())
    tail = log_tail(log).splitlines()
    assert tail[0] == "Backend: cpu (cpu)" and tail[1] == "naïve café"
    assert tail[2].startswith("step 00009") and sum(t.startswith("step") for t in tail) == 1
    assert tail[-1] == "val_bpb:          1.020000"
    assert log_tail(tmp_path / "none.log") == ""


def test_log_follower_follows_the_newest_log_as_it_grows(tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    f = LogFollower(runs)
    assert f.poll() == (None, False, [])
    old = runs / "exp1.log"
    old.write_text("old run\n")
    os.utime(old, (time.time() - 100, time.time() - 100))
    new = runs / "exp2.log"
    new.write_bytes(("Backend: cpu (cpu)\n" + progress(0) + progress(1)).encode())
    path, started, lines = f.poll()
    assert path == new and started and f.exp == 2
    assert [pl.step.step for pl in lines if pl.step] == [0]  # step 1 has no line end yet
    with open(new, "ab") as fh:
        fh.write(("".join(progress(i) for i in range(2, 10)) + "\n---\nval_bpb:          1.010000\n").encode())
    path, started, lines = f.poll()
    assert not started and [pl.step.step for pl in lines if pl.step] == list(range(1, 10))
    assert f.parser.final.val_bpb == 1.01 and f.parser.backend == "cpu"
    (runs / "notes.txt").write_text("not a log")
    assert f.poll()[1:] == (False, [])


# ---------------------------------------------------------------------------
# An experiment's diff (a real repository with the agent's refs)
# ---------------------------------------------------------------------------


def test_diff_of_an_experiment_from_its_ref_even_after_revert(tmp_path):
    repo = make_repo(tmp_path / "repo", {"train.py": "LR = 0.01\n"})
    (repo / "train.py").write_text("LR = 0.05\n")
    git(repo, "commit", "-q", "-am", "exp2: raise LR")
    sha = git(repo, "rev-parse", "HEAD").strip()
    git(repo, "update-ref", "refs/autoresearch/t1/exp2", sha)
    git(repo, "reset", "-q", "--hard", "HEAD^")  # discarded: dropped from the branch
    row = Row(exp=2, status="discard", commit=sha[:7], tag="t1", description="raise LR")
    assert experiment_ref(row) == "refs/autoresearch/t1/exp2"
    diff = experiment_diff(repo, row)
    assert "exp2: raise LR" in diff and "-LR = 0.01" in diff and "+LR = 0.05" in diff
    # no tag (an older file): the commit column is enough
    assert "+LR = 0.05" in experiment_diff(repo, dataclasses.replace(row, tag=""))
    assert "baseline" in experiment_diff(repo, Row(exp=0, status="keep", commit="abc1234"))
    assert "skipped" in experiment_diff(repo, Row(exp=3, status="skip", notes="LLM down"))
    assert "no diff found" in experiment_diff(repo, Row(exp=4, status="crash", commit="deadbee", tag="t1"))
    assert experiment_log(Path("runs"), Row(exp=4, run=2)) == Path("runs/exp4-run2.log")
    assert experiment_log(Path("runs"), Row(exp=4)) == Path("runs/exp4.log")
