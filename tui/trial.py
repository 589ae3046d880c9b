"""One experiment's lifecycle and the one in-flight marker that makes a kill -9 recoverable at any point.

    propose -> apply -> commit -> run(s) -> judge -> keep / revert -> record

The marker runs/pending-<tag>.json (written atomically) is the only record of an experiment in flight: it is saved
once the experiment is committed and again after every finished run, and dropped once the rows are appended. What a
restart finds, whenever the kill came:
    before the commit               nothing to undo; experiment N runs again
    committed, no run finished      HEAD is the experiment: reverted; N runs again
    runs finished, verdict pending  HEAD is the marker's commit: the confirmation continues (no new LLM call)
    reverted, rows not yet written  HEAD moved past the commit: the marker is dropped; N runs again
    rows written                    the experiment is done: the marker is stale and dropped
A restart never reverts an experiment that has a row and never undoes a revert (tui.workspace).

With several slots (tui.slots) every experiment in flight has its own marker, runs/pending-<tag>-exp<N>.json, saved
when its candidate commit exists (on its ref, beside the branch) and after every run; the plain marker then means
only "this experiment is moving the branch" (saved just before a keep moves it, dropped with the rows), so the
table above still holds for HEAD. A restart re-queues every other marker's experiment: its runs so far are kept, the
runs it still needs start again, no LLM call, nothing recorded twice (a marker whose experiment has rows is dropped).

Noise-floor runs (the baseline's, --remeasure-noise) and confirmation runs are runs of a Trial like any other; only
what is recorded differs: a noise run's row is appended as soon as it finishes.
"""

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tui.atomic import write_json_atomic
from tui.decision import Candidate
from tui.llm import Usage
from tui.results import SUPERSEDED, Row
from tui.training_run import RunOutcome

CRASH_TAIL_LINES = 40


@dataclass
class Trial:
    exp: int
    commit: str  # full sha
    description: str
    reasoning: str = ""
    baseline: bool = False
    parent: str = ""  # full sha of the commit the candidate is based on ("" for the baseline)
    rows: list = field(default_factory=list)  # one Row per finished run; status and notes are set at the end
    values: list = field(default_factory=list)  # val_bpb of each scored run
    seeds: list = field(default_factory=list)

    def candidate(self) -> Candidate:
        return Candidate(self.exp, self.commit, self.description, runs=list(self.values), seeds=list(self.seeds),
                         baseline=self.baseline)

    def add(self, row: Row, value: float | None, seed: int | None) -> None:
        """A finished run: its row, and its val_bpb when it was usable."""
        self.rows.append(row)
        if value is not None:
            self.values.append(value)
            self.seeds.append(seed)

    def finish(self, status: str, notes: str, noise: bool) -> list:
        """The rows to record: every run gets the verdict; unscored runs lose their figures."""
        for row in self.rows:
            row.status, row.notes = status, notes
            if row.kind != SUPERSEDED:
                row.kind = "noise" if noise else ("confirm" if row.run > 0 else "")
            if status not in ("keep", "discard"):
                row.val_bpb, row.memory_gb = 0.0, 0.0
        return self.rows


class InFlight:
    """runs/pending-<tag>.json: the experiment in flight, if any; with exp, runs/pending-<tag>-exp<N>.json: that
    experiment, one of several in flight."""

    def __init__(self, runs_dir, tag: str, exp: int | None = None):
        self.path = Path(runs_dir) / (f"pending-{tag}.json" if exp is None else f"pending-{tag}-exp{exp}.json")
        self.tag, self.exp = tag, exp

    @staticmethod
    def each(runs_dir, tag: str) -> list:
        """The per-experiment markers of tag, by experiment number."""
        found = []
        for p in Path(runs_dir).glob(f"pending-{tag}-exp*.json"):
            n = p.name[len(f"pending-{tag}-exp"):-len(".json")]
            if n.isdigit():
                found.append(InFlight(runs_dir, tag, int(n)))
        return sorted(found, key=lambda m: m.exp)

    def save(self, trial: Trial) -> None:
        data = asdict(trial)
        data["rows"] = [r.format() for r in trial.rows]
        write_json_atomic(self.path, {"tag": self.tag, **data})

    def load(self) -> Trial | None:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            if data.pop("tag", None) != self.tag:
                return None
            data["rows"] = [Row.parse(r) for r in data.get("rows", [])]
            return Trial(**data)
        except (OSError, ValueError, TypeError, AttributeError):
            return None

    def drop(self) -> None:
        try:
            self.path.unlink()
        except OSError:
            pass


