"""The dashboard's three modes, one screen each on one shared layout.

    SingleRunScreen  one training script in a worker: live metrics, then its summary
    WatchScreen      no engine: polls results.tsv, a headless agent's status file and the newest runs/expN.log
    AgentScreen      the orchestrator in a worker: the research loop, with pause, stop-run and quit

DashboardScreen holds the layout (training, hardware, loop status, charts, experiments table, activity log), the
handlers every mode shares and the quit sequence; a subclass fills in the hooks (begin, start, stop_engine, ...).
Textual calls a message handler of every class in the MRO, so each handler is defined in exactly one class.

Threads. The engine (Orchestrator.run(), or one TrainingRun) runs in a Textual thread worker and reports through
tui.messages; post never blocks, so the engine never waits for the screen. Keys call only the engine's thread-safe
commands (pause, resume, skip_current, abort) or TrainingRun.kill, which runs in a worker of its own because it waits
up to its grace period. A listener bug cannot stop the engine: tui.events.ListenerGroup swallows it, and post never
raises.

Why quitting cannot deadlock:
- q once asks for a clean stop (abort: the training process group is killed, the unfinished experiment reverted) and
  exits when the engine's done message arrives. Every wait of the engine polls abort (the training run, LLM calls in
  run_interruptibly, back-off sleeps), so that comes quickly.
- q again, or FORCE_QUIT_AFTER seconds, SIGKILLs the training process group and exits without waiting.
- The worker thread is joined when App.run() returns (asyncio waits for its executor); unmounting the screen aborts
  the engine and SIGKILLs the process group first, so by then the worker has nothing left to wait for. (The price of
  a worker over a daemon thread: an engine that ignored abort would hold the process at exit; tui/orchestrator.py
  polls its commands every 0.1 to 0.5 s.)
- A quit before the worker has built its engine is seen by the worker under _lock: it then builds none.
"""

import re
import threading
from dataclasses import dataclass
from pathlib import Path

from textual import on, work
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header
from textual.worker import get_current_worker

from tui.events import SlotView
from tui.llm import Usage
from tui.messages import (AgentDone, DetailReady, ExperimentEnded, ExperimentStarted, Forward, HardwareDetected,
                          LogMessage, MemorySampled, OutputLine, RunDone, RunStarted, SlotsChanged, StateChanged,
                          StatsChanged, Step, TrainingProcess)
from tui.parser import FINAL_LINE_RE, SEALED_PREFIX, OutputParser
from tui.results import Row, rows_for_tag, summarize
from tui.status_file import STATUS_NAME, read_status
from tui.sysmem import MemoryMonitor
from tui.training_run import TrainingRun, kill_process_group
from tui.watch import (LogFollower, experiment_diff, experiment_llm_calls, experiment_log, log_tail, read_results,
                       signature)
from tui.widgets import (LEVEL_STYLES, STATUS_STYLES, ActivityLog, BpbChart, DetailScreen, ExperimentsTable,
                         HardwarePanel, LossChart, SlotsPanel, StatusPanel, TrainingPanel, fmt_duration,
                         starting_note)

VIEWS = ("table", "charts", "log")  # what the lower half shows on a small terminal, cycled with `v`
COMPACT_HEIGHT = 34  # below this many rows (or COMPACT_WIDTH columns) the lower half shows one view at a time
COMPACT_WIDTH = 90
FORCE_QUIT_AFTER = 20.0  # a clean quit that takes longer than this is cut short (SIGKILL, exit)
CHIP_RE = re.compile(r"^Chip:\s*(.*?)\s*\|\s*peak\s+([\d.]+)\s*TFLOPS", re.IGNORECASE)
# in agent mode only these trainer lines reach the activity log (the full output is in runs/expN.log)
AGENT_OUTPUT_KEYS = ("Backend:", "FAIL", "Traceback", "Error", "error:", "Warning", "warning:", "deadline",
                     SEALED_PREFIX)  # the engine's evaluation of the export (tui.sealed): its value or why none


