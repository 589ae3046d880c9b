"""Several slots (--workers 2): real repositories, the stand-in trainer as real processes, the scripted LLM server.

The stand-in trainer's block is laid out so that the learning rate (with the run length, STEPS) and the depth are
separate hunks: two candidates that change one each merge cleanly; two that both change the learning rate conflict.
val_bpb = 1 + 100 (lr - 0.02)^2 + 0.01 |depth - 6|: the baseline (lr 0.01, depth 4) is 1.03.
"""

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from fakes.agent import TEST_KEY, Recorder, file_answer, make_config, wait_for
from fakes.repo import FAKE_TRAIN, agent_repo, git, project_repo
from test_agent_cli import alive
from test_dashboard import screen_text, sync, until, until_exited
from trainer_fixtures import TINY_MODEL, edit_hparams, tiny_dataset  # noqa: F401  (tiny_dataset is a fixture)
from tui.app import DashboardApp
from tui.config import AgentConfig, ConfigError
from tui.credentials import is_child_hidden
from tui.devices import gpu_models_problem, plan_slots, shared_device_problem
from tui.events import SlotView
from tui.orchestrator import Orchestrator
from tui.results import ResultsFile, summarize

BRANCH = "autoresearch/t1"
DASHBOARD = Path(__file__).resolve().parent.parent / "dashboard.py"
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


# ---------------------------------------------------------------------------
# kill -9 with two experiments in flight, then the same command again
# ---------------------------------------------------------------------------

GATE = ('STEP_SLEEP = 0.1', 'STEP_SLEEP = 0.1\nSLOW_GATE = "inflight"')  # slow while runs/inflight exists


