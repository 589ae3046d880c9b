"""What the engine and the dashboard's background threads report to the screen: one Textual message per event.

Posters: the orchestrator's listener (Forward) and the single run's line callback, on the engine's worker thread;
the memory monitor, on its own thread; the hardware probe and the detail view's git reads, in small workers. They
only ever post_message, which from another thread is call_soon_threadsafe onto the screen's unbounded queue: it never
blocks, so the engine never waits for the screen (quitting cannot deadlock against a thread busy reporting).
Messages from one thread are handled in the order they were posted. A message carries values its poster no longer
changes (copies of the engine's running totals): it is read later, on the app's thread, while the engine goes on.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

from textual.message import Message

from tui.events import AgentListener, ExperimentInfo, ExperimentResult
from tui.llm import Usage
from tui.parser import StepMetrics
from tui.results import Summary
from tui.sysmem import MemorySample
from tui.training_run import RunOutcome

if TYPE_CHECKING:  # the orchestrator is imported when the agent starts, not by every mode
    from tui.orchestrator import RunSummary


# dataclass(eq=False): a message is one event, not a value (eq would also make it unhashable)
@dataclass(eq=False)
class StateChanged(Message):
    state: str  # tui.events.State value
    message: str


@dataclass(eq=False)
class ExperimentStarted(Message):
    info: ExperimentInfo


@dataclass(eq=False)
class TrainingProcess(Message):
    pid: int | None  # None once the trainer has ended


@dataclass(eq=False)
class OutputLine(Message):
    text: str  # a trainer line that is not a progress line
    slot: int = 0  # the slot whose run printed it (0: a single slot)


@dataclass(eq=False)
class Step(Message):
    metrics: StepMetrics
    slot: int = 0


@dataclass(eq=False)
class SlotsChanged(Message):
    slots: list  # tui.events.SlotView, one per slot


@dataclass(eq=False)
class ExperimentEnded(Message):
    result: ExperimentResult


@dataclass(eq=False)
class StatsChanged(Message):
    summary: Summary
    usage: Usage
    extra: dict  # the keep rule's figures: noise floor, margin, plateau


@dataclass(eq=False)
class LogMessage(Message):
    level: str  # info | warning | error
    message: str


@dataclass(eq=False)
class AgentDone(Message):
    """The orchestrator's run() returned (summary), or it could not be built (error)."""
    summary: RunSummary | None
    error: str | None = None


@dataclass(eq=False)
class RunStarted(Message):
    """Single run: the training script is running as pid."""
    pid: int


@dataclass(eq=False)
class RunDone(Message):
    """Single run: the trainer's outcome, or why it could not start (error)."""
    outcome: RunOutcome | None
    error: str | None = None


@dataclass(eq=False)
class MemorySampled(Message):
    sample: MemorySample


@dataclass(eq=False)
class HardwareDetected(Message):
    hardware: dict


@dataclass(eq=False)
class DetailReady(Message):
    """An experiment's diff, log tail and LLM calls, read off the app's thread for the detail view."""
    title: str
    diff: str
    log: str
    log_name: str
    llm: str | None = None


class Forward(AgentListener):
    """The orchestrator's listener: every event becomes its message, handed to post (thread-safe, never blocks)."""

    def __init__(self, post):
        self.post = post

    def on_state(self, state, message):
        self.post(StateChanged(state.value, message))

    def on_experiment_start(self, info):
        self.post(ExperimentStarted(info))

    def on_training_process(self, pid):
        self.post(TrainingProcess(pid))

    def on_output(self, line):
        self.post(OutputLine(line))

    def on_step(self, step):
        self.post(Step(step))

    def on_slot_output(self, slot, line):
        self.post(OutputLine(line, slot))

    def on_slot_step(self, slot, step):
        self.post(Step(step, slot))

    def on_slots(self, slots):
        self.post(SlotsChanged(list(slots)))

    def on_experiment_end(self, result):
        self.post(ExperimentEnded(result))

    def on_stats(self, summary, usage, extra):
        # the orchestrator keeps adding to its Usage: the screen gets this moment's figures
        self.post(StatsChanged(dataclasses.replace(summary), dataclasses.replace(usage), dict(extra)))

    def on_log(self, level, message):
        self.post(LogMessage(level, message))