@dataclass(frozen=True)
class Files:
    """What a screen reads: the repository (diffs), results.tsv and the tag whose rows it shows, runs/ (logs)."""
    repo: Path
    results: Path
    runs_dir: Path
    tag: str | None = None

    @classmethod
    def at(cls, repo, results=None, runs_dir=None, tag=None) -> "Files":
        """Relative paths are inside repo; the defaults are repo/results.tsv and repo/runs."""
        repo = Path(repo).expanduser().resolve()
        path = Path(results).expanduser() if results else repo / "results.tsv"
        if not path.is_absolute():
            path = repo / path
        return cls(repo, path, Path(runs_dir) if runs_dir else repo / "runs", tag)

    @property
    def status(self) -> Path:
        """The headless agent's status file, next to results.tsv."""
        return self.results.parent / STATUS_NAME


def quick_hardware() -> dict:
    """What the panel shows until a trainer prints its `Chip: ... | peak ... for MFU` line: the CPU (on Apple Silicon,
    the chip) and memory. Cheap on purpose: no torch import, and never the CPU GEMM measurement, which would be
    cached too low if it ran next to a training run (the trainers measure and cache it themselves)."""
    try:
        from backends.hardware import is_apple_silicon, probe_cpu
        cpu = probe_cpu()
        return {"chip_name": cpu["cpu_model"], "cpu_cores": cpu["cpu_cores"], "memory_gb": cpu["system_memory_gb"],
                "memory_kind": "unified" if is_apple_silicon() else "system"}
    except Exception:
        return {}


def chart_rows(rows: list[Row]) -> list[Row]:
    """One tag's rows (the chart's x axis is the experiment number): the newest row's tag when mixed."""
    tags = [r.tag for r in rows if r.tag]
    return rows_for_tag(rows, tags[-1]) if tags and len(set(tags)) > 1 else rows


# ---------------------------------------------------------------------------
# What every mode shares
# ---------------------------------------------------------------------------


