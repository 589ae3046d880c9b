"""results.tsv: one row per training run, tab-separated, git-ignored (like upstream).

Upstream's five columns come first (commit val_bpb memory_gb status description), then ours. Reading is driven by
the header, so files with extra or missing trailing columns (older versions, upstream's 5-column files) still load,
and ensure() extends an older header with the columns it lacks. Every field is escaped (backslash, tab, newline, CR),
so no description or note can break a row. Rows are appended with flush + fsync; a truncated last line (power loss
mid-write) is cut off on load; the header is written atomically.

While an agent runs, the file is its own: ResultsFile remembers the exact bytes it loaded and wrote, and restore()
puts them back (atomically) when anything else changed or deleted the file, so rows forged by a training run never
reach the agent's rows, its prompts, or the best that a resumed run starts from.

One experiment (exp column) may have several rows, one per training run of the same commit:
    run    0 for an experiment's first run, 1, 2, ... for further runs of the same commit.
    seed   AUTORESEARCH_SEED of the run; empty = the trainer's default (42).
    kind   why the run happened: empty for an experiment's first run; "confirm" for a confirmation run (the keep
           rule wanted more evidence); "noise" for a noise-floor run (the baseline's runs at the start of a tag, and
           --remeasure-noise runs of the best commit); "superseded" for a run measured on an older parent of a
           candidate that was then re-applied on a newer best (--workers N > 1): kept for the record, never scored.
    parent the commit the run's candidate was based on (7 characters; empty in older files).
    worker the slot that ran it ("slot 2 cuda:1"; empty for a single slot and in older files).
All rows of an experiment carry the experiment's final status and notes, except noise-floor rows: those are always
"keep" (the commit is the reference) and their notes say which measurement run they were; the last one carries the
measured noise floor. So a commit with more than one keep row was confirmed (or is the measured reference), a keep
with a single row was kept on one run (keep rule "single"). Summaries count experiments, not rows, and the best
val_bpb is the mean over the best experiment's runs.
"""

import math
import os
import re
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from tui.atomic import read_regular, write_atomic

# ---------------------------------------------------------------------------
# Columns and statuses
# ---------------------------------------------------------------------------

COLUMNS = [
    "commit", "val_bpb", "memory_gb", "status", "description",  # upstream
    "exp", "tok_sec", "mfu", "steps", "backend", "chip", "dataset", "seconds", "notes",  # ours (issue 5)
    "tag", "llm_tokens", "llm_cost",  # which agent run the row belongs to; LLM usage of the experiment
    "seed", "run", "kind",  # repeated runs of one commit (issue 8, see above)
    "eval_seconds",  # the sealed evaluation's process, apart from `seconds` (the trainer's, which the budget counts)
    "parent", "worker",  # the commit the candidate was measured on, and the slot that ran it (issue 13)
]
SCORED = ("keep", "discard")
SUPERSEDED = "superseded"  # kind of a run whose candidate was re-applied on a newer best: not scored
NO_COMMIT = "-"

_ESCAPES = {"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"}
_UNESCAPES = {"\\": "\\", "t": "\t", "n": "\n", "r": "\r"}


def escape(value) -> str:
    text = "" if value is None else str(value)
    return "".join(_ESCAPES.get(ch, ch) for ch in text)


def unescape(text: str) -> str:
    return re.sub(r"\\(.)", lambda m: _UNESCAPES.get(m.group(1), m.group(0)), text)


def exp_number(value) -> int | None:
    """'exp12' or '12' -> 12."""
    m = re.fullmatch(r"\s*(?:exp)?(\d+)\s*", str(value or ""))
    return int(m.group(1)) if m else None


def as_float(value) -> float | None:
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _as_int(value) -> int | None:
    x = as_float(value)
    return int(x) if x is not None and x == int(x) else None


# ---------------------------------------------------------------------------
# One row, typed: the only place that reads or writes a field's text
# ---------------------------------------------------------------------------


