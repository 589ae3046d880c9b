"""The keep/discard decision, in one swappable place, and the noise statistics it rests on.

A KeepRule sees the candidate (every run of its commit so far) and the tag's history (results rows), and answers
keep, discard, or rerun (train the same commit again with another seed; the orchestrator then calls decide() again
with one more run). Rules are stateless: everything they need is in results.tsv, so a restart resumes exactly.

Noise floor. Re-running an unchanged script moves val_bpb by more than many single changes gain (≈0.03 on Apple MLX).
At the start of a tag the baseline runs --noise-runs times with seeds 42, 43, ... (rows of kind "noise"), again on
--remeasure-noise. sigma is the pooled within-commit standard deviation of every commit run more than once since the
latest measurement started (the measurement itself plus every confirmation group), so the estimate sharpens as the
tag goes on instead of resting on 2 degrees of freedom. It is floored at SIGMA_FLOOR_REL x val_bpb (0.01 %, about the
smallest run-to-run noise reported anywhere, CUDA) so runs that happen to agree exactly never make the margin zero.

Keep rule "confirm" (the default). B is the mean val_bpb over the runs of the best kept experiment (n_B runs), not a
lucky minimum. For a candidate with k runs and mean m, d = B - m (positive = better) and the margin is
M(k) = 2 sigma sqrt(1/k + 1/n_B) (2 sigma of the difference of two means):
    d <= 0                       discard: a clear loser (no better than the best mean); after one run, no re-run
    k >= 2 and d > M(k)          keep: confirmed (the best becomes this candidate's mean over its k runs)
    k >= 1 + confirm_runs        discard: still inside the margin after every allowed run
    otherwise                    rerun with the next seed (a confirmation run)
A candidate is never kept on a single run (unless --confirm-runs 0): one that clears the one-run margin gets one
confirmation run, so the best is always a mean over confirmed runs. Keep rule "single" is the seed's and upstream's:
keep iff the single run beats the best mean.

Plateau: after --plateau consecutive experiments without a keep (crashes count, skips do not), the prompt asks the
LLM to change direction and the status panel says so.
"""

import math
from dataclasses import dataclass, field

from tui.results import Row, group_experiments, summarize

DEFAULT_SEED = 42  # the trainers' default AUTORESEARCH_SEED; run k of a commit uses seed DEFAULT_SEED + k
NOISE_RUNS = 3  # baseline runs that measure the noise floor
CONFIRM_RUNS = 2  # extra runs a promising candidate may get
PLATEAU = 15  # experiments without a keep before the prompt asks for a new direction
MARGIN_SIGMAS = 2.0  # the margin is this many standard deviations of the difference of two means
SIGMA_FLOOR_REL = 1e-4  # sigma is never taken below this fraction of val_bpb


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

    @property
    def mean(self) -> float:
        return sum(self.runs) / len(self.runs)

    def next_seed(self) -> int:
        last = self.seeds[-1] if self.seeds and self.seeds[-1] is not None else DEFAULT_SEED + len(self.runs) - 1
        return int(last) + 1


@dataclass
class Verdict:
    action: str  # "keep" | "discard" | "rerun"
    reason: str  # one line for the log and the notes column
    seed: int | None = None  # rerun only: the seed for the next run
    noise: bool = False  # keep only: this commit becomes the reference and its runs measure the noise floor


# ---------------------------------------------------------------------------
# Noise statistics over results rows
# ---------------------------------------------------------------------------


@dataclass
class NoiseFloor:
    sigma: float  # pooled run-to-run standard deviation, before the floor
    dof: int  # its degrees of freedom (sum over commits of runs - 1)
    floor: float  # the floor in force (SIGMA_FLOOR_REL x val_bpb)
    runs: int  # runs in the latest measurement (0: no measurement, sigma comes from confirmation runs only)
    mean: float | None  # mean val_bpb of the latest measurement
    spread: float  # max - min of the latest measurement
    exp: int | None  # the experiment the latest measurement ran on

    @property
    def used(self) -> float:
        return max(self.sigma, self.floor)

    @property
    def floored(self) -> bool:
        return self.sigma < self.floor