class DashboardScreen(Screen):
    """The layout, the handlers of the reports every engine sends, results.tsv and the detail view, quitting.
    The app's keys call quit, pause, resume, stop_run, open_selected, next_view and reload; allows() says which
    apply now."""

    MODE = ""  # the #body class -mode-<MODE> (a single run has no loop status panel)
    STATUS_TITLE = "Watching"
    DEFAULT_VIEW = "table"  # the lower half on a small terminal until `v`

    def __init__(self, files: Files, *, hardware: dict | None = None, clock=None, memory: bool = True,
                 autostart: bool = True):
        super().__init__()
        self.files = files
        self.hardware = hardware
        self.clock = clock  # timestamps of the activity log (fixed in snapshots)
        self.use_memory_monitor = memory
        self.autostart = autostart
        self.view = self.DEFAULT_VIEW
        self.compact = False
        self.running = False  # the engine's worker is running: from start() to its done message
        self.quitting = False
        self.exit_status = 0
        self.final_error: str | None = None  # printed after the screen closes (a fatal agent error, a crashed run)
        self.rows: list[Row] = []  # the rows shown: the tag's
        self.monitor: MemoryMonitor | None = None
        self._lock = threading.Lock()  # a quit and the worker building its engine happen in one order
        self._parser = OutputParser()  # the current run's output: backend, the summary block
        self.slot_views: list = []  # several slots: what each one runs (tui.events.SlotView)
        self.selected_slot = 1  # the slot the training panel and the charts follow (n: the next one)

    # -------------------------------------------------------------------------
    # Hooks of the modes
    # -------------------------------------------------------------------------

    def subtitle(self) -> str:
        raise NotImplementedError

    def begin(self) -> None:
        """On mount, once the results are shown: the panels' first words, timers."""

    def start(self) -> None:
        """Start the engine (unless the app was made with autostart=False)."""

    def stop_engine(self) -> None:
        """q while the engine runs: ask it to stop cleanly; its done message then ends the app."""

    def abort_engine(self) -> None:
        """The screen is going: stop the engine now, without a word."""

    def training_pid(self) -> int | None:
        return None

    def allows(self, action: str) -> bool | None:
        """Whether a mode's key (pause, resume, stop_run) is shown: True, False (hidden) or None (disabled)."""
        return False

    def logs_output(self, text: str) -> bool:
        """Whether a trainer line goes to the activity log."""
        return True

    def pause(self) -> None: ...

    def resume(self) -> None: ...

    def stop_run(self) -> None: ...

    # -------------------------------------------------------------------------
    # Layout
    # -------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        yield Header()
        with Vertical(id="body", classes=f"-mode-{self.MODE}"):
            with Horizontal(id="top"):
                yield TrainingPanel(id="training")
                yield HardwarePanel(id="hardware")
            yield StatusPanel(id="status")
            yield SlotsPanel(id="slots")
            with Horizontal(id="charts"):
                yield LossChart(id="loss-chart")
                yield BpbChart(id="bpb-chart")
            with Horizontal(id="lower"):
                yield ExperimentsTable(id="table")
                yield ActivityLog(clock=self.clock, id="log")
        yield Footer()

    @property
    def training(self) -> TrainingPanel:
        return self.query_one(TrainingPanel)

    @property
    def hw_panel(self) -> HardwarePanel:
        return self.query_one(HardwarePanel)

    @property
    def status(self) -> StatusPanel:
        return self.query_one(StatusPanel)

    @property
    def table(self) -> ExperimentsTable:
        return self.query_one(ExperimentsTable)

    @property
    def activity(self) -> ActivityLog:
        return self.query_one(ActivityLog)

    @property
    def loss_chart(self) -> LossChart:
        return self.query_one(LossChart)

    def on_mount(self) -> None:
        self.sub_title = self.subtitle()
        self.query_one("#training").border_title = "Training"
        self.query_one("#hardware").border_title = "Hardware"
        self.query_one("#status").border_title = self.STATUS_TITLE
        self.query_one("#slots").border_title = "Slots · n selects, s stops its run"
        self.query_one("#table").border_title = f"Experiments · {self.files.results.name} · newest first"
        self.query_one("#log").border_title = "Activity"
        self.apply_layout(self.app.size.width, self.app.size.height)
        if self.hardware:
            self.hw_panel.set_hardware(self.hardware)
        self.reload_results()
        self.table.focus()
        if self.use_memory_monitor:
            # a sampler that never ends by itself stays a daemon thread (tui.sysmem): it can never hold up the exit
            self.monitor = MemoryMonitor(lambda s: self.post(MemorySampled(s))).start()
        self.begin()
        if self.autostart:
            self.start()

    def on_resize(self, event) -> None:
        self.apply_layout(event.size.width, event.size.height)

    def apply_layout(self, width: int, height: int) -> None:
        """Small terminals show one of table / charts / log below the panels (cycled with `v`)."""
        self.compact = height < COMPACT_HEIGHT or width < COMPACT_WIDTH
        body = self.query_one("#body")
        body.set_class(self.compact, "-compact")
        for v in VIEWS:
            body.set_class(self.compact and v == self.view, f"-view-{v}")
        self.app.refresh_bindings()

    def next_view(self) -> None:
        self.view = VIEWS[(VIEWS.index(self.view) + 1) % len(VIEWS)]
        self.apply_layout(self.app.size.width, self.app.size.height)

    def log_line(self, message: str, style: str = "") -> None:
        self.activity.add(message, style)

    # -------------------------------------------------------------------------
    # Reports from the threads (tui.messages)
    # -------------------------------------------------------------------------

    def post(self, message: Message) -> None:
        """From any thread. Never blocks, never raises: once the app has closed the message is dropped."""
        try:
            self.post_message(message)
        except RuntimeError:  # the event loop is closed, or the screen has left the app
            pass

    def on_training_process(self, message: TrainingProcess) -> None:
        self.track_trainer(message.pid)

    def track_trainer(self, pid: int | None) -> None:
        if self.monitor is not None:
            self.monitor.pid = pid
            self.monitor.poke()

    # -- several slots: the panels and charts follow the selected one ------------------------------------------------

    @property
    def has_slots(self) -> bool:
        return len(self.slot_views) > 1

    def follows(self, slot: int) -> bool:
        """Is a report of `slot` (0: a single slot) for the training panel and the charts?"""
        return slot in (0, self.selected_slot)

    def on_slots_changed(self, message: SlotsChanged) -> None:
        self.show_slots(message.slots)

    def show_slots(self, views: list) -> None:
        self.slot_views = list(views)
        self.query_one(SlotsPanel).set_slots(self.slot_views, self.selected_slot)
        self.app.refresh_bindings()

    def next_slot(self) -> None:
        if not self.has_slots:
            return
        self.selected_slot = self.selected_slot % len(self.slot_views) + 1
        v = self.slot_views[self.selected_slot - 1]
        what = f"exp{v.exp} · {v.description}" if v.exp is not None else "idle"
        self.new_run(f"slot {v.slot} · {what}", f"slot {v.slot}", note=f"following {v.worker}")
        self.show_slots(self.slot_views)

    def on_output_line(self, message: OutputLine) -> None:
        if not self.follows(message.slot):
            return
        text = message.text
        self.feed_output(text)
        if self.logs_output(text):
            if FINAL_LINE_RE.match(text.strip()):
                text = " ".join(text.split())  # the summary block's column padding wraps badly in a narrow log
            self.log_line(text, "red" if ("Error" in text or text.strip() == "FAIL") else "")

    def feed_output(self, text: str) -> None:
        """Trainer lines the panels use: Backend:, Chip:, and the --- summary block."""
        had_final = self._parser.final
        self._parser.feed((text + "\n").encode("utf-8"))
        self.training.set_backend(self._parser.backend)
        m = CHIP_RE.match(text.strip())
        if m:
            self.hw_panel.set_trainer_chip(m.group(1), float(m.group(2)) * 1e12)
        if self._parser.final is not None and self._parser.final is not had_final:
            self.training.final = self._parser.final
            self.training.refresh()

    def on_step(self, message: Step) -> None:
        if self.follows(message.slot):
            self.show_step(message.metrics)

    def show_step(self, sm) -> None:
        self.training.step(sm)
        self.loss_chart.add(sm.step, sm.loss)

    def new_run(self, title: str, chart_label: str, **note) -> None:
        """A training run begins: fresh panels and chart."""
        self._parser = OutputParser()
        self.training.start(title, **note)
        self.loss_chart.reset(chart_label)

    def on_memory_sampled(self, message: MemorySampled) -> None:
        self.hw_panel.set_memory(message.sample)

    def on_hardware_detected(self, message: HardwareDetected) -> None:
        if self.hw_panel.hw is None:
            self.hw_panel.set_hardware(message.hardware)

    @work(thread=True, group="hardware")
    def detect_hardware(self) -> None:
        self.post(HardwareDetected(quick_hardware()))

    # -------------------------------------------------------------------------
    # results.tsv, the detail view
    # -------------------------------------------------------------------------

    def reload_results(self) -> None:
        """Re-read results.tsv into the table and the val_bpb chart."""
        rows = read_results(self.files.results)
        self.rows = rows_for_tag(rows, self.files.tag) if self.files.tag else rows
        self.table.load(self.rows)
        self.query_one(BpbChart).set_rows(chart_rows(self.rows))

    def reload(self) -> None:
        """The r key: re-read results.tsv and say how many rows it has."""
        self.reload_results()
        self.log_line(f"{self.files.results.name}: {len(self.rows)} rows")

    def open_selected(self) -> None:
        row = self.table.selected_row()
        if row is not None:
            self.load_detail(row)

    @on(DataTable.RowSelected, "#table")
    def _row_selected(self, event: DataTable.RowSelected) -> None:
        row = self.table.rows_by_key.get(event.row_key.value)
        if row is not None:
            self.load_detail(row)

    @work(thread=True, exclusive=True, group="detail")
    def load_detail(self, row: Row) -> None:
        """git show and the log are read off the app's thread; the detail view opens once they are in."""
        log_path = experiment_log(self.files.runs_dir, row)
        tail = log_tail(log_path) if log_path and log_path.exists() else f"(no log at {log_path})"
        diff = experiment_diff(self.files.repo, row)
        llm = experiment_llm_calls(self.files.runs_dir, row)
        if not get_current_worker().is_cancelled:  # a newer request replaced this one
            self.post(DetailReady(f"exp{row.exp} · {row.status} · {row.description}", diff, tail,
                                  log_path.name if log_path else "log", llm))

    def on_detail_ready(self, message: DetailReady) -> None:
        self.app.push_screen(DetailScreen(message.title, message.diff, message.log, message.log_name, message.llm))

    # -------------------------------------------------------------------------
    # Quitting
    # -------------------------------------------------------------------------

    def quit(self) -> None:
        """q: a clean stop, then exit; q again (or FORCE_QUIT_AFTER) stops waiting."""
        if self.quitting:
            self.force_quit()
            return
        with self._lock:
            self.quitting = True
        if not self.running:
            self.app.exit(return_code=self.exit_status)
            return
        self.stop_engine()
        self.set_timer(FORCE_QUIT_AFTER, self.force_quit)

    def force_quit(self) -> None:
        pid = self.training_pid()
        if pid:
            kill_process_group(pid, grace=0.0)
        self.app.exit(return_code=self.exit_status or 1)

    def engine_done(self) -> None:
        """The engine has ended (its worker's last message): its keys go, and a pending quit completes."""
        self.running = False
        self.app.refresh_bindings()
        if self.quitting:
            self.app.exit(return_code=self.exit_status)

    def shutdown(self) -> None:
        """Nothing started here may outlive the screen: normally the engine has stopped by now, but after a crash of
        the screen it must not keep training unseen."""
        with self._lock:
            self.quitting = True
        if self.monitor is not None:
            self.monitor.stop()
        self.abort_engine()
        pid = self.training_pid()
        if pid:
            kill_process_group(pid, grace=0.0)

    def on_unmount(self) -> None:
        self.shutdown()


