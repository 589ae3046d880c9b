"""What the orchestrator reports, and the listener interface the dashboard and headless runner implement.

All listener methods are called on the orchestrator's thread. A Textual dashboard running the orchestrator in a
worker thread forwards them with App.call_from_thread; headless prints them directly. A listener that raises is
logged and otherwise ignored: a display bug never stops the research loop.
"""

import traceback
from dataclasses import dataclass, field
from enum import Enum

from tui.llm import Usage
from tui.parser import FinalMetrics, StepMetrics
from tui.results import Row, Summary


class State(str, Enum):
    INITIALIZING = "initializing"
    BASELINE = "baseline"  # training the unmodified script (exp0)
    THINKING = "thinking"  # waiting for the LLM
    WAITING = "waiting"  # LLM busy or rate-limited: backing off before a retry
    COMMITTING = "committing"
    TRAINING = "training"
    EVALUATING = "evaluating"  # deciding keep/discard, reverting, recording
    PAUSED = "paused"
    STOPPING = "stopping"
    STOPPED = "stopped"  # the loop ended normally (limit reached or stop requested)
    FAILED = "failed"  # the loop ended on a fatal error (auth, dirty tree, second agent, ...)


@dataclass
class ExperimentInfo:
    exp: int
    description: str
    reasoning: str = ""
    commit: str = ""
    baseline: bool = False
    run: int = 0  # 0 for the first run of a commit; >0 for confirmation runs (noise-aware keep rules)
    seed: int | None = None
    log_path: str = ""
    slot: int = 0  # the slot it runs on (1..N with --workers N > 1; 0 with a single slot)


@dataclass
class ExperimentResult:
    exp: int
    status: str  # keep | discard | crash | skip
    description: str
    val_bpb: float | None = None
    commit: str = ""
    notes: str = ""
    final: FinalMetrics | None = None
    seconds: float = 0.0
    run: int = 0
    row: Row = field(default_factory=Row)  # the last row that went into results.tsv
    slot: int = 0  # the slot of its last run (0 with a single slot)


@dataclass
class SlotView:
    """One slot as the screens show it (--workers N > 1)."""
    slot: int
    worker: str  # "slot 2 cuda:1"
    exp: int | None = None  # None: idle
    run: int = 0
    description: str = ""
    pct: float = 0.0  # progress of the run, 0..100
    tok_per_sec: float | None = None
    phase: str = "idle"  # idle | training | evaluating


class AgentListener:
    """Override what you need; every method is a no-op by default."""

    def on_state(self, state: State, message: str) -> None: ...

    def on_experiment_start(self, info: ExperimentInfo) -> None: ...

    def on_training_process(self, pid: int | None) -> None: ...  # pid while a trainer runs, None when it ended

    def on_output(self, line: str) -> None: ...  # every training output line except progress lines

    def on_step(self, step: StepMetrics) -> None: ...  # every progress line, parsed

    def on_experiment_end(self, result: ExperimentResult) -> None: ...

    def on_stats(self, summary: Summary, usage: Usage, extra: dict) -> None: ...
    # the tag's totals (results.Summary), this session's LLM usage, the keep rule's figures (noise floor,
    # margin, plateau) for the status panel

    def on_log(self, level: str, message: str) -> None: ...  # level: info | warning | error

    # with --workers N > 1 the lines of a run come with its slot, instead of on_output / on_step
    def on_slot_output(self, slot: int, line: str) -> None: ...

    def on_slot_step(self, slot: int, step: StepMetrics) -> None: ...

    def on_slots(self, slots: list) -> None: ...  # every slot (SlotView), whenever one changes


class ListenerGroup:
    """Fans each event out to every listener; exceptions in listeners are reported once and swallowed."""

    def __init__(self, listeners=()):
        self.listeners = list(listeners)
        self._broken = set()

    def add(self, listener) -> None:
        self.listeners.append(listener)

    def emit(self, method: str, *args) -> None:
        for lst in self.listeners:
            fn = getattr(lst, method, None)
            if fn is None:
                continue
            try:
                fn(*args)
            except Exception as e:
                key = (id(lst), method)
                if key in self._broken:
                    continue
                self._broken.add(key)
                # tell the other listeners (a screen must not get a raw traceback printed over it)
                where = traceback.extract_tb(e.__traceback__)[-1]
                msg = (f"listener {type(lst).__name__}.{method} failed: {type(e).__name__}: {e} "
                       f"({where.filename}:{where.lineno}); further failures of it are ignored")
                for other in self.listeners:
                    if other is not lst and hasattr(other, "on_log"):
                        try:
                            other.on_log("error", msg)
                        except Exception:
                            pass
