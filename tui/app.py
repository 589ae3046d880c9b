"""The Textual dashboard: one training run with live metrics, --watch, or the agent loop on the full screen.

The engine does all the work (tui/orchestrator.py, tui/training_run.py) in a thread worker; the screen only shows
what it reports and sends it commands. Each mode is a screen of its own (tui/modes.py, which also says why quitting
cannot deadlock); the app holds the keys and hands each to the mode's screen, which decides whether the key applies.

    q  quit: stop the agent cleanly (kill the training process group, revert the unfinished experiment); q again forces
    p  pause / resume the agent after the current experiment        s  stop the current experiment now
    enter  the selected experiment's diff and log tail              v  next view (small terminals)
    n  the next slot (--workers N > 1): the panels and charts follow it, s stops its run
    d  dark / light                                                 r  reload results.tsv
"""

import asyncio
import signal
import sys

from textual.app import App
from textual.binding import Binding

from tui.modes import AgentScreen, DashboardScreen, Files, SingleRunScreen, WatchScreen
from tui.training_run import KILL_GRACE

MODES = ("single", "watch", "agent")
POLL_SECONDS = 1.0  # --watch: how often results.tsv, the status file and the newest log are checked


class DashboardApp(App):
    CSS_PATH = "styles.tcss"
    TITLE = "autoresearch"
    ENABLE_COMMAND_PALETTE = False
    # on the app, not the mode's screen, so that they stay live under the detail view (which shadows q and enter)
    BINDINGS = [
        Binding("q", "quit", "Quit"),
        Binding("p", "pause", "Pause"),
        Binding("p", "resume", "Resume"),
        Binding("s", "stop_run", "Stop run"),
        Binding("enter", "open_row", "Diff"),
        Binding("v", "next_view", "View"),
        Binding("n", "next_slot", "Slot"),
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
        self.signal_handlers = signal_handlers
        common = dict(hardware=hardware, clock=clock, memory=memory, autostart=autostart)
        self.dashboard: DashboardScreen  # the mode's screen
        if mode == "agent":
            cfg = agent_config.resolved()
            common["hardware"] = hardware or cfg.hardware
            self.dashboard = AgentScreen(Files.at(cfg.repo, cfg.results, cfg.runs_dir, cfg.tag), cfg,
                                         provider=provider, **common)
        elif mode == "watch":
            self.dashboard = WatchScreen(Files.at(repo, results, runs_dir, tag), poll_seconds=poll_seconds, **common)
        else:
            self.dashboard = SingleRunScreen(Files.at(repo, results, runs_dir, tag), script, python=python,
                                             kill_grace=kill_grace, **common)

    def get_default_screen(self) -> DashboardScreen:
        return self.dashboard

    def on_mount(self) -> None:
        if self.signal_handlers and sys.platform != "win32":
            # a closed terminal (SIGHUP) or a kill (SIGTERM) quits like `q`: the training process group goes too
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGHUP):
                loop.add_signal_handler(sig, lambda: self.call_later(self.action_quit))

    @property
    def exit_status(self) -> int:
        """0, or 1 when the run crashed, was stopped, or the agent failed (dashboard.py's exit code)."""
        return self.dashboard.exit_status

    @property
    def final_error(self) -> str | None:
        """Printed after the screen closes: a fatal agent error, a crashed run."""
        return self.dashboard.final_error

    def shutdown_engine(self) -> None:
        """After the screen is gone (or failed to start): make sure nothing we started outlives us."""
        self.dashboard.shutdown()

    # -------------------------------------------------------------------------
    # Keys: the mode's screen decides
    # -------------------------------------------------------------------------

    def check_action(self, action: str, parameters) -> bool | None:
        if action in ("pause", "resume", "stop_run"):
            return self.dashboard.allows(action)
        if action == "next_view":
            return self.dashboard.compact
        if action == "next_slot":
            return self.dashboard.has_slots
        return True

    async def action_quit(self) -> None:
        self.dashboard.quit()

    def action_pause(self) -> None:
        self.dashboard.pause()

    def action_resume(self) -> None:
        self.dashboard.resume()

    def action_stop_run(self) -> None:
        self.dashboard.stop_run()

    def action_open_row(self) -> None:
        self.dashboard.open_selected()

    def action_next_view(self) -> None:
        self.dashboard.next_view()

    def action_next_slot(self) -> None:
        self.dashboard.next_slot()

    def action_toggle_dark(self) -> None:
        self.theme = "textual-light" if self.current_theme.dark else "textual-dark"

    def action_reload(self) -> None:
        self.dashboard.reload()
