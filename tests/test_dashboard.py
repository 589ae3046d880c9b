"""The dashboard on a (virtual) screen: Textual Pilot tests for each mode, fed by real subprocesses, a real
results.tsv, real git repositories and the fake LLM servers; the command line; and one real terminal (tmux)."""

import asyncio
import functools
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest

from fakes.agent import HARDWARE, hp_answer, make_config
from fakes.repo import agent_repo, git
from tui.status_file import write_json_atomic
from tui.app import DashboardApp
from tui.results import ResultsFile, Row
from tui.llm import Usage
from tui.widgets import DetailScreen, starting_note, status_lines, val_bpb_series

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "dashboard.py"
CLOCK = lambda: "12:00:00"  # noqa: E731

# Speaks the trainer output protocol: a few startup lines (one non-ASCII), `\r` progress lines, the `---` summary.
FAKE_TRAINER = r'''
import os, subprocess, sys, time
STEPS = int(os.environ.get("FAKE_STEPS", "20"))
SLEEP = float(os.environ.get("FAKE_SLEEP", "0.05"))
if os.environ.get("FAKE_CHILD"):
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    open("child.pid", "w").write(str(child.pid))
open("trainer.pid", "w").write(str(os.getpid()))
print("Backend: cpu (PyTorch, cpu, float32)")
print("Chip: Fake CPU 9000 | peak 0.25 TFLOPS for MFU (test)")
print("données: café — 你好")
for step in range(STEPS):
    pct = 100.0 * (step + 1) / STEPS
    print(f"\rstep {step:05d} ({pct:.1f}%) | loss: {4.0 - 0.1 * step:.6f} | lrm: 0.75 | dt: 20ms | "
          f"tok/sec: 12,345 | mfu: 3.2% | epoch: 1 | remaining: {STEPS - step - 1}s    ", end="", flush=True)
    time.sleep(SLEEP)
    if os.environ.get("FAKE_CRASH") and step == 2:
        print()
        raise ValueError("shapes (4, 8) and (5, 8) do not match")
print()
print("Training complete. Evaluating...")
print("---")
for k, v in [("val_bpb", "1.234567"), ("training_seconds", "1.5"), ("total_seconds", "2.0"),
             ("peak_vram_mb", "812.0"), ("mfu_percent", "3.20"), ("total_tokens_M", "0.5"),
             ("num_steps", str(STEPS)), ("num_params_M", "6.0"), ("depth", "4"), ("backend", "cpu"),
             ("chip", "Fake CPU 9000")]:
    print(f"{k + ':':<18}{v}")
'''