# ---------------------------------------------------------------------------
# One training run
# ---------------------------------------------------------------------------


class SingleRunScreen(DashboardScreen):
    MODE = "single"
    DEFAULT_VIEW = "charts"

    def __init__(self, files: Files, script: str | None, *, python: str, kill_grace: float, **kwargs):
        super().__init__(files, **kwargs)
        self.script = script
        self.python = python
        self.kill_grace = kill_grace
        self.trainer: TrainingRun | None = None
        self.user_stopped = False

    @property
    def script_name(self) -> str:
        return Path(self.script).name if self.script else ""

    def subtitle(self) -> str:
        return f"single run · {self.script_name}" if self.script else "single run"

    def begin(self) -> None:
        self.training.wait(f"Starting {self.script_name}…" if self.script else "Waiting for training…")
        if not self.hardware:
            self.detect_hardware()

    def start(self) -> None:
        self.running = True
        self.train()

    @work(thread=True, group="engine")
    def train(self) -> None:
        try:
            with self._lock:
                if self.quitting:
                    self.post(RunDone(None))
                    return
                self.trainer = TrainingRun(self.script, self.files.repo, log_path=None, python=self.python,
                                           kill_grace=self.kill_grace, on_line=self._post_line)
                pid = self.trainer.start()
            self.post(RunStarted(pid))
            self.post(RunDone(self.trainer.wait()))
        except Exception as e:
            self.post(RunDone(None, f"cannot run {self.script}: {type(e).__name__}: {e}"))

    def _post_line(self, pl) -> None:
        self.post(OutputLine(pl.text) if pl.step is None else Step(pl.step))

    def on_run_started(self, message: RunStarted) -> None:
        self.new_run(self.script_name, self.script_name)
        self.log_line(f"started {self.script_name} (pid {message.pid})", "bold cyan")
        self.track_trainer(message.pid)

    def on_run_done(self, message: RunDone) -> None:
        self.track_trainer(None)
        outcome = message.outcome
        if message.error:
            self.exit_status = 1
            self.final_error = message.error
            self.training.finish(None, "ERROR", "red", note=message.error)
            self.log_line(message.error, "bold red")
        elif outcome is not None:
            if outcome.ok:
                verdict, style, note = "DONE", "green", None
                self.log_line(f"training finished: val_bpb {outcome.final.val_bpb:.6f} in "
                              f"{fmt_duration(outcome.seconds)}", "bold green")
            elif self.user_stopped or outcome.stopped:
                verdict, style, note = "STOPPED", "yellow", "stopped by you: the process group was killed"
                self.exit_status = 1
                self.log_line(note, "yellow")
            else:
                verdict, style, note = "CRASHED", "red", outcome.crash_reason()
                self.exit_status = 1
                self.final_error = f"training failed: {note}"
                self.log_line(self.final_error, "bold red")
            self.training.finish(outcome.final, verdict, style, note=note)
        self.reload_results()
        self.engine_done()

    def allows(self, action: str) -> bool | None:
        if action == "stop_run":
            return True if self.running else None
        return False

    def stop_run(self) -> None:
        if self.running and self.trainer is not None:
            self.user_stopped = True
            self.kill_trainer()
            self.log_line("stopping the training run", "bold yellow")

    def stop_engine(self) -> None:
        if self.trainer is not None:
            self.log_line("quitting: killing the training run (q again forces)", "bold yellow")
            self.kill_trainer()

    @work(thread=True, group="kill")
    def kill_trainer(self) -> None:
        """SIGTERM, then SIGKILL after the grace period: the wait happens here, not on the app's thread."""
        self.trainer.kill()

    def training_pid(self) -> int | None:
        run = self.trainer
        if run is not None and run.proc is not None and run.proc.poll() is None:
            return run.pid
        return None