def margin(sigma: float, k: int, n: int, z: float = MARGIN_SIGMAS) -> float:
    """z standard deviations of the difference between a mean over k runs and a mean over n runs."""
    return z * sigma * math.sqrt(1.0 / max(k, 1) + 1.0 / max(n, 1))


def _scored(row: Row) -> float | None:
    return row.val_bpb if row.scored else None


def latest_measurement(rows: list) -> tuple | None:
    """(start, end) row indices of the latest noise measurement: consecutive rows of kind "noise" of one experiment
    (skip rows in between do not split it). None when the tag has none."""
    end = None
    for i in range(len(rows) - 1, -1, -1):
        if rows[i].kind == "noise":
            end = i + 1
            break
    if end is None:
        return None
    exp = rows[end - 1].exp
    start = i = end - 1
    while i > 0:
        prev = rows[i - 1]
        if prev.kind == "noise" and prev.exp == exp:
            start = i - 1
        elif prev.status != "skip":
            break
        i -= 1
    return start, end


def noise_floor(rows: list, floor_rel: float = SIGMA_FLOOR_REL) -> NoiseFloor | None:
    """The noise floor in force after these rows, or None when no commit has two scored runs yet."""
    block = latest_measurement(rows)
    epoch = rows[block[0]:] if block else rows
    ss, dof, values = 0.0, 0, []
    for e in group_experiments(epoch):
        vals = [v for v in (_scored(r) for r in e.rows) if v is not None]
        values += vals
        if len(vals) > 1:
            m = sum(vals) / len(vals)
            ss += sum((v - m) ** 2 for v in vals)
            dof += len(vals) - 1
    if dof == 0:
        return None
    measured = [v for v in (_scored(r) for r in rows[block[0]:block[1]]) if v is not None] if block else []
    return NoiseFloor(sigma=math.sqrt(ss / dof), dof=dof, floor=floor_rel * sum(values) / len(values),
                      runs=len(measured), mean=sum(measured) / len(measured) if measured else None,
                      spread=max(measured) - min(measured) if measured else 0.0,
                      exp=rows[block[0]].exp if block else None)


def plateau_count(rows: list) -> int:
    """Experiments since the last keep (discards and crashes; skips do not count)."""
    count = 0
    for e in group_experiments(rows):
        if e.status == "keep":
            count = 0
        elif e.status in ("discard", "crash"):
            count += 1
    return count


# ---------------------------------------------------------------------------
# Rules
# ---------------------------------------------------------------------------


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

    def noise_runs_needed(self, history: list) -> int:
        """How many more noise-floor runs of the reference commit are due now (0: none)."""
        return 0

    def noise_summary(self, history: list) -> str:
        """One line on the noise floor in force, for the log and the notes of the last noise run."""
        return ""

    def status_note(self, history: list) -> str:
        """A short phrase for the state line when something needs the user's eye (e.g. a plateau); "" otherwise."""
        return ""


