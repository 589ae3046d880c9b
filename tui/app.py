"""The Textual dashboard: one training run with live metrics, --watch, or the agent loop on the full screen.

The engine does all the work (tui/orchestrator.py, tui/training_run.py) on a daemon thread; the screen only shows
what it reports and sends it commands. Engine callbacks reach the app as EngineEvent messages through post_message,
which never blocks: the research loop never waits for the screen, and quitting cannot deadlock against a thread that
is busy reporting. Keys call only the engine's thread-safe commands (pause, resume, skip_current, abort).

    q  quit: stop the agent cleanly (kill the training process group, revert the unfinished experiment); q again forces
    p  pause / resume the agent after the current experiment        s  stop the current experiment now
    enter  the selected experiment's diff and log tail              v  next view (small terminals)
    d  dark / light                                                 r  reload results.tsv
"""

import asyncio
import re
import signal
import sys
import threading
from pathlib import Path

from textual import on
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.widgets import DataTable, Footer, Header

from tui.events import AgentListener, Stats
from tui.parser import FINAL_LINE_RE, OutputParser
from tui.results import exp_number, rows_for_tag, summarize
from tui.status_file import STATUS_NAME, read_status
from tui.sysmem import MemoryMonitor
from tui.training_run import KILL_GRACE, TrainingRun, kill_process_group
from tui.watch import LogFollower, experiment_diff, experiment_log, log_tail, read_results, signature
from tui.widgets import (LEVEL_STYLES, STATUS_STYLES, ActivityLog, BpbChart, DetailScreen, ExperimentsTable,
                         HardwarePanel, LossChart, StatusPanel, TrainingPanel, fmt_duration)

MODES = ("single", "watch", "agent")
VIEWS = ("table", "charts", "log")  # what the lower half shows on a small terminal, cycled with `v`
DEFAULT_VIEW = {"single": "charts", "watch": "table", "agent": "table"}
COMPACT_HEIGHT = 34  # below this many rows (or COMPACT_WIDTH columns) the lower half shows one view at a time
COMPACT_WIDTH = 90
POLL_SECONDS = 1.0  # --watch: how often results.tsv, the status file and the newest log are checked
FORCE_QUIT_AFTER = 20.0  # a clean quit that takes longer than this is cut short (SIGKILL, exit)
CHIP_RE = re.compile(r"^Chip:\s*(.*?)\s*\|\s*peak\s+([\d.]+)\s*TFLOPS", re.IGNORECASE)
# in agent mode only these trainer lines reach the activity log (the full output is in runs/expN.log)
AGENT_OUTPUT_KEYS = ("Backend:", "FAIL", "Traceback", "Error", "error:", "Warning", "warning:", "deadline")


class EngineEvent(Message):
    """Something the engine reported, posted from its thread: kind names the handler (_on_<kind>)."""

    def __init__(self, kind: str, *args):
        super().__init__()
        self.kind = kind
        self.args = args


class _Forward(AgentListener):
    """The orchestrator's listener: every event becomes an EngineEvent."""

    def __init__(self, post):
        self.post = post

    def on_state(self, state, message):
        self.post("state", state.value, message)

    def on_experiment_start(self, info):
        self.post("experiment_start", info)

    def on_training_process(self, pid):
        self.post("pid", pid)

    def on_output(self, line):
        self.post("output", line)

    def on_step(self, step):
        self.post("step", step)

    def on_experiment_end(self, result):
        self.post("experiment_end", result)

    def on_stats(self, stats):
        self.post("stats", stats)

    def on_log(self, level, message):
        self.post("log", level, message)


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


# ---------------------------------------------------------------------------
# The app
# ---------------------------------------------------------------------------