# ---------------------------------------------------------------------------
# --watch
# ---------------------------------------------------------------------------


class WatchScreen(DashboardScreen):
    MODE = "watch"

    def __init__(self, files: Files, *, poll_seconds: float, **kwargs):
        super().__init__(files, **kwargs)
        self.poll_seconds = poll_seconds
        self.follower = LogFollower(files.runs_dir)
        self.results_sig = None  # signature of results.tsv when it was last read
        self.status_seen: dict = {}  # the status file's last contents
        self._last_state = None

    def subtitle(self) -> str:
        return f"watching {self.files.results.name}" + (f" · tag {self.files.tag}" if self.files.tag else "")

    def begin(self) -> None:
        self.training.wait("Waiting for a training log in runs/…")
        self.status.set_state("watching", f"{self.files.results.name}")
        self.log_line(f"watching {_shown(self.files.results)}, the newest log in {_shown(self.files.runs_dir)}/ "
                      f"and {self.files.status.name}")
        self.poll()
        self.set_interval(self.poll_seconds, self.poll)
        if not self.hardware:
            self.detect_hardware()

    def reload_results(self) -> None:
        # the signature first: a write after it is seen by the next poll
        self.results_sig = signature(self.files.results)
        super().reload_results()

    def reload(self) -> None:
        super().reload()
        self.show_status()

    def poll(self) -> None:
        if signature(self.files.results) != self.results_sig:
            seen = len(self.rows)
            self.reload_results()
            for r in self.rows[seen:]:  # the rows the agent appended
                val = f" val_bpb {r.val_bpb:.6f}" if r.scored else ""
                self.log_line(f"{r.label or '?'} {r.status.upper()}{val} · {r.description}",
                              STATUS_STYLES.get(r.status, ""))
        self.show_status()
        self.follow_log()

    def follow_log(self) -> None:
        path, started, lines = self.follower.poll()
        if path is None:
            return
        if started:
            n = self.follower.exp
            self.new_run(f"exp{n} · {self.describe(n)}", f"exp{n}", note=f"following {path.name}")
        for pl in lines:
            if pl.step is not None:
                self.show_step(pl.step)
            else:
                self.feed_output(pl.text)
        final = self.follower.parser.final
        if lines and final is not None:
            self.training.finish(final)

    def describe(self, n) -> str:
        st = self.status_seen
        if st.get("experiment") == n and st.get("description"):
            return st["description"]
        return next((r.description for r in reversed(self.rows) if r.exp == n), "")

    def show_status(self) -> None:
        """A headless agent's status file, while that agent is alive; else the file's own totals."""
        st = read_status(self.files.status) if self.files.status.exists() else {}
        self.status_seen = st
        usage, extra = Usage(), {}
        if st.get("alive") and _pid_alive(st.get("pid")):
            # the status file has the session's total tokens only
            usage = Usage(input_tokens=int(st.get("llm_tokens") or 0), cost_usd=st.get("llm_cost_usd"))
            extra = dict(st.get("keep_rule") or {})
            self.status.context = f"agent pid {st.get('pid')} · tag {st.get('tag', '?')}"
            state, message = str(st.get("state", "watching")), str(st.get("message", ""))
            if (state, message) != self._last_state:
                self._last_state = (state, message)
                self.log_line(f"[{state}] {message}", "dim")
            self.status.set_state(state, message)
            slots = [SlotView(**v) for v in st.get("slots") or [] if isinstance(v, dict)]
            if slots:
                self.show_slots(slots)
        else:
            self.status.context = "no agent running"
            self.status.set_state("watching", f"{self.files.results.name} · {len(self.rows)} rows")
        self.status.set_totals(summarize(chart_rows(self.rows)), usage, extra)