class NoiseAwareRule(KeepRule):
    """What both built-in rules share: the noise-floor measurement, the reference handling, the plateau."""

    confirms = False  # does the rule use the noise floor for its decisions?

    def __init__(self, noise_runs: int = NOISE_RUNS, confirm_runs: int = CONFIRM_RUNS, plateau: int = PLATEAU,
                 z: float = MARGIN_SIGMAS, floor_rel: float = SIGMA_FLOOR_REL):
        self.noise_runs = noise_runs
        self.confirm_runs = confirm_runs
        self.plateau = plateau
        self.z = z
        self.floor_rel = floor_rel

    # -- shared pieces -----------------------------------------------------------

    def _reference(self, c: Candidate, history: list) -> Verdict | None:
        """The verdict for a candidate that has nothing to be compared with; None when there is a best."""
        measure = self.noise_runs > 1
        if c.baseline:
            return Verdict("keep", f"baseline: val_bpb {c.mean:.6f} is the reference"
                                   + (f"; noise floor run 1/{self.noise_runs}" if measure else ""), noise=measure)
        if summarize(history).best_val_bpb is None:
            measure = measure and noise_floor(history, self.floor_rel) is None
            return Verdict("keep", f"kept without comparison: val_bpb {c.mean:.6f} is the first successful run "
                                   f"(the baseline did not complete), so it becomes the reference"
                                   + ("; measuring the noise floor on it" if measure else ""), noise=measure)
        return None

    def _sigma(self, history: list, best: float) -> tuple:
        """(sigma used, how it was obtained) for decisions."""
        nf = noise_floor(history, self.floor_rel)
        if nf is None:
            floor = self.floor_rel * best
            return floor, f"σ floor {floor:.6f}: noise floor not measured"
        how = f"σ {nf.used:.6f}" + (" (floor)" if nf.floored else "") + f", {nf.dof} dof"
        return nf.used, how

    def noise_runs_needed(self, history: list) -> int:
        if self.noise_runs < 2 or summarize(history).best_val_bpb is None:
            return 0
        block = latest_measurement(history)
        if block is not None:
            if any(r.status != "skip" for r in history[block[1]:]):
                return 0  # experiments followed the measurement: it is finished, whatever its size
            done = sum(1 for r in history[block[0]:block[1]] if _scored(r) is not None)
            return max(0, self.noise_runs - done)
        return self.noise_runs if self.confirms else 0

    def noise_summary(self, history: list) -> str:
        nf = noise_floor(history, self.floor_rel)
        if nf is None:
            return "noise floor: not measured yet"
        s = summarize(history)
        src = (f"{nf.runs} runs of exp{nf.exp}, mean {nf.mean:.6f}, spread {nf.spread:.6f}" if nf.runs
               else "confirmation runs")
        pooled = " and the confirmation runs since" if nf.runs and nf.dof > nf.runs - 1 else ""
        text = (f"noise floor: σ {nf.sigma:.6f} ({nf.dof} dof, from {src}{pooled})"
                + (f", floored at {nf.floor:.6f}" if nf.floored else ""))
        if self.confirms and s.best_val_bpb is not None:
            n = max(s.best_runs, 1)
            ks = [k for k in (2, 3) if k <= 1 + self.confirm_runs] or [1]
            text += "; keep margin " + ", ".join(f"{margin(nf.used, k, n, self.z):.6f} after {k} run"
                                                 f"{'s' if k > 1 else ''}" for k in ks) + f" (best over {n} runs)"
        elif not self.confirms:
            text += f"; keep rule {self.name}: the floor is for information only"
        return text

    def _plateau_reached(self, history: list) -> int:
        count = plateau_count(history)
        return count if self.plateau and count >= self.plateau else 0

    def status_note(self, history: list) -> str:
        count = self._plateau_reached(history)
        return f"plateau: {count} experiments without a keep, asking the LLM for a new direction" if count else ""

    def prompt_notes(self, history: list) -> list:
        notes = []
        nf = noise_floor(history, self.floor_rel)
        s = summarize(history)
        if nf is not None and s.best_val_bpb is not None:
            if self.confirms:
                m2 = margin(nf.used, min(2, 1 + self.confirm_runs), max(s.best_runs, 1), self.z)
                notes.append(f"Noise: re-running the same script moves val_bpb by about {nf.used:.4f} (one standard "
                             f"deviation). val_bpb figures above are means over each experiment's runs. A promising "
                             f"change is re-run with other seeds and kept only if its mean beats the best mean by more "
                             f"than {self.z:g} standard deviations of the difference (about {m2:.4f} after 2 runs). "
                             f"Changes whose effect would be smaller than that cannot be told apart from noise: "
                             f"prefer changes that could plausibly matter more.")
            else:
                notes.append(f"Noise: re-running the same script moves val_bpb by about {nf.used:.4f} (one standard "
                             f"deviation); differences smaller than that are mostly luck.")
        count = self._plateau_reached(history)
        if count:
            notes.append(f"PLATEAU: the last {count} experiments were not kept. Change direction: stop refining what "
                         f"the recent experiments tried and make a different kind of change (another group of "
                         f"hyperparameters, the model shape, the optimizer or the schedule), or a clearly bolder "
                         f"step. Do not repeat ideas that were already discarded.")
        return notes

    def stats_extra(self, history: list) -> dict:
        out = {}
        nf = noise_floor(history, self.floor_rel)
        s = summarize(history)
        if nf is not None:
            out["noise σ"] = f"{nf.used:.4f}" + ("*" if nf.floored else "")
            if self.confirms and s.best_val_bpb is not None:
                out["margin"] = f"{margin(nf.used, min(2, 1 + self.confirm_runs), max(s.best_runs, 1), self.z):.4f}"
        elif self.noise_runs > 1 and s.next_exp > 0:
            out["noise σ"] = "measuring" if self.noise_runs_needed(history) else "-"
        if self.plateau:
            count = plateau_count(history)
            out["plateau"] = f"{count}/{self.plateau}" + (" new direction" if count >= self.plateau else "")
        return out