# ---------------------------------------------------------------------------
# Judging one run and turning it into a row
# ---------------------------------------------------------------------------


def judge(outcome: RunOutcome, touched: list, budget: float, allowance: float) -> tuple:
    """(status, notes) for a run that did not produce a usable result; (None, "") when it did.
    touched: protected files the run changed (already restored). The time that counts is the engine's own clock
    (outcome.seconds): a trainer that rewrote its budget still cannot train past budget + allowance."""
    if outcome.stopped == "abort":
        return "abort", "aborted by the user"
    if outcome.stopped == "skip":
        return "skip", "skipped by the user during training"
    if touched:
        return "crash", (f"the run modified protected files ({', '.join(touched)}); repaired where it could be "
                         f"(see the log)")
    if not outcome.ok:
        return "crash", outcome.crash_reason()
    if outcome.seconds > budget + allowance:
        return "crash", (f"ran {outcome.seconds:.0f}s, past the {budget:g}s budget plus {allowance:g}s for startup "
                         f"and evaluation: not kept, whatever the trainer reports")
    return None, ""


def make_row(exp: int, status: str, description: str, commit: str, outcome: RunOutcome | None, notes: str,
             usage: Usage, *, dataset: str, tag: str, run: int = 0, seed: int | None = None, kind: str = "",
             parent: str = "", worker: str = "") -> Row:
    f = outcome.final if outcome else None
    scored = status in ("keep", "discard") and f is not None and f.ok
    tok_sec = None
    step_rate = outcome.last_step.tok_per_sec if outcome and outcome.last_step else None
    if f and f.total_tokens_M and f.training_seconds and (f.total_tokens_M >= 10 or not step_rate):
        # the summary's token count has one decimal (in millions): exact enough from 10M tokens up
        tok_sec = int(f.total_tokens_M * 1e6 / f.training_seconds)
    elif step_rate:
        tok_sec = int(step_rate)
    steps = f.num_steps if f and f.num_steps is not None else (
        outcome.last_step.step if outcome and outcome.last_step else None)
    return Row(commit=commit[:7] if commit else "-", val_bpb=f.val_bpb if scored else 0.0,
               memory_gb=f.peak_vram_mb / 1024 if scored and f.peak_vram_mb is not None else 0.0, status=status,
               description=" ".join(str(description).split()), exp=exp, tok_sec=tok_sec,
               mfu=f.mfu_percent if f else None, steps=steps,
               backend=(f.backend if f and f.backend else (outcome.backend if outcome else "")) or "",
               chip=(f.chip if f else "") or "", dataset=dataset, seconds=outcome.seconds if outcome else None,
               notes=notes, tag=tag, llm_tokens=usage.tokens if usage.calls else None,
               llm_cost=usage.cost_usd if usage.calls else None, seed=seed, run=run, kind=kind,
               eval_seconds=outcome.eval_seconds if outcome else None, parent=parent[:7], worker=worker)


def crash_text(exp: int, description: str, notes: str, tail) -> str:
    """What the next prompt shows of a crash: which experiment, why, and the end of its output."""
    return f"exp{exp} ({description}): {notes}\n" + "\n".join(list(tail)[-CRASH_TAIL_LINES:])