def headless(repo, server, *extra):
    """dashboard.py --agent --headless --workers 2 as a real process (stdout and stderr together)."""
    env = {k: v for k, v in os.environ.items() if not is_child_hidden(k)}
    env.update(PYTHONUNBUFFERED="1", ANTHROPIC_API_KEY=TEST_KEY, AUTORESEARCH_FAKE_GATES=str(repo / "runs"))
    args = ["--agent", "--headless", "--tag", "t1", "--model", "claude-sonnet-4-6", "--base-url", server.base_url,
            "--script", "train.py", "--timeout", "60", "--keep-rule", "single", "--noise-runs", "1", "--scope",
            "file", "--sandbox", "none", "--workers", "2", "--max", "3", *extra]
    return subprocess.Popen([sys.executable, str(DASHBOARD), *args], cwd=repo, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def lock_pids(repo):
    try:
        return [pid for pid, _ in json.loads((repo / ".agent.lock").read_text()).get("training_pids") or []]
    except (OSError, ValueError):
        return []


def stepping(repo, exp):
    log = repo / "runs" / f"exp{exp}.log"
    return log.exists() and "step 00001" in log.read_text(errors="replace")


def test_kill_9_with_two_in_flight_then_resume_requeues_both_and_records_each_once(repo, server):
    (repo / "runs").mkdir()
    (repo / "runs" / "inflight").write_text("")
    server.push(server.text(file_answer([("LEARNING_RATE = 0.01", "LEARNING_RATE = 0.02"), GATE],
                                        description="lr 0.02")),
                server.text(file_answer([("LEARNING_RATE = 0.01", "LEARNING_RATE = 0.005"), GATE],
                                        description="lr 0.005")))
    p = headless(repo, server)
    try:
        wait_for(lambda: stepping(repo, 1) and stepping(repo, 2) and len(lock_pids(repo)) == 2)
        orphans = lock_pids(repo)
        # .runner_status.json carries every slot
        wait_for(lambda: [v["exp"] for v in json.loads((repo / ".runner_status.json").read_text())["slots"]]
                 == [1, 2])
        p.kill()  # SIGKILL: no cleanup at all
        first, _ = p.communicate(timeout=10)
    finally:
        p.kill()
    assert "[slot 1]" in first and "[slot 2]" in first
    assert all(psutil.pid_exists(pid) for pid in orphans)  # the trainers outlived their agent
    assert [(x.exp, x.status) for x in rows(repo)] == [(0, "keep")]
    assert sorted(m.name for m in (repo / "runs").glob("pending-*")) == ["pending-t1-exp1.json",
                                                                        "pending-t1-exp2.json"]
    assert subjects(repo) == ["initial"]  # the branch never held a candidate in flight
    calls = len(server.chat_requests())

    (repo / "runs" / "inflight").unlink()
    p = headless(repo, server)
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 0, out
    assert "re-queued exp1 (0 runs done), exp2 (0 runs done), no new LLM call" in out
    wait_for(lambda: not any(alive(pid) for pid in orphans), timeout=10)
    assert len(server.chat_requests()) == calls  # nothing was proposed twice
    assert sorted((x.exp, x.status, x.run) for x in rows(repo)) == [(0, "keep", 0), (1, "keep", 0),
                                                                      (2, "discard", 0)]
    assert subjects(repo) == ["exp1: lr 0.02", "initial"]
    assert rev(repo, BRANCH) == rev(repo, "refs/autoresearch/t1/exp1")
    assert subjects(repo, "refs/autoresearch/t1/exp2")[0] == "exp2: lr 0.005"
    assert not list((repo / "runs").glob("pending-*"))
    assert git(repo, "status", "--porcelain", "--untracked-files=no").strip() == ""


# ---------------------------------------------------------------------------
# The dashboard: the slots panel, n selects a slot, s stops its run, q stops them all
# ---------------------------------------------------------------------------


@sync
async def test_dashboard_slots_panel_stop_the_selected_slot_then_quit_all(repo, server, monkeypatch):
    monkeypatch.setenv("AUTORESEARCH_FAKE_GATES", str(repo / "runs"))
    (repo / "runs").mkdir()
    (repo / "runs" / "inflight").write_text("")
    server.push(server.text(file_answer([("LEARNING_RATE = 0.01", "LEARNING_RATE = 0.02"), GATE],
                                        description="lr 0.02")),
                server.text(file_answer([("DEPTH = 4", "DEPTH = 5"), GATE], description="depth 5")))
    cfg = make_config(repo, server, scope="file", workers=2, max_experiments=3, sandbox="none")
    app = DashboardApp("agent", agent_config=cfg, clock=lambda: "12:00:00")
    async with app.run_test(size=(120, 44)) as pilot:
        screen = app.dashboard
        both = lambda: [v.exp for v in screen.slot_views] == [1, 2] and all(v.pct > 0 for v in screen.slot_views)  # noqa: E731
        await until(pilot, both, what="both slots training", timeout=45.0)
        text = screen_text(app)
        assert "slot 1 cpu" in text and "slot 2 cpu" in text and "lr 0.02" in text and "depth 5" in text
        assert screen.training.title.startswith("[slot 1] exp1")  # the panel follows slot 1
        await pilot.press("n")
        assert screen.selected_slot == 2 and screen.training.title.startswith("slot 2 · exp2")
        await pilot.press("s")
        await until(pilot, lambda: [(r.exp, r.status) for r in rows(repo)] == [(0, "keep"), (2, "skip")],
                    what="slot 2's run stopped and recorded as a skip")
        assert screen.slot_views[0].exp == 1  # slot 1 trains on
        await pilot.press("q")
        await until_exited(app, timeout=30.0)
    assert [(r.exp, r.status) for r in rows(repo)] == [(0, "keep"), (2, "skip")]  # exp1 was aborted: no row
    assert not list((repo / "runs").glob("pending-*"))


@sync
async def test_watch_shows_every_slot_of_a_running_headless_agent(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    ResultsFile(repo / "results.tsv").ensure()
    slots = [SlotView(1, "slot 1 cuda:0", 7, 0, "lr 0.02", 40.0, 12345.0, "training"),
             SlotView(2, "slot 2 cuda:1", 8, 1, "depth 5", 75.0, 11111.0, "training")]
    (repo / ".runner_status.json").write_text(json.dumps({
        "pid": os.getpid(), "alive": True, "state": "training", "message": "[slot 2] exp8", "tag": "t1",
        "slots": [dataclasses.asdict(v) for v in slots]}))
    app = DashboardApp("watch", repo=repo, clock=lambda: "12:00:00", poll_seconds=0.2, memory=False)
    async with app.run_test(size=(120, 40)) as pilot:
        await until(pilot, lambda: "slot 2 cuda:1" in screen_text(app), what="the slots panel", timeout=10.0)
        text = screen_text(app)
        assert "exp7" in text and "exp8 r1" in text and "12,345 tok/s" in text and "75.0%" in text
        await pilot.press("q")


# ---------------------------------------------------------------------------
# The real trainer on two CPU slots
# ---------------------------------------------------------------------------


@pytest.mark.long  # four real training runs of 2 s, two at a time, with their sealed evaluations: ~2-4 min (not in CI)
def test_real_trainer_on_two_cpu_slots(tiny_dataset, tmp_path, server, monkeypatch):
    for name, value in {**tiny_dataset, "AUTORESEARCH_BACKEND": "cpu"}.items():
        monkeypatch.setenv(name, value)
    repo = project_repo(tmp_path / "repo")
    (repo / "train.py").write_text(edit_hparams((repo / "train.py").read_text(), **TINY_MODEL))
    git(repo, "commit", "-qam", "a tiny model")
    server.push(server.text(file_answer([("MATRIX_LR = 0.04", "MATRIX_LR = 0.06")], description="matrix lr 0.06")),
                server.text(file_answer([("WARMDOWN_RATIO = 0.5", "WARMDOWN_RATIO = 0.7")], description="warmdown")),
                server.text(file_answer([("EMBEDDING_LR = 0.6", "EMBEDDING_LR = 0.3")], description="embedding lr")))
    rec = Timeline()
    config = make_config(repo, server, max_experiments=4, scope="file", dataset="tiny", time_budget=2.0,
                         timeout=900.0, budget_allowance=900.0, python=sys.executable, workers=2)
    summary = Orchestrator(config, [rec]).run()
    assert summary.ok, summary.reason
    r = rows(repo)
    assert {x.exp for x in r} == {0, 1, 2, 3}
    assert all(x.status in ("keep", "discard") for x in r), [(x.label, x.status, x.notes) for x in r]
    assert rec.starts[2] < rec.ends[1] and rec.starts[1] < rec.ends[2]  # both slots at once
    assert {x.worker for x in r if x.exp} == {"slot 1 cpu", "slot 2 cpu"}
    assert "1 threads" in (repo / "runs" / "exp1.log").read_text()  # each run had its share of the 2 cores
    # the branch holds exactly the kept candidates, each on the best of its time
    kept = [x for x in r if x.status == "keep" and x.exp and x.kind != "superseded"]
    assert len(subjects(repo)) == 2 + len({x.exp for x in kept})
    s = summarize(r)
    assert rev(repo, BRANCH)[:7] == next(x.commit for x in reversed(r) if x.exp == s.best_exp)
    assert git(repo, "status", "--porcelain", "--untracked-files=no").strip() == ""


def test_slots_use_one_device_class_and_split_the_cores(tmp_path):
    with pytest.raises(ConfigError, match=r"mixes device classes: cuda:0 \(cuda\), mps \(mps\)"):
        AgentConfig(repo=tmp_path, devices="cuda:0,mps").resolved()
    with pytest.raises(ConfigError, match="--workers 3 but --devices names 2"):
        AgentConfig(repo=tmp_path, workers=3, devices="cuda:0,cuda:1").resolved()
    assert AgentConfig(repo=tmp_path, devices="cuda:0, cuda:1").resolved().workers == 2
    assert [p.env for p in plan_slots(2, ("cuda:0", "cuda:1"))] == [
        {"CUDA_VISIBLE_DEVICES": "0", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"},  # numbered as nvidia-smi numbers them
        {"CUDA_VISIBLE_DEVICES": "1", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}]
    assert {p.env["OMP_NUM_THREADS"] for p in plan_slots(4, (), cpu_count=8)} == {"2"}
    assert plan_slots(1, ())[0].env == {}  # one slot: the run's environment is as it always was


def test_local_slots_never_share_one_accelerator(tmp_path):
    """--workers N without --devices splits a CPU's cores; on one GPU the runs would slow each other down and the
    numbers would measure that, so it is refused with what to do instead."""
    assert "one slot per Mac" in shared_device_problem(2, (), "mlx", apple=True)
    assert "one slot per Mac" in shared_device_problem(2, (), "mps", apple=True)
    assert "--devices cuda:0,cuda:1,cuda:2" in shared_device_problem(3, (), "cuda", apple=False)
    assert shared_device_problem(2, (), "cpu", apple=False) == ""
    assert shared_device_problem(2, (), "mlx", apple=False) == ""  # MLX on a Linux CPU splits the cores
    assert shared_device_problem(2, ("cuda:0", "cuda:1"), "cuda", apple=False) == ""
    assert shared_device_problem(1, (), "mlx", apple=True) == ""  # the default: one slot


# exp2's trainer waits for exp1's evaluation, then rewrites the evaluators' cached json module to report a record
POISON_DURING_AN_EVALUATION = r'''
import glob, marshal
_work = os.path.dirname(os.environ["AUTORESEARCH_RUN_DIR"])
_deadline = time.time() + 15
while time.time() < _deadline and not any(
        b"--evaluate" in open(p, "rb").read() and _work.encode() in open(p, "rb").read()
        for p in glob.glob("/proc/[0-9]*/cmdline") if os.path.exists(p)):
    time.sleep(0.01)
for _pyc in glob.glob(_work + "/.pycache/**/json/__init__.*.pyc", recursive=True, include_hidden=True):
    _head = open(_pyc, "rb").read(16)  # magic, flags, source mtime and size: the header stays valid
    _code = compile("import sys\nprint('{\"val_bpb\": 1e-06, \"tokens\": 1, \"seconds\": 0}')\nsys.exit(0)\n",
                    "json", "exec")
    open(_pyc, "wb").write(_head + marshal.dumps(_code))
time.sleep(1.5)  # ends after exp1's evaluation has ended and recorded the cache
'''


def test_without_a_sandbox_a_slot_cannot_poison_another_slots_evaluation_cache(repo, server):
    """Several slots, no sandbox: a run trains while another slot's evaluation uses the evaluators' bytecode cache, so
    a listing recorded after that evaluation would bless what the run wrote meanwhile, and the next evaluation would
    run it. Each evaluation gets a private cache instead."""
    poison = file_answer([("STEP_SLEEP = 0.1", "STEP_SLEEP = 0.1\n" + POISON_DURING_AN_EVALUATION)],
                         description="a much better model")
    server.push(server.text(WORSE), server.text(poison))
    summary, rec = run_slots(repo, server, max_experiments=3)
    assert summary.ok, summary.reason
    assert {(x.exp, x.status) for x in rows(repo)} == {(0, "keep"), (1, "discard"), (2, "discard")}
    assert all(x.val_bpb > 0.5 for x in rows(repo))
    assert not (repo / "runs" / "work" / ".pycache").exists()


def test_gpus_of_different_models_are_refused_with_their_names(repo, server, tmp_path, monkeypatch):
    """cuda:0 and cuda:1 are one class but may be an H100 and an A10: their numbers are not comparable. The names
    come from nvidia-smi (here a script on PATH standing in for it, as on a machine with two different GPUs)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\necho 'NVIDIA H100 80GB HBM3, 81559 MiB, 9.0'\n"
                                        "echo 'NVIDIA A10, 23028 MiB, 8.6'\n"
                                        "echo 'NVIDIA A10, 23028 MiB, 8.6'\n")
    (bin_dir / "nvidia-smi").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    cfg = make_config(repo, server, max_experiments=2, devices="cuda:0,cuda:1", sandbox="none")
    summary = Orchestrator(cfg, [Recorder()]).run()
    assert not summary.ok
    assert summary.reason == ("--devices mixes GPU models: cuda:0 (NVIDIA H100 80GB HBM3), cuda:1 (NVIDIA A10); "
                              "results of different GPUs are not comparable: give GPUs of one model")
    assert git(repo, "branch", "--list", "autoresearch/*").strip() == ""  # refused before touching the repository
    assert gpu_models_problem(("cuda:1", "cuda:2"), ["NVIDIA H100 80GB HBM3", "NVIDIA A10", "NVIDIA A10"]) == ""
