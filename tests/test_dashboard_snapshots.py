"""Layout snapshots at 120x40 and 80x24 (pytest-textual-snapshot): nothing may overflow on a small terminal.

The app runs without its engine (autostart=False) and its mode's screen is fed fixed messages, the ones the engine
posts, with a fixed clock, hardware and memory sample: no pids, paths or times reach the screen.
Regenerate after an intended change with: uv run pytest tests/test_dashboard_snapshots.py --snapshot-update
"""

import pytest

from tui.app import DashboardApp
from tui.config import AgentConfig
from tui.events import ExperimentInfo
from tui.llm import Usage
from tui.messages import (ExperimentStarted, LogMessage, MemorySampled, OutputLine, RunDone, RunStarted, StateChanged,
                          StatsChanged, Step)
from tui.parser import FinalMetrics, StepMetrics
from tui.results import ResultsFile, Row, Summary
from tui.sysmem import MemorySample
from tui.training_run import RunOutcome
from tui.widgets import DetailScreen

GB = 1 << 30
HARDWARE = {"chip_name": "Apple M3 Max", "kind": "apple", "memory_gb": 64.0, "memory_kind": "unified",
            "gpu_cores": 40, "peak_flops": 14.2e12, "peak_flops_dtype": "bf16"}
MEMORY = MemorySample(system_used=int(41.2 * GB), system_total=64 * GB, trainer=int(12.3 * GB), trainer_procs=3,
                      trainer_peak=int(14.1 * GB))
ROWS = [  # (status, val_bpb, description)
    ("keep", 1.030, "baseline"),
    ("keep", 1.020, "raise matrix LR to 0.06"),
    ("discard", 1.110, "double the batch size"),
    ("crash", 0.0, "depth 12 with window pattern SSSL"),
    ("keep", 1.015, "warmdown ratio 0.5 -> 0.7"),
    ("discard", 1.050, "weight decay 0.2"),
    ("keep", 1.010, "RoPE base 10000 -> 50000 for the longer context"),
]
FINAL = FinalMetrics(val_bpb=1.004211, training_seconds=300.1, total_seconds=318.4, peak_vram_mb=12592.0,
                     mfu_percent=38.12, total_tokens_M=499.6, num_steps=953, num_params_M=50.3, depth=8,
                     backend="mlx", chip="Apple M3 Max")
CLOCK = lambda: "12:00:00"  # noqa: E731
SIZES = [(120, 40), (80, 24)]


@pytest.fixture
def results(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rf = ResultsFile(tmp_path / "results.tsv")
    for i, (status, val, desc) in enumerate(ROWS):
        rf.append(Row(commit=f"{i:07x}", val_bpb=val, memory_gb=12.3 if val else 0.0, status=status,
                      description=desc, exp=i, tok_sec=1663000, mfu=38.10, steps=953, seconds=318.4, tag="t1"))
    return tmp_path


def steps(n_done, total=953):
    return [StepMetrics(step=i, pct_done=100.0 * (i + 1) / total, loss=6.5 - 3.2 * (i / total) ** 0.4 + 0.05 *
                        ((i * 7919) % 13) / 13, lrm=1.0, dt_ms=315, tok_per_sec=1663000, mfu=38.2, epoch=1,
                        remaining=300 - 300 * (i + 1) / total) for i in range(n_done)]


def agent_app(repo):
    cfg = AgentConfig(repo=repo, tag="t1", max_experiments=100, model="claude-sonnet-4-6", script="train.py",
                      time_budget=300.0, hardware=HARDWARE)
    return DashboardApp("agent", agent_config=cfg, memory=False, autostart=False, clock=CLOCK)


async def feed_agent(pilot):
    screen = pilot.app.dashboard
    screen.running = True  # as if the orchestrator were running: its keys are live
    post = screen.post
    post(MemorySampled(MEMORY))
    post(StateChanged("thinking", "exp7: asking anthropic (claude-sonnet-4-6)"))
    post(ExperimentStarted(ExperimentInfo(7, "lower the embedding LR to 0.4", "Embeddings are overfitting early.",
                                          "abc1234")))
    post(StateChanged("training", "exp7: lower the embedding LR to 0.4"))
    post(OutputLine("Backend: mlx (MLX 0.30, gpu, bf16, mx.compile)"))
    post(OutputLine("Chip: Apple M3 Max | peak 14.20 TFLOPS for MFU (table)"))
    for sm in steps(410):
        post(Step(sm))
    post(StatsChanged(Summary(runs=7, kept=4, discarded=2, crashed=1, best_val_bpb=1.01, best_exp=6),
                      Usage(input_tokens=41200, output_tokens=5300, cost_usd=0.2031, calls=6),
                      {"noise σ": "0.0120", "margin": "0.0170", "plateau": "3/15"}))
    post(LogMessage("warning", "exp3 crashed: out of memory (depth 12); reverted"))
    await pilot.pause(0.3)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_agent_training(snap_compare, results, size):
    assert snap_compare(agent_app(results), terminal_size=size, run_before=feed_agent)


async def feed_single(pilot):
    post = pilot.app.dashboard.post
    post(MemorySampled(MEMORY))
    post(RunStarted(4242))
    post(OutputLine("Backend: mlx (MLX 0.30, gpu, bf16, mx.compile)"))
    post(OutputLine("Chip: Apple M3 Max | peak 14.20 TFLOPS for MFU (table)"))
    post(OutputLine("données: café — 你好"))
    for sm in steps(953):
        post(Step(sm))
    post(OutputLine("---"))
    post(RunDone(RunOutcome(returncode=0, final=FINAL, failed=False, timed_out=False, stopped=None, seconds=318.4,
                            log_path=None)))
    await pilot.pause(0.3)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_single_run_done(snap_compare, results, size):
    app = DashboardApp("single", repo=results, script="train_mlx.py", hardware=HARDWARE, memory=False,
                       autostart=False, clock=CLOCK)
    assert snap_compare(app, terminal_size=size, run_before=feed_single)


async def watch_charts(pilot):
    pilot.app.dashboard.post(MemorySampled(MEMORY))
    await pilot.press("v")
    await pilot.pause(0.2)


def test_watch_charts_view_small(snap_compare, results):
    app = DashboardApp("watch", repo=results, hardware=HARDWARE, memory=False, autostart=False, clock=CLOCK)
    assert snap_compare(app, terminal_size=(80, 24), run_before=watch_charts)


DIFF = """\
abc1234 exp1: raise matrix LR to 0.06

diff --git a/train.py b/train.py
--- a/train.py
+++ b/train.py
@@ -12,7 +12,7 @@ DEPTH = 8
 EMBEDDING_LR = 0.6
-MATRIX_LR = 0.04
+MATRIX_LR = 0.06
 WEIGHT_DECAY = 0.2
"""
LOG = "Backend: mlx (MLX 0.30, gpu)\nstep 00952 (100.0%) | loss: 3.301 | remaining: 0s\n---\nval_bpb:          1.020000"


async def open_detail(pilot):
    pilot.app.push_screen(DetailScreen("exp1 · keep · raise matrix LR to 0.06", DIFF, LOG, "exp1.log"))
    await pilot.pause(0.2)


def test_detail_view_small(snap_compare, results):
    app = DashboardApp("watch", repo=results, hardware=HARDWARE, memory=False, autostart=False, clock=CLOCK)
    assert snap_compare(app, terminal_size=(80, 24), run_before=open_detail)