class DashboardApp(App):
    CSS_PATH = "styles.tcss"
    TITLE = "autoresearch"
    ENABLE_COMMAND_PALETTE = False
    BINDINGS = [
        Binding("q", "quit", "Quit"),
        Binding("p", "pause", "Pause"),
        Binding("p", "resume", "Resume"),
        Binding("s", "stop_run", "Stop run"),
        Binding("enter", "open_row", "Diff"),
        Binding("v", "next_view", "View"),
        Binding("d", "toggle_dark", "Dark"),
        Binding("r", "reload", "Reload"),
    ]

    def __init__(self, mode: str, *, repo=".", script: str | None = None, results=None, runs_dir=None,
                 tag: str | None = None, agent_config=None, provider=None, hardware: dict | None = None,
                 python: str = sys.executable, memory: bool = True, autostart: bool = True, clock=None,
                 poll_seconds: float = POLL_SECONDS, kill_grace: float = KILL_GRACE,
                 signal_handlers: bool = False):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}")
        self.mode = mode
        self.cfg = None
        if mode == "agent":
            self.cfg = agent_config.resolved()
            repo, results, runs_dir, tag = self.cfg.repo, self.cfg.results, self.cfg.runs_dir, self.cfg.tag
            hardware = hardware or self.cfg.hardware
        self.repo = Path(repo).expanduser().resolve()
        self.results_path = Path(results).expanduser() if results else self.repo / "results.tsv"
        if not self.results_path.is_absolute():
            self.results_path = self.repo / self.results_path
        self.runs_dir = Path(runs_dir) if runs_dir else self.repo / "runs"
        self.status_path = self.results_path.parent / STATUS_NAME
        self.tag = tag
        self.script = script
        self.provider = provider
        self.hardware = hardware
        self.python = python
        self.use_memory_monitor = memory
        self.autostart = autostart
        self.clock = clock
        self.poll_seconds = poll_seconds
        self.kill_grace = kill_grace
        self.signal_handlers = signal_handlers
        self.view = DEFAULT_VIEW[mode]
        self.compact = False
        self.exit_status = 0
        self.final_error: str | None = None  # printed after the screen closes (a fatal agent error, a crashed run)
        # engine
        self.orch = None  # tui.orchestrator.Orchestrator (agent mode)
        self.run_proc: TrainingRun | None = None  # single mode
        self.monitor: MemoryMonitor | None = None
        self.stats: Stats | None = None
        self.state = "idle"
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._engine_running = False
        self._quitting = False
        self._user_stopped = False
        self._parser = OutputParser()
        self._last_state = None
        self._results_sig = None
        self._rows: list = []
        self._follower = LogFollower(self.runs_dir)
        self._status_seen: dict = {}

    # -------------------------------------------------------------------------
    # Layout
    # -------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        yield Header()
        with Vertical(id="body", classes=f"-mode-{self.mode}"):
            with Horizontal(id="top"):
                yield TrainingPanel(id="training")
                yield HardwarePanel(id="hardware")
            yield StatusPanel(id="status")
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

    def on_mount(self) -> None:
        self.sub_title = self._subtitle()
        self.query_one("#training").border_title = "Training"
        self.query_one("#hardware").border_title = "Hardware"
        self.query_one("#status").border_title = "Agent loop" if self.mode == "agent" else "Watching"
        self.query_one("#table").border_title = f"Experiments · {self.results_path.name} · newest first"
        self.query_one("#log").border_title = "Activity"
        self.apply_layout(self.size.width, self.size.height)
        if self.hardware:
            self.hw_panel.set_hardware(self.hardware)
        if self.mode == "single":
            self.training.wait(f"Starting {Path(self.script).name}…" if self.script else "Waiting for training…")
        elif self.mode == "watch":
            self.training.wait("Waiting for a training log in runs/…")
            self.status.set_state("watching", f"{self.results_path.name}")
            self.log_line(f"watching {_shown(self.results_path)}, the newest log in {_shown(self.runs_dir)}/ and "
                          f"{self.status_path.name}")
        else:
            self.status.context = self._agent_context()
            self.status.set_state("initializing", "starting the agent")
        self.reload_results(quiet=True)
        self.table.focus()
        if self.use_memory_monitor:
            self.monitor = MemoryMonitor(lambda s: self._post("memory", s)).start()
        if self.mode == "watch":
            self.poll_watch()
            self.set_interval(self.poll_seconds, self.poll_watch)
            if not self.hardware:
                threading.Thread(target=lambda: self._post("hardware", quick_hardware()), daemon=True).start()
        if self.signal_handlers and sys.platform != "win32":
            # a closed terminal (SIGHUP) or a kill (SIGTERM) quits like `q`: the training process group goes too
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGHUP):
                loop.add_signal_handler(sig, lambda: self.call_later(self.action_quit))
        if self.autostart:
            self.start_engine()

    def _subtitle(self) -> str:
        if self.mode == "single":
            return f"single run · {Path(self.script).name}" if self.script else "single run"
        if self.mode == "watch":
            return f"watching {self.results_path.name}" + (f" · tag {self.tag}" if self.tag else "")
        return f"agent · tag {self.cfg.tag} · {self.cfg.provider}" + (f" {self.cfg.model}" if self.cfg.model else "")

    def _agent_context(self) -> str:
        c = self.cfg
        return f"max {c.max_experiments} · scope {c.scope}"

    def on_resize(self, event) -> None:
        self.apply_layout(event.size.width, event.size.height)

    def apply_layout(self, width: int, height: int) -> None:
        """Small terminals show one of table / charts / log below the panels (cycled with `v`)."""
        self.compact = height < COMPACT_HEIGHT or width < COMPACT_WIDTH
        try:
            body = self.query_one("#body")
        except Exception:
            return
        body.set_class(self.compact, "-compact")
        for v in VIEWS:
            body.set_class(self.compact and v == self.view, f"-view-{v}")
        self.refresh_bindings()

    def check_action(self, action: str, parameters) -> bool | None:
        if action in ("pause", "resume"):
            paused = self.state == "paused" or (self.orch is not None and self.orch.paused)
            return self.mode == "agent" and (paused == (action == "resume"))
        if action == "stop_run":
            return (True if self._engine_running else None) if self.mode in ("agent", "single") else False
        if action == "next_view":
            return self.compact
        return True

    # -------------------------------------------------------------------------
    # Engine threads
    # -------------------------------------------------------------------------

    def _post(self, kind: str, *args) -> None:
        """Thread-safe and non-blocking; silently drops events once the app has closed."""
        try:
            self.post_message(EngineEvent(kind, *args))
        except RuntimeError:
            pass

    def start_engine(self) -> None:
        target = {"single": self._single_thread, "agent": self._agent_thread}.get(self.mode)
        if target is None:
            return
        self._engine_running = True
        self._thread = threading.Thread(target=target, name=f"dashboard-{self.mode}", daemon=True)
        self._thread.start()

    def _single_thread(self) -> None:
        try:
            if not self.hardware:
                self._post("hardware", quick_hardware())
            with self._lock:
                if self._quitting:
                    self._post("run_done", None, None)
                    return
                self.run_proc = TrainingRun(self.script, self.repo, log_path=None, python=self.python,
                                            kill_grace=self.kill_grace, on_line=lambda pl: self._post("line", pl))
                pid = self.run_proc.start()
            self._post("run_start", pid)
            outcome = self.run_proc.wait()
            self._post("pid", None)
            self._post("run_done", outcome, None)
        except Exception as e:
            self._post("run_done", None, f"cannot run {self.script}: {type(e).__name__}: {e}")

    def _agent_thread(self) -> None:
        from tui.orchestrator import Orchestrator
        summary, error = None, None
        try:
            with self._lock:
                if self._quitting:
                    self._post("agent_done", None, None)
                    return
                self.orch = Orchestrator(self.cfg, [_Forward(self._post)], provider=self.provider)
            summary = self.orch.run()
        except Exception as e:  # run() reports its own errors; this is construction failing
            error = f"{type(e).__name__}: {e}"
        self._post("agent_done", summary, error)

    def training_pid(self) -> int | None:
        if self.orch is not None:
            return self.orch.training_pid
        run = self.run_proc
        if run is not None and run.proc is not None and run.proc.poll() is None:
            return run.pid
        return None

    def shutdown_engine(self, timeout: float = 10.0) -> None:
        """After the screen is gone: make sure nothing we started outlives us."""
        with self._lock:
            self._quitting = True
        if self.orch is not None:
            self.orch.abort()
        if self.monitor is not None:
            self.monitor.stop()
        if self._thread is not None and self._thread.is_alive():
            self._thread.join(timeout)
        pid = self.training_pid()
        if pid:
            kill_process_group(pid, grace=0.0)

    # -------------------------------------------------------------------------
    # Engine events (on the app's thread)
    # -------------------------------------------------------------------------

    def on_engine_event(self, event: EngineEvent) -> None:
        handler = getattr(self, f"_on_{event.kind}", None)
        if handler is not None:
            handler(*event.args)

    def log_line(self, message: str, style: str = "") -> None:
        self.activity.add(message, style)

    def _on_state(self, state: str, message: str) -> None:
        self.state = state
        self.status.set_state(state, message)
        if state == "paused":
            self.status.set_pause_pending(False)
        if state == "thinking":
            self.training.wait(f"The LLM is thinking: {message}")
        elif state == "waiting":
            self.training.wait(message)
        if (state, message) != self._last_state and state not in ("training", "baseline", "committing", "evaluating"):
            self.log_line(f"[{state}] {message}" if message else f"[{state}]", "dim")
        self._last_state = (state, message)
        self.refresh_bindings()

    def _on_experiment_start(self, info) -> None:
        self._parser = OutputParser()
        run = f" (run {info.run + 1})" if getattr(info, "run", 0) else ""
        self.training.start(f"exp{info.exp}{run} · {info.description}")
        self.query_one(LossChart).reset(f"exp{info.exp}")
        commit = f"  [{info.commit}]" if info.commit else ""
        self.log_line(f"exp{info.exp}: {info.description}{commit}", "bold cyan")
        if info.reasoning and not info.baseline:
            self.log_line("  " + " ".join(info.reasoning.split())[:300], "dim")

    def _on_run_start(self, pid: int) -> None:
        self.training.start(Path(self.script).name)
        self.query_one(LossChart).reset(Path(self.script).name)
        self.log_line(f"started {Path(self.script).name} (pid {pid})", "bold cyan")
        self._on_pid(pid)

    def _on_pid(self, pid) -> None:
        if self.monitor is not None:
            self.monitor.pid = pid
            self.monitor.poke()

    def _on_line(self, pl) -> None:
        if pl.step is not None:
            self._on_step(pl.step)
        else:
            self._on_output(pl.text)

    def _on_output(self, text: str) -> None:
        self._feed_output(text)
        if self.mode == "single" or any(k in text for k in AGENT_OUTPUT_KEYS):
            if FINAL_LINE_RE.match(text.strip()):
                text = " ".join(text.split())  # the summary block's column padding wraps badly in a narrow log
            self.log_line(text, "red" if ("Error" in text or text.strip() == "FAIL") else "")

    def _feed_output(self, text: str) -> None:
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

    def _on_step(self, sm) -> None:
        self.training.step(sm)
        self.query_one(LossChart).add(sm.step, sm.loss)

    def _on_experiment_end(self, r) -> None:
        style = STATUS_STYLES.get(r.status, "")
        verdict = r.status.upper() + (f" {r.val_bpb:.6f}" if r.val_bpb and r.status in ("keep", "discard") else "")
        self.training.finish(r.final, verdict, style, note=r.notes if r.status in ("crash", "skip") else None)
        detail = f": val_bpb {r.val_bpb:.6f}" if r.val_bpb and r.status in ("keep", "discard") else ""
        notes = f" · {r.notes}" if r.notes else ""
        self.log_line(f"exp{r.exp} {r.status.upper()}{detail}{notes}", f"bold {style}".strip())
        self.reload_results(quiet=True)

    def _on_stats(self, stats) -> None:
        self.stats = stats
        self.status.set_stats(stats)
        self._sync_hardware()

    def _on_log(self, level: str, message: str) -> None:
        prefix = "" if level == "info" else f"{level}: "
        self.log_line(prefix + message, LEVEL_STYLES.get(level, ""))

    def _on_agent_done(self, summary, error) -> None:
        self._engine_running = False
        if error:
            self.exit_status = 1
            self.final_error = error
            self.status.set_state("failed", error)
            self.log_line(f"error: {error}", "bold red")
        elif summary is not None:
            self.exit_status = 0 if summary.ok else 1
            self.final_error = None if summary.ok else summary.reason
            st = summary.stats
            best = "-" if st.best_val_bpb is None else f"{st.best_val_bpb:.6f}"
            self.log_line(f"agent stopped: {summary.reason} · {summary.experiments} experiments this session · "
                          f"best {best}", "bold" if summary.ok else "bold red")
        self.training.wait("The agent has stopped: q quits, enter shows an experiment")
        self.refresh_bindings()
        if self._quitting:
            self.exit(return_code=self.exit_status)

    def _on_run_done(self, outcome, error) -> None:
        self._engine_running = False
        if self.monitor is not None:
            self.monitor.pid = None
        if error:
            self.exit_status = 1
            self.final_error = error
            self.training.finish(None, "ERROR", "red", note=error)
            self.log_line(error, "bold red")
        elif outcome is not None:
            if outcome.ok:
                verdict, style, note = "DONE", "green", None
                self.log_line(f"training finished: val_bpb {outcome.final.val_bpb:.6f} in "
                              f"{fmt_duration(outcome.seconds)}", "bold green")
            elif self._user_stopped or outcome.stopped:
                verdict, style, note = "STOPPED", "yellow", "stopped by you: the process group was killed"
                self.exit_status = 1
                self.log_line(note, "yellow")
            else:
                verdict, style, note = "CRASHED", "red", outcome.crash_reason()
                self.exit_status = 1
                self.final_error = f"training failed: {note}"
                self.log_line(self.final_error, "bold red")
            self.training.finish(outcome.final, verdict, style, note=note)
        self.reload_results(quiet=True)
        self.refresh_bindings()
        if self._quitting:
            self.exit(return_code=self.exit_status)

    def _on_memory(self, sample) -> None:
        self.hw_panel.set_memory(sample)
        self._sync_hardware()

    def _sync_hardware(self) -> None:
        """Agent mode: the orchestrator detects the hardware in the background; show it once it is known."""
        if self.hw_panel.hw is None and self.orch is not None and self.orch.hardware:
            self.hw_panel.set_hardware(self.orch.hardware)

    def _on_hardware(self, hw) -> None:
        if self.hw_panel.hw is None:
            self.hw_panel.set_hardware(hw)

    # -------------------------------------------------------------------------
    # results.tsv, and --watch
    # -------------------------------------------------------------------------

    def reload_results(self, quiet: bool = False, announce: bool = False) -> None:
        """Re-read results.tsv; `announce` logs the rows that appeared (--watch), `quiet` skips the count line."""
        rows = read_results(self.results_path)
        self._results_sig = signature(self.results_path)
        shown = rows_for_tag(rows, self.tag) if self.tag else rows
        old = len(self._rows)
        self._rows = shown
        self.table.load(shown)
        self.query_one(BpbChart).set_rows(self._chart_rows(shown))
        if announce and old < len(shown):
            for r in shown[old:]:
                val = f" val_bpb {r.get('val_bpb')}" if r.get("status") in ("keep", "discard") else ""
                self.log_line(f"{r.get('exp', '?')} {str(r.get('status', '')).upper()}{val} · "
                              f"{r.get('description', '')}", STATUS_STYLES.get(r.get("status"), ""))
        elif not quiet:
            self.log_line(f"{self.results_path.name}: {len(shown)} rows")

    def _chart_rows(self, rows: list) -> list:
        """One tag's rows (the chart's x axis is the experiment number): the newest row's tag when mixed."""
        tags = [r.get("tag") for r in rows if r.get("tag")]
        return rows_for_tag(rows, tags[-1]) if tags and len(set(tags)) > 1 else rows

    def poll_watch(self) -> None:
        if signature(self.results_path) != self._results_sig:
            self.reload_results(quiet=True, announce=True)
        self._watch_status()
        path, started, lines = self._follower.poll()
        if path is None:
            return
        if started:
            n = self._follower.exp
            self._parser = OutputParser()
            self.training.start(f"exp{n} · {self._describe(n)}", note=f"following {path.name}")
            self.query_one(LossChart).reset(f"exp{n}")
        for pl in lines:
            if pl.step is not None:
                self._on_step(pl.step)
            else:
                self._feed_output(pl.text)
        p = self._follower.parser
        if lines and p.final is not None:
            self.training.finish(p.final)

    def _describe(self, n) -> str:
        st = self._status_seen
        if st.get("experiment") == n and st.get("description"):
            return st["description"]
        for r in reversed(self._rows):
            if exp_number(r.get("exp")) == n:
                return r.get("description", "")
        return ""

    def _watch_status(self) -> None:
        st = read_status(self.status_path) if self.status_path.exists() else {}
        self._status_seen = st
        alive = bool(st.get("alive")) and _pid_alive(st.get("pid"))
        rows = self._chart_rows(self._rows)
        s = summarize(rows)
        stats = Stats(runs=s.runs, kept=s.kept, discarded=s.discarded, crashed=s.crashed, skipped=s.skipped,
                      best_val_bpb=s.best_val_bpb, best_exp=s.best_exp, next_exp=s.next_exp)
        if alive:
            stats.input_tokens = int(st.get("llm_tokens") or 0)
            stats.cost_usd = st.get("llm_cost_usd")
            stats.extra = dict(st.get("keep_rule") or {})
            self.status.context = f"agent pid {st.get('pid')} · tag {st.get('tag', '?')}"
            state, message = str(st.get("state", "watching")), str(st.get("message", ""))
            if (state, message) != self._last_state:
                self._last_state = (state, message)
                self.log_line(f"[{state}] {message}", "dim")
            self.status.set_state(state, message)
        else:
            self.status.context = "no agent running"
            self.status.set_state("watching", f"{self.results_path.name} · {len(self._rows)} rows")
        self.status.set_stats(stats)

    # -------------------------------------------------------------------------
    # Keys
    # -------------------------------------------------------------------------

    async def action_quit(self) -> None:
        if self._quitting:  # second q: do not wait any longer
            self.force_quit()
            return
        with self._lock:
            self._quitting = True
        if not self._engine_running:
            self.exit(return_code=self.exit_status)
            return
        if self.mode == "agent":
            self.log_line("quitting: killing the training run, reverting the unfinished experiment (q again forces)",
                          "bold yellow")
            if self.orch is not None:
                self.orch.abort()
        elif self.run_proc is not None:
            self.log_line("quitting: killing the training run (q again forces)", "bold yellow")
            threading.Thread(target=self.run_proc.kill, daemon=True).start()
        self.set_timer(FORCE_QUIT_AFTER, self.force_quit)

    def force_quit(self) -> None:
        pid = self.training_pid()
        if pid:
            kill_process_group(pid, grace=0.0)
        self.exit(return_code=self.exit_status or 1)

    def action_pause(self) -> None:
        orch = self.orch
        if orch is None or not self._engine_running:
            return
        if orch.paused or self.state == "paused":
            self.action_resume()
            return
        orch.pause()
        self.status.set_pause_pending(True)
        self.log_line("pause requested: the agent pauses after the current experiment (p resumes)", "bold yellow")
        self.refresh_bindings()

    def action_resume(self) -> None:
        orch = self.orch
        if orch is None or not self._engine_running:
            return
        orch.resume()
        self.status.set_pause_pending(False)
        self.log_line("resuming", "bold")
        self.refresh_bindings()

    def action_stop_run(self) -> None:
        if not self._engine_running:
            return
        if self.mode == "agent" and self.orch is not None:
            self.orch.skip_current()
            self.log_line("stopping the current experiment: training killed, commit reverted, recorded as skip",
                          "bold yellow")
        elif self.mode == "single" and self.run_proc is not None:
            self._user_stopped = True
            threading.Thread(target=self.run_proc.kill, daemon=True).start()
            self.log_line("stopping the training run", "bold yellow")

    def action_open_row(self) -> None:
        row = self.table.selected_row()
        if row is not None:
            self.open_detail(row)

    @on(DataTable.RowSelected, "#table")
    def _row_selected(self, event: DataTable.RowSelected) -> None:
        row = self.table.rows_by_key.get(event.row_key.value)
        if row is not None:
            self.open_detail(row)

    def open_detail(self, row: dict) -> None:
        n = exp_number(row.get("exp"))
        log_path = experiment_log(self.runs_dir, row)
        tail = log_tail(log_path) if log_path and log_path.exists() else f"(no log at {log_path})"
        diff = experiment_diff(self.repo, row)
        title = f"exp{n} · {row.get('status', '')} · {row.get('description', '')}"
        self.push_screen(DetailScreen(title, diff, tail, log_path.name if log_path else "log"))

    def action_next_view(self) -> None:
        self.view = VIEWS[(VIEWS.index(self.view) + 1) % len(VIEWS)]
        self.apply_layout(self.size.width, self.size.height)

    def action_toggle_dark(self) -> None:
        self.theme = "textual-light" if self.current_theme.dark else "textual-dark"

    def action_reload(self) -> None:
        self.reload_results()
        if self.mode == "watch":
            self._watch_status()

    def on_unmount(self) -> None:
        # normally the engine has stopped by now; after a crash of the screen it must not keep training unseen
        if self.monitor is not None:
            self.monitor.stop()
        if self.orch is not None and self._engine_running:
            self.orch.abort()
        pid = self.training_pid()
        if pid:
            kill_process_group(pid, grace=0.0)


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