def sync(fn):
    """Run an async test with asyncio.run (no pytest asyncio plugin needed)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return asyncio.run(fn(*args, **kwargs))
    return wrapper


def screen_text(app) -> str:
    """What the terminal shows right now, as plain text."""
    return "\n".join(strip.text for strip in app.screen._compositor.render_strips())


async def until(pilot, predicate, timeout=15.0, what="a condition"):
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}\n{screen_text(pilot.app)}")
        await pilot.pause(0.05)


async def until_exited(app, timeout=15.0):
    end = time.monotonic() + timeout
    while app.return_code is None:
        assert time.monotonic() < end, "the app did not exit"
        await asyncio.sleep(0.05)


def gone(pid) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.fixture
def trainer(tmp_path):
    path = tmp_path / "fake_train.py"
    path.write_text(FAKE_TRAINER, encoding="utf-8")
    return path


# ---------------------------------------------------------------------------
# Single run
# ---------------------------------------------------------------------------


@sync
async def test_single_run_shows_live_metrics_then_the_summary(trainer, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_STEPS", "30")
    app = DashboardApp("single", repo=tmp_path, script=str(trainer), clock=CLOCK)
    screen = app.dashboard
    async with app.run_test(size=(120, 40)) as pilot:
        await until(pilot, lambda: screen.training.last is not None and screen.training.last.step >= 3, what="steps")
        # the panel repaints after the message that carried the step: wait for the screen, not the message
        await until(pilot, lambda: all(w in screen_text(app) for w in ("ETA", "loss", "12,345")), what="panel")
        live = screen_text(app)
        assert "fake_train.py" in live and "ETA" in live and "loss" in live and "12,345" in live
        assert "backend cpu" in " ".join(live.split())
        # under the detail view the mode's screen keeps taking the run's messages
        app.push_screen(DetailScreen("exp1 · keep", "", "", "exp1.log"))
        seen = screen.training.last.step
        await until(pilot, lambda: screen.training.last.step > seen + 2, what="steps behind the detail view")
        app.pop_screen()
        await until(pilot, lambda: not screen.running, what="the run to end")
        await pilot.pause(0.1)
        done = " ".join(screen_text(app).split())
        for needle in ("fake_train.py DONE", "val_bpb 1.234567", "peak mem 812 MB", "steps 30", "tokens 0.5M",
                       "time 1.5s / 2.0s", "params 6.0M · depth 4", "Fake CPU 9000", "MFU peak 250.0 GFLOP/s"):
            assert needle in done, needle
        assert "données: café — 你好" in screen.activity.history[2] or \
            any("données: café — 你好" in h for h in screen.activity.history)
        assert "val_bpb: 1.234567" in " ".join(screen.activity.history)
        assert app.query_one("#loss-chart").steps == list(range(30))  # every \r progress line reached the chart
        await pilot.press("q")
        await until_exited(app)
    assert app.return_code == 0


@sync
async def test_single_run_shows_the_trainers_memory_while_it_runs(trainer, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_STEPS", "2000")  # runs until quit: the sampler gets as long as it needs
    app = DashboardApp("single", repo=tmp_path, script=str(trainer), clock=CLOCK, kill_grace=2.0)
    screen = app.dashboard
    async with app.run_test(size=(120, 40)) as pilot:
        await until(pilot, lambda: screen.hw_panel.mem is not None and screen.hw_panel.mem.trainer,
                    timeout=60, what="trainer memory")
        await pilot.pause(0.1)
        assert "trainer " in screen_text(app) and "not running" not in screen_text(app)
        await pilot.press("q")
        await until_exited(app)


@sync
async def test_single_run_quit_kills_the_training_process_group(trainer, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_STEPS", "2000")
    monkeypatch.setenv("FAKE_CHILD", "1")
    app = DashboardApp("single", repo=tmp_path, script=str(trainer), clock=CLOCK, memory=False, kill_grace=2.0)
    async with app.run_test(size=(80, 24)) as pilot:
        await until(pilot, lambda: app.dashboard.training.last is not None and (tmp_path / "child.pid").exists(),
                    what="training with a child process")
        trainer_pid = int((tmp_path / "trainer.pid").read_text())
        child_pid = int((tmp_path / "child.pid").read_text())
        assert not gone(trainer_pid) and not gone(child_pid)
        await pilot.press("q")
        await until_exited(app)
    assert gone(trainer_pid) and gone(child_pid)


@sync
async def test_single_run_stop_key_ends_the_run(trainer, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_STEPS", "2000")
    app = DashboardApp("single", repo=tmp_path, script=str(trainer), clock=CLOCK, memory=False, kill_grace=2.0)
    async with app.run_test(size=(80, 24)) as pilot:
        await until(pilot, lambda: app.dashboard.training.last is not None, what="training")
        pid = int((tmp_path / "trainer.pid").read_text())
        await pilot.press("s")
        await until(pilot, lambda: not app.dashboard.running, what="the run to end")
        assert gone(pid)
        assert "STOPPED" in screen_text(app)
        await pilot.press("q")
        await until_exited(app)
    assert app.return_code == 1


@sync
async def test_single_run_crash_says_why(trainer, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_CRASH", "1")
    app = DashboardApp("single", repo=tmp_path, script=str(trainer), clock=CLOCK, memory=False)
    async with app.run_test(size=(80, 24)) as pilot:
        await until(pilot, lambda: not app.dashboard.running, what="the crash")
        await pilot.pause(0.1)
        text = " ".join(screen_text(app).split())
        assert "fake_train.py CRASHED" in text and "exit code 1: ValueError: shapes" in text
        assert any("ValueError: shapes (4, 8) and (5, 8) do not match" in h for h in app.dashboard.activity.history)
        await pilot.press("q")
        await until_exited(app)
    assert app.return_code == 1 and "ValueError" in app.final_error


# ---------------------------------------------------------------------------
# Watch
# ---------------------------------------------------------------------------


def row(n, status, val, desc, tag="t1", run=0):
    return Row(exp=n, status=status, val_bpb=val, description=desc, commit="abc1234", memory_gb=0.8, tok_sec=4000,
               mfu=1.2, steps=5, seconds=2.0, tag=tag, run=run)


@sync
async def test_watch_mode_picks_up_new_rows_and_the_newest_log(tmp_path):
    rf = ResultsFile(tmp_path / "results.tsv")
    rf.append(row(0, "keep", 1.03, "baseline"))
    rf.append(row(1, "discard", 1.05, "lower the learning rate"))
    app = DashboardApp("watch", repo=tmp_path, hardware=HARDWARE, memory=False, clock=CLOCK, poll_seconds=0.2)
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.pause(0.1)
        assert app.dashboard.table.row_count == 2 and "lower the learning rate" in screen_text(app)
        rf.append(row(2, "keep", 1.01, "deeper model: depth 6"))  # the agent (another process) appends a row
        t0 = time.monotonic()
        await until(pilot, lambda: app.dashboard.table.row_count == 3, timeout=2.0, what="the new row")
        assert time.monotonic() - t0 < 2.0
        assert app.dashboard.table.selected_row() is not None
        first = app.dashboard.table.get_row_at(0)
        assert [str(c) for c in first[:3]] == ["exp2", "keep", "1.010000"]  # newest first
        text = screen_text(app)
        assert "deeper model: depth 6" in text and "best 1.010000 (exp2)" in text
        assert app.query_one("#bpb-chart").series[0] == [(0, 1.03), (2, 1.01)]

        # a headless agent's status file: its keep-rule figures (noise floor) reach the status panel
        write_json_atomic(tmp_path / ".runner_status.json", {"pid": os.getpid(), "alive": True, "tag": "nov23",
                                                             "state": "training", "message": "exp3",
                                                             "keep_rule": {"noise σ": "0.001234"}})
        await until(pilot, lambda: "0.001234" in screen_text(app), timeout=3.0, what="the noise floor")

        # a training log appears and grows: the training panel and the loss chart follow it
        runs = tmp_path / "runs"
        runs.mkdir()
        log = runs / "exp3.log"
        log.write_bytes(b"Backend: cpu (cpu)\n" + "".join(
            f"\rstep {i:05d} ({10 * (i + 1):.1f}%) | loss: {3 - 0.1 * i:.6f} | lrm: 1.00 | dt: 10ms | "
            f"tok/sec: 4,000 | mfu: 1.0% | epoch: 1 | remaining: {9 - i}s" for i in range(5)).encode())
        await until(pilot, lambda: len(app.query_one("#loss-chart").steps) == 4, timeout=3.0, what="log steps")
        assert "exp3" in screen_text(app)
        await pilot.press("q")
        await until_exited(app)


# ---------------------------------------------------------------------------
# Agent
# ---------------------------------------------------------------------------


def training_exp(app, n):
    t = app.dashboard.training
    return t.title.startswith(f"exp{n} ") and t.last is not None and t.running


@sync
async def test_agent_mode_pause_diff_stop_and_quit(tmp_path, server):
    repo = agent_repo(tmp_path / "repo")
    server.push(server.text(hp_answer("raise LR to 0.02", lr=0.02, steps=25, step_sleep=0.08)),
                server.text(hp_answer("a slow run", mode="slow")),
                server.text(hp_answer("another slow run", mode="slow")))
    cfg = make_config(repo, server, max_experiments=6)
    app = DashboardApp("agent", agent_config=cfg, clock=CLOCK)
    async with app.run_test(size=(120, 40)) as pilot:
        # pause while exp1 trains: it finishes, then the loop waits
        # the session's start and exp0 with its sealed evaluation come first: seconds each on a busy machine
        await until(pilot, lambda: training_exp(app, 1), what="exp1 training", timeout=45.0)
        await pilot.press("p")
        await until(pilot, lambda: "pausing after this experiment" in screen_text(app), what="the pause notice")
        await until(pilot, lambda: app.dashboard.state == "paused", what="the pause")
        assert [(r.exp, r.status) for r in ResultsFile(repo / "results.tsv").load()] == [(0, "keep"), (1, "keep")]
        assert len(server.chat_requests()) == 1  # nothing asked for exp2 while paused
        await until(pilot, lambda: "p Resume" in screen_text(app), what="the footer to offer Resume")
        text = screen_text(app)
        assert "PAUSED" in text and "best 1.020000 (exp1)" in text
        assert "KEEP 1.020000" in text  # the training panel's verdict

        # enter on the newest row: exp1's diff and the tail of its log
        app.dashboard.table.focus()
        app.dashboard.table.move_cursor(row=0)
        await pilot.press("enter")
        await until(pilot, lambda: isinstance(app.screen, DetailScreen), what="the detail view")
        detail = app.screen
        assert "-LEARNING_RATE = 0.01" in detail.diff_body and "+LEARNING_RATE = 0.02" in detail.diff_body
        assert "sealed evaluation: val_bpb 1.020000" in detail.log_body and detail.log_body.count("step 000") == 1
        shown = screen_text(app)
        assert "+LEARNING_RATE = 0.02" in shown and "exp1.log (tail)" in shown
        await pilot.press("escape")
        await until(pilot, lambda: not isinstance(app.screen, DetailScreen), what="the detail view to close")

        # resume; stop exp2 mid-training with `s`: killed, reverted, recorded as a skip, the loop goes on
        await pilot.press("p")
        await until(pilot, lambda: training_exp(app, 2), what="exp2 training")
        pid2 = app.dashboard.training_pid()
        await pilot.press("s")
        await until(pilot, lambda: app.dashboard.table.row_count == 3, what="the exp2 row")
        assert ResultsFile(repo / "results.tsv").load()[2].status == "skip"
        assert gone(pid2)

        # quit while exp3 trains: the training process group is killed, exp3 reverted, nothing recorded
        await until(pilot, lambda: training_exp(app, 3), what="exp3 training")
        pid3 = app.dashboard.training_pid()
        assert pid3 and not gone(pid3)
        await pilot.press("q")
        await until_exited(app, timeout=15)
    assert gone(pid3)
    assert [r.status for r in ResultsFile(repo / "results.tsv").load()] == ["keep", "keep", "skip"]
    assert git(repo, "log", "--format=%s", "autoresearch/t1").splitlines() == ["exp1: raise LR to 0.02", "initial"]
    assert git(repo, "status", "--porcelain", "--untracked-files=no").strip() == ""
    assert app.return_code == 0


@sync
async def test_agent_mode_shows_a_fatal_error(tmp_path, server):
    repo = agent_repo(tmp_path / "repo")
    (repo / "docs" / "notes.md").write_text("dirty\n")
    app = DashboardApp("agent", agent_config=make_config(repo, server), clock=CLOCK, memory=False)
    async with app.run_test(size=(80, 24)) as pilot:
        await until(pilot, lambda: not app.dashboard.running, what="the agent to stop")
        await pilot.pause(0.1)
        text = screen_text(app)
        assert "FAILED" in text and "uncommitted changes" in text
        await pilot.press("q")
        await until_exited(app)
    assert app.return_code == 1 and "docs/notes.md" in app.final_error


def test_val_bpb_chart_has_one_point_per_experiment_and_a_running_best():
    rows = [row(0, "keep", 1.03, "baseline"), row(0, "keep", 1.05, "baseline", run=1), row(1, "discard", 1.06, "a"),
            row(2, "crash", 0.0, "b"), row(3, "keep", 1.02, "c"), row(3, "keep", 1.00, "c", run=1),
            row(4, "skip", 0.0, "d"), row(5, "discard", 1.2, "e")]
    kept, disc, best = val_bpb_series(rows)
    assert kept == [(0, pytest.approx(1.04)), (3, pytest.approx(1.01))]  # the mean over an experiment's runs
    assert disc == [(1, 1.06), (5, 1.2)]
    assert best == [(0, pytest.approx(1.04)), (3, pytest.approx(1.04)), (3, pytest.approx(1.01)),
                    (5, pytest.approx(1.01))]  # a step down at exp3, flat to the last experiment


def test_thinking_shows_how_long_the_llm_has_been_at_it():
    text = status_lines("thinking", "exp3: asking openai (gemma)", False, None, Usage(), {}, elapsed=83.0)[0].plain
    assert "exp3: asking openai (gemma)" in text and "1m23s" in text
    assert "1m23s" not in status_lines("training", "exp3", False, None, Usage(), {}, elapsed=83.0)[0].plain


def test_llm_no_calls_yet_goes_once_calls_were_made():
    from tui.results import Summary
    fresh = " ".join(t.plain for t in status_lines("thinking", "", False, Summary(), Usage(), {}))
    assert "LLM no calls yet" in fresh
    failed = " ".join(t.plain for t in status_lines("thinking", "", False, Summary(), Usage(failed=2), {}))
    assert "no calls yet" not in failed and "failed calls 2" in failed  # every call refused: calls all the same


def test_only_a_compiling_backend_says_compiling():
    assert "compiling" in starting_note("cuda") and "compiling" in starting_note("mlx")
    assert "compiling" not in starting_note("cpu", {"kind": "cpu", "chip_name": "Fake CPU"})
    assert "compiling" not in starting_note(None, {"kind": "cpu"}) and "compiling" not in starting_note("mps")
    assert "compiling" not in starting_note(None)  # nothing says which backend: no claim either


# ---------------------------------------------------------------------------
# Keys that change the view
# ---------------------------------------------------------------------------


@sync
async def test_small_terminal_cycles_views_and_theme_toggles(tmp_path):
    ResultsFile(tmp_path / "results.tsv").append(row(0, "keep", 1.03, "baseline"))
    app = DashboardApp("watch", repo=tmp_path, hardware=HARDWARE, memory=False, clock=CLOCK, autostart=False)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause(0.1)
        visible = lambda wid: app.query_one(wid).display and app.query_one(wid).region.height > 0  # noqa: E731
        assert visible("#table") and not visible("#loss-chart")
        await until(pilot, lambda: "v View" in screen_text(app), timeout=3, what="the View key in the footer")
        await pilot.press("v")
        await pilot.pause(0.1)
        assert visible("#loss-chart") and visible("#bpb-chart") and not visible("#table")
        await pilot.press("v")
        await pilot.pause(0.1)
        assert visible("#log") and not visible("#table") and not visible("#loss-chart")
        dark = app.current_theme.dark
        await pilot.press("d")
        assert app.current_theme.dark != dark
    app = DashboardApp("watch", repo=tmp_path, hardware=HARDWARE, memory=False, clock=CLOCK, autostart=False)
    async with app.run_test(size=(120, 40)) as pilot:
        await until(pilot, lambda: "q Quit" in screen_text(app), timeout=3, what="the footer")
        assert all(app.query_one(w).region.height > 3 for w in ("#table", "#log", "#loss-chart", "#bpb-chart"))
        assert "v View" not in screen_text(app)


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, str(DASHBOARD), *args], capture_output=True, text=True, cwd=cwd,
                          timeout=60, stdin=subprocess.DEVNULL)


def test_help_documents_the_screen_and_its_keys():
    out = cli("--help").stdout
    for needle in ("--watch", "SCRIPT", "q quit", "p pause", "s stop", "enter", "d dark", "r reload"):
        assert needle in out, needle


@pytest.mark.parametrize("args,message", [
    (["--max", "3"], "--max only applies to --agent"),
    (["--watch", "--model", "x"], "--model only applies to --agent"),
    (["--tag", "mar17"], "--tag only applies to --agent"),
    (["--watch", "train.py"], "unexpected argument 'train.py' with --watch"),
    (["no_such_script.py"], "training script 'no_such_script.py' not found"),
    (["--watch", "--repo", "/no/such/dir"], "is not a directory"),
    (["--watch", "--bogus"], "unrecognized arguments: --bogus"),
])
def test_bad_screen_arguments_are_usage_errors(args, message):
    r = cli(*args)
    assert r.returncode == 2 and "usage:" in r.stderr and message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_without_a_terminal_the_screen_modes_point_to_headless(tmp_path):
    r = cli("--watch", "--repo", str(tmp_path))
    assert r.returncode == 2 and "needs a terminal" in r.stderr and "--agent --headless" in r.stderr


def test_the_headless_path_does_not_import_textual():
    code = ("import sys, dashboard, tui.headless, tui.orchestrator, tui.sysmem, tui.watch; "
            "dashboard.build_parser().parse_args(['--agent', '--headless']); "
            "assert not [m for m in sys.modules if m.split('.')[0] in ('textual', 'textual_plotext')], 'textual'")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


# ---------------------------------------------------------------------------
# A real terminal
# ---------------------------------------------------------------------------


def tmux(*args, check=True):
    return subprocess.run(["tmux", *args], capture_output=True, text=True, timeout=30, check=check)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
def test_real_terminal_start_see_panels_quit(tmp_path):
    rf = ResultsFile(tmp_path / "results.tsv")
    rf.append(row(0, "keep", 1.03, "baseline"))
    rf.append(row(1, "keep", 1.02, "raise the learning rate"))
    session = f"dash-{uuid.uuid4().hex[:8]}"
    runner = ["uv", "run", "--quiet"] if shutil.which("uv") else [sys.executable]
    cmd = " ".join([*runner, "dashboard.py" if runner[0] == "uv" else str(DASHBOARD), "--watch", "--repo",
                    str(tmp_path)])
    # COLUMNS/LINES inherited from the test run would override the pane's real size
    env = f"-u COLUMNS -u LINES AUTORESEARCH_CPU_PEAK_FLOPS=1e11 AUTORESEARCH_CACHE_DIR={tmp_path / 'cache'}"
    shell = f"cd {ROOT} && env {env} {cmd}; echo DASHBOARD-EXIT=$?; sleep 120"  # Textual draws on stderr
    tmux("new-session", "-d", "-s", session, "-x", "120", "-y", "40", shell)
    try:
        def capture():
            return tmux("capture-pane", "-p", "-t", session, check=False).stdout

        def wait_for(needle, timeout=60):
            end = time.monotonic() + timeout
            while time.monotonic() < end:
                text = capture()
                if needle in text:
                    return text
                time.sleep(0.2)
            raise AssertionError(f"{needle!r} never appeared:\n{capture()}")

        # the first frame may be drawn before tmux settles the window size: wait for the full layout
        panels = ("Training", "Hardware", "Watching", "Experiments", "Activity", "val_bpb per experiment",
                  "raise the learning rate", "q Quit")
        end = time.monotonic() + 60
        while not all(p in capture() for p in panels):
            assert time.monotonic() < end, f"panels missing:\n{capture()}"
            time.sleep(0.2)
        tmux("send-keys", "-t", session, "q")
        after = wait_for("DASHBOARD-EXIT=", timeout=30)
        assert "DASHBOARD-EXIT=0" in after
        assert "Traceback" not in after and "Error" not in after
    finally:
        tmux("kill-session", "-t", session, check=False)