class SingleRunRule(NoiseAwareRule):
    """The seed's and upstream's rule: keep iff the run beats the best (the best being a mean over its runs)."""

    name = "single"

    def decide(self, candidate: Candidate, history: list) -> Verdict:
        ref = self._reference(candidate, history)
        if ref is not None:
            return ref
        s = summarize(history)
        val, best = candidate.mean, s.best_val_bpb
        what = f"val_bpb {val:.6f}" if len(candidate.runs) == 1 else f"mean val_bpb {val:.6f} over " \
                                                                     f"{len(candidate.runs)} runs"
        if val < best:
            return Verdict("keep", f"{what} beats the best {best:.6f} (exp{s.best_exp}) by {best - val:.6f}")
        return Verdict("discard", f"{what} does not beat the best {best:.6f} (exp{s.best_exp})")


class ConfirmRule(NoiseAwareRule):
    """Keep only what beats the best mean by more than the noise margin, confirmed over at least two runs."""

    name = "confirm"
    confirms = True

    def decide(self, candidate: Candidate, history: list) -> Verdict:
        ref = self._reference(candidate, history)
        if ref is not None:
            return ref
        s = summarize(history)
        best, n = s.best_val_bpb, max(s.best_runs, 1)
        sigma, how = self._sigma(history, best)
        k, m = len(candidate.runs), candidate.mean
        d, mk = best - m, margin(sigma, k, n, self.z)
        what = f"val_bpb {m:.6f}" if k == 1 else f"mean val_bpb {m:.6f} over {k} runs"
        vs = f"the best {best:.6f} (exp{s.best_exp}, {n} run{'s' if n > 1 else ''})"
        rule = f"margin {mk:.6f} = {self.z:g}σ·√(1/{k}+1/{n}), {how}"
        if d <= 0:
            return Verdict("discard", f"{'clear loser' if k == 1 else 'no better'}: {what} does not beat {vs}")
        if (k >= 2 or self.confirm_runs == 0) and d > mk:
            return Verdict("keep", f"{'confirmed' if k >= 2 else 'kept on one run'}: {what} beats {vs} by {d:.6f} "
                                   f"> {rule}")
        if k >= 1 + self.confirm_runs:
            return Verdict("discard", f"within the noise after {k} run{'s' if k > 1 else ''}: {what} beats {vs} by "
                                      f"only {d:.6f} <= {rule}")
        seed = candidate.next_seed()
        return Verdict("rerun", f"confirmation run {k}/{self.confirm_runs} with seed {seed}: {what} beats {vs} by "
                                f"{d:.6f} {'>' if d > mk else '<='} {rule}", seed=seed)


KEEP_RULES = {"confirm": ConfirmRule, "single": SingleRunRule}


def make_keep_rule(name: str, **options) -> KeepRule:
    """options: noise_runs, confirm_runs, plateau (see NoiseAwareRule)."""
    if name not in KEEP_RULES:
        raise ValueError(f"unknown keep rule {name!r}: choose one of {', '.join(KEEP_RULES)}")
    return KEEP_RULES[name](**options)