@dataclass
class Row:
    """One training run (or a skipped experiment). Unscored rows (crash, skip) carry val_bpb 0 and memory_gb 0."""
    commit: str = NO_COMMIT  # 7-character sha, "-" for none
    val_bpb: float = 0.0
    memory_gb: float = 0.0
    status: str = ""
    description: str = ""
    exp: int | None = None
    tok_sec: int | None = None
    mfu: float | None = None
    steps: int | None = None
    backend: str = ""
    chip: str = ""
    dataset: str = ""
    seconds: float | None = None
    notes: str = ""
    tag: str = ""
    llm_tokens: int | None = None  # None: no LLM call for this row
    llm_cost: float | None = None  # USD; None with llm_tokens set: the model's price is unknown
    seed: int | None = None  # None: the trainer's default
    run: int = 0
    kind: str = ""
    eval_seconds: float | None = None
    parent: str = ""
    worker: str = ""
    extra: dict = field(default_factory=dict)  # columns this version does not know, kept as text

    @property
    def scored(self) -> bool:
        return (self.status in SCORED and self.kind != SUPERSEDED and math.isfinite(self.val_bpb)
                and self.val_bpb > 0)

    @classmethod
    def parse(cls, text: dict) -> "Row":
        """From the file's fields (column -> text); anything unreadable becomes empty, never an exception."""
        g = lambda k: (text.get(k) or "").strip()  # noqa: E731
        tokens = _as_int(g("llm_tokens"))
        return cls(commit=g("commit") or NO_COMMIT, val_bpb=as_float(g("val_bpb")) or 0.0,
                   memory_gb=as_float(g("memory_gb")) or 0.0, status=g("status"),
                   description=text.get("description") or "", exp=exp_number(g("exp")),
                   tok_sec=_as_int(g("tok_sec")), mfu=as_float(g("mfu")), steps=_as_int(g("steps")),
                   backend=g("backend"), chip=g("chip"), dataset=g("dataset"), seconds=as_float(g("seconds")),
                   notes=text.get("notes") or "", tag=g("tag"), llm_tokens=tokens,
                   llm_cost=as_float(g("llm_cost")) if tokens is not None else None, seed=_as_int(g("seed")),
                   run=_as_int(g("run")) or 0, kind=g("kind"), eval_seconds=as_float(g("eval_seconds")),
                   parent=g("parent"), worker=g("worker"),
                   extra={k: v for k, v in text.items() if k not in _FIELD_NAMES})

    def format(self) -> dict:
        """column -> text, exactly as the file stores it."""
        scored = self.status in SCORED
        opt = lambda v, f="{}": "" if v is None else f.format(v)  # noqa: E731
        cost = "" if self.llm_tokens is None else ("unknown" if self.llm_cost is None else f"{self.llm_cost:.6f}")
        return {**self.extra,
                "commit": self.commit or NO_COMMIT,
                "val_bpb": f"{self.val_bpb:.6f}" if scored else "0.000000",
                "memory_gb": f"{self.memory_gb:.1f}" if scored else "0.0",
                "status": self.status, "description": self.description,
                "exp": opt(self.exp, "exp{}"), "tok_sec": opt(self.tok_sec), "mfu": opt(self.mfu, "{:.2f}"),
                "steps": opt(self.steps), "backend": self.backend, "chip": self.chip, "dataset": self.dataset,
                "seconds": opt(self.seconds, "{:.1f}"), "notes": self.notes, "tag": self.tag,
                "llm_tokens": opt(self.llm_tokens), "llm_cost": cost, "seed": opt(self.seed), "run": str(self.run),
                "kind": self.kind, "eval_seconds": opt(self.eval_seconds, "{:.1f}"), "parent": self.parent,
                "worker": self.worker}

    def redacted(self, redact) -> "Row":
        """A copy with redact() applied to every text field (a model or a trainer could echo a key anywhere)."""
        return replace(self, **{f.name: redact(getattr(self, f.name)) for f in fields(self)
                                if isinstance(getattr(self, f.name), str)})

    @property
    def label(self) -> str:
        """'exp3', or 'exp3 r1' for a further run of the same commit."""
        base = "" if self.exp is None else f"exp{self.exp}"
        return base + (f" r{self.run}" if self.run > 0 else "")


_FIELD_NAMES = {f.name for f in fields(Row)} - {"extra"}


# ---------------------------------------------------------------------------
# The file
# ---------------------------------------------------------------------------