# ---------------------------------------------------------------------------
# The agent loop
# ---------------------------------------------------------------------------


class AgentScreen(DashboardScreen):
    MODE = "agent"
    STATUS_TITLE = "Agent loop"

    def __init__(self, files: Files, cfg, *, provider=None, **kwargs):
        super().__init__(files, **kwargs)
        self.cfg = cfg  # a resolved tui.config.AgentConfig
        self.provider = provider
        self.orch = None  # tui.orchestrator.Orchestrator, built by the worker
        self.state = "idle"
        self._last_state = None

    def subtitle(self) -> str:
        c = self.cfg
        return f"agent · tag {c.tag} · {c.provider}" + (f" {c.model}" if c.model else "")

    def begin(self) -> None:
        self.status.context = f"max {self.cfg.max_experiments} · scope {self.cfg.scope}"
        self.status.set_state("initializing", "starting the agent")

    def start(self) -> None:
        self.running = True
        self.run_agent()

    @work(thread=True, group="engine")
    def run_agent(self) -> None:
        try:
            from tui.orchestrator import Orchestrator  # only the agent needs it
            with self._lock:
                if self.quitting:
                    self.post(AgentDone(None))
                    return
                self.orch = Orchestrator(self.cfg, [Forward(self.post)], provider=self.provider)
            summary = self.orch.run()
        except Exception as e:  # run() reports its own errors; this is the import or the construction failing
            self.post(AgentDone(None, f"{type(e).__name__}: {e}"))
            return
        self.post(AgentDone(summary))

    def sync_hardware(self) -> None:
        """The orchestrator detects the hardware while it starts; show it once it is known."""
        if self.hw_panel.hw is None and self.orch is not None and self.orch.hardware:
            self.hw_panel.set_hardware(self.orch.hardware)

    def on_state_changed(self, message: StateChanged) -> None:
        state, text = message.state, message.message
        self.state = state
        self.status.set_state(state, text)
        if state == "paused":
            self.status.set_pause_pending(False)
        if state == "thinking":
            self.training.wait(f"The LLM is thinking: {text}")
        elif state == "waiting":
            self.training.wait(text)
        if (state, text) != self._last_state and state not in ("training", "baseline", "committing", "evaluating"):
            self.log_line(f"[{state}] {text}" if text else f"[{state}]", "dim")
        self._last_state = (state, text)
        self.sync_hardware()
        self.app.refresh_bindings()

    def on_experiment_started(self, message: ExperimentStarted) -> None:
        info = message.info
        run = f" (run {info.run + 1})" if info.run else ""
        slot = f"[slot {info.slot}] " if info.slot else ""
        if self.follows(info.slot):
            self.new_run(f"{slot}exp{info.exp}{run} · {info.description}", f"exp{info.exp}",
                         note=starting_note(self.orch.backend if self.orch else None, self.orch and self.orch.hardware))
        commit = f"  [{info.commit}]" if info.commit else ""
        self.log_line(f"{slot}exp{info.exp}{run}: {info.description}{commit}", "bold cyan")
        if info.reasoning and not info.baseline:
            self.log_line("  " + " ".join(info.reasoning.split())[:300], "dim")

    def logs_output(self, text: str) -> bool:
        return any(k in text for k in AGENT_OUTPUT_KEYS)

    def on_experiment_ended(self, message: ExperimentEnded) -> None:
        r = message.result
        style = STATUS_STYLES.get(r.status, "")
        scored = bool(r.val_bpb) and r.status in ("keep", "discard")
        verdict = r.status.upper() + (f" {r.val_bpb:.6f}" if scored else "")
        if self.follows(r.slot):
            self.training.finish(r.final, verdict, style, note=r.notes if r.status in ("crash", "skip") else None)
        detail = f": val_bpb {r.val_bpb:.6f}" if scored else ""
        notes = f" · {r.notes}" if r.notes else ""
        self.log_line(f"exp{r.exp} {r.status.upper()}{detail}{notes}", f"bold {style}".strip())
        self.reload_results()

    def on_stats_changed(self, message: StatsChanged) -> None:
        self.status.set_totals(message.summary, message.usage, message.extra)
        self.sync_hardware()

    def on_log_message(self, message: LogMessage) -> None:
        prefix = "" if message.level == "info" else f"{message.level}: "
        self.log_line(prefix + message.message, LEVEL_STYLES.get(message.level, ""))

    def on_agent_done(self, message: AgentDone) -> None:
        summary = message.summary
        if message.error:
            self.exit_status = 1
            self.final_error = message.error
            self.status.set_state("failed", message.error)
            self.log_line(f"error: {message.error}", "bold red")
        elif summary is not None:
            self.exit_status = 0 if summary.ok else 1
            self.final_error = None if summary.ok else summary.reason
            best = summary.totals.best_val_bpb
            skipped = f" ({summary.skipped} skipped)" if summary.skipped else ""
            self.log_line(f"agent stopped: {summary.reason} · {summary.experiments} experiments this session"
                          f"{skipped} · best {'-' if best is None else f'{best:.6f}'}",
                          "bold" if summary.ok else "bold red")
        self.training.wait("The agent has stopped: q quits, enter shows an experiment")
        self.engine_done()

    def allows(self, action: str) -> bool | None:
        if action == "stop_run":
            return True if self.running else None
        paused = self.state == "paused" or (self.orch is not None and self.orch.paused)
        return paused == (action == "resume")

    def pause(self) -> None:
        if self.orch is None or not self.running:
            return
        if self.orch.paused or self.state == "paused":
            self.resume()
            return
        self.orch.pause()
        self.status.set_pause_pending(True)
        self.log_line("pause requested: the agent pauses after the current experiment (p resumes)", "bold yellow")
        self.app.refresh_bindings()

    def resume(self) -> None:
        if self.orch is None or not self.running:
            return
        self.orch.resume()
        self.status.set_pause_pending(False)
        self.log_line("resuming", "bold")
        self.app.refresh_bindings()

    def stop_run(self) -> None:
        if self.running and self.orch is not None and self.has_slots:
            self.orch.skip_current(self.selected_slot)
            self.log_line(f"stopping the run of slot {self.selected_slot}: training killed, recorded as skip",
                          "bold yellow")
        elif self.running and self.orch is not None:
            self.orch.skip_current()
            self.log_line("stopping the current experiment: training killed, commit reverted, recorded as skip",
                          "bold yellow")

    def stop_engine(self) -> None:
        self.log_line("quitting: killing the training run, reverting the unfinished experiment (q again forces)",
                      "bold yellow")
        if self.orch is not None:
            self.orch.abort()

    def abort_engine(self) -> None:
        if self.orch is not None:
            self.orch.abort()

    def training_pid(self) -> int | None:
        return self.orch.training_pid if self.orch is not None else None


def _shown(path: Path) -> str:
    """A path as short as it can be said: relative to the working directory when inside it."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve())) or "."
    except ValueError:
        return str(path)


def _pid_alive(pid) -> bool:
    try:
        import psutil
        return psutil.Process(int(pid)).status() != psutil.STATUS_ZOMBIE
    except Exception:
        return False
