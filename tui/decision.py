"""The keep/discard decision, in one swappable place.

A KeepRule sees the candidate (every run of its commit so far) and the tag's history, and answers keep, discard, or
rerun (train the same commit again with another seed; the orchestrator then calls decide() again with one more run).
The noise-aware rule of issue 8 plugs in here; the loop does not change.
"""

from dataclasses import dataclass, field

from tui.results import summarize


@dataclass
class Candidate:
    exp: int
    commit: str
    description: str
    runs: list = field(default_factory=list)  # val_bpb of each completed run of this commit, oldest first
    seeds: list = field(default_factory=list)  # the seed of each run (None: the trainer's default)
    baseline: bool = False

    @property
    def val_bpb(self) -> float:
        return self.runs[-1]


@dataclass
class Verdict:
    action: str  # "keep" | "discard" | "rerun"
    reason: str  # one line for the log and the notes column
    seed: int | None = None  # rerun only: the seed for the next run


class KeepRule:
    name = "base"

    def decide(self, candidate: Candidate, history: list) -> Verdict:
        raise NotImplementedError

    def prompt_notes(self, history: list) -> list:
        """Extra lines for the LLM prompt (e.g. a plateau warning)."""
        return []

    def stats_extra(self, history: list) -> dict:
        """Figures for the status panel (e.g. noise floor, margin)."""
        return {}


class SingleRunRule(KeepRule):
    """The seed's and upstream's rule: keep iff this single run beats the best kept val_bpb."""

    name = "single"

    def decide(self, candidate: Candidate, history: list) -> Verdict:
        val = candidate.val_bpb
        if candidate.baseline:
            return Verdict("keep", f"baseline: val_bpb {val:.6f} is the reference")
        s = summarize(history)
        if s.best_val_bpb is None:
            return Verdict("keep", f"kept without comparison: val_bpb {val:.6f} is the first successful run "
                                   f"(the baseline did not complete), so it becomes the reference")
        if val < s.best_val_bpb:
            return Verdict("keep", f"val_bpb {val:.6f} beats the best {s.best_val_bpb:.6f} (exp{s.best_exp}) "
                                   f"by {s.best_val_bpb - val:.6f}")
        return Verdict("discard", f"val_bpb {val:.6f} does not beat the best {s.best_val_bpb:.6f} (exp{s.best_exp})")


KEEP_RULES = {"single": SingleRunRule}


def make_keep_rule(name: str) -> KeepRule:
    if name not in KEEP_RULES:
        raise ValueError(f"unknown keep rule {name!r}: choose one of {', '.join(KEEP_RULES)}")
    return KEEP_RULES[name]()