class ResultsFile:
    def __init__(self, path, columns=COLUMNS):
        self.path = Path(path)
        self.columns = list(columns)
        self.header: list[str] | None = None
        self.repaired = False  # set when load() had to cut a truncated last line
        self._content: bytes | None = None  # what the file holds as far as this object knows (loaded or written)

    def ensure(self) -> None:
        """Create the file with a header, or extend an existing header with columns it lacks (atomic rewrite)."""
        if not self.path.exists() or self.path.stat().st_size == 0:
            self.rewrite([], self.columns)
            return
        rows = self.load(repair=True)
        missing = [c for c in self.columns if c not in self.header]
        if missing:
            self.rewrite(rows, self.header + missing)

    def load(self, repair: bool = False) -> list[Row]:
        """Every row, read by the file's header (missing trailing fields are empty; unknown columns are kept).
        A row is written in one write ending in "\n", so an unterminated last line is either a write in progress
        (readers ignore it) or, for the agent that owns the file (repair=True, at startup), a torn write to cut off."""
        if not self.path.exists():
            self.header, self._content = None, None
            return []
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            cut = data.rfind(b"\n") + 1
            if repair:
                with open(self.path, "r+b") as f:
                    f.truncate(cut)
                    f.flush()
                    os.fsync(f.fileno())
                self.repaired = True
            data = data[:cut]
        self._content = data
        lines = data.decode("utf-8", errors="replace").split("\n")
        if not lines or not lines[0].strip():
            self.header = None
            return []
        self.header = [unescape(h).strip() for h in lines[0].split("\t")]
        rows = []
        for line in lines[1:]:
            if not line.strip():
                continue
            values = [unescape(f) for f in line.split("\t")]
            rows.append(Row.parse({col: (values[i] if i < len(values) else "") for i, col in enumerate(self.header)}))
        return rows

    def _line(self, row: Row, header: list[str]) -> str:
        text = row.format()
        return "\t".join(escape(text.get(col, "")) for col in header) + "\n"

    def append(self, row: Row) -> None:
        """Append one row (columns not in the header are dropped) with flush + fsync."""
        if self.header is None:
            self.ensure()
        line = self._line(row, self.header).encode("utf-8")
        with open(self.path, "ab") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        self._content = (self._content or b"") + line

    def rewrite(self, rows: list[Row], header: list[str] | None = None) -> None:
        """Replace the whole file with these rows (atomic)."""
        header = list(header or self.header or self.columns)
        data = ("\t".join(escape(h) for h in header) + "\n" + "".join(self._line(r, header) for r in rows)).encode()
        write_atomic(self.path, data)
        self.header, self._content = header, data

    def restore(self) -> str:
        """Put back exactly what this object loaded and wrote when the file differs (changed, or deleted); returns
        what was done ("" when the file was intact). For the agent that owns the file."""
        if self._content is None:
            return ""
        try:
            now = read_regular(self.path, len(self._content) + 1)  # enough to tell; a run may have put /dev/zero here
        except FileNotFoundError:
            now = None
        except OSError:
            now = b""
        if now == self._content:
            return ""
        write_atomic(self.path, self._content)
        n = max(self._content.count(b"\n") - 1, 0)
        rows = f"{n} row" + ("" if n == 1 else "s")
        if now is None:
            return f"{self.path.name} was deleted: restored with its header and {rows}"
        return f"{self.path.name} was changed by something other than the agent: rewritten with the agent's {rows}"


# ---------------------------------------------------------------------------
# Experiments and summaries of a tag's rows
# ---------------------------------------------------------------------------


@dataclass
class Experiment:
    """The rows of one experiment (one exp number), in file order. The first row carries the experiment's verdict:
    later rows are its confirmation runs (same status) or noise-floor runs appended after it was kept."""
    exp: int | None
    rows: list

    @property
    def first(self) -> Row:
        return self.rows[0]

    @property
    def status(self) -> str:
        return self.first.status

    @property
    def description(self) -> str:
        return " ".join(self.first.description.split())

    @property
    def commit(self) -> str:
        """The commit its latest run measured (a candidate re-applied on a newer best has a new one)."""
        return self.rows[-1].commit

    @property
    def values(self) -> list:
        """val_bpb of every scored run."""
        return [r.val_bpb for r in self.rows if r.scored]

    @property
    def runs(self) -> int:
        return len(self.rows)

    @property
    def mean(self) -> float | None:
        vals = self.values
        return sum(vals) / len(vals) if vals else None


@dataclass
class Summary:
    runs: int = 0  # experiments with a result (skips excluded), not training runs
    kept: int = 0
    discarded: int = 0
    crashed: int = 0
    skipped: int = 0
    best_val_bpb: float | None = None  # mean over the runs of the best kept experiment
    best_exp: int | None = None
    best_runs: int = 0  # how many runs that mean is over
    next_exp: int = 0
    trained: int = 0  # training runs (rows that are not skips): confirmation and noise runs included


def rows_for_tag(rows: list[Row], tag: str) -> list[Row]:
    """Rows of one agent run. Rows without a tag (upstream files, older versions) belong to every tag."""
    return [r for r in rows if not r.tag or r.tag == tag]


def group_experiments(rows: list[Row]) -> list[Experiment]:
    """Rows grouped by experiment, in order of first appearance. A row without an exp number is its own experiment."""
    groups: dict = {}
    for i, r in enumerate(rows):
        key = r.exp if r.exp is not None else ("row", i)
        if key not in groups:
            groups[key] = Experiment(r.exp, [])
        groups[key].rows.append(r)
    return list(groups.values())


def summarize(rows: list[Row]) -> Summary:
    s = Summary()
    numbers = [r.exp for r in rows if r.exp is not None]
    s.next_exp = max(numbers) + 1 if numbers else 0
    for e in group_experiments(rows):
        status = e.status
        if status == "skip":
            s.skipped += 1
            continue
        s.runs += 1
        s.trained += len(e.rows)
        if status == "keep":
            s.kept += 1
            mean = e.mean
            if mean is not None and (s.best_val_bpb is None or mean < s.best_val_bpb):
                s.best_val_bpb, s.best_exp, s.best_runs = mean, e.exp, len(e.values)
        elif status == "discard":
            s.discarded += 1
        elif status == "crash":
            s.crashed += 1
    return s
