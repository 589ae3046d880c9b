"""results.tsv: one row per training run, tab-separated, git-ignored (like upstream).

Upstream's five columns come first (commit val_bpb memory_gb status description), then ours. Reading is driven by
the header, so files with extra or missing trailing columns (older versions, upstream's 5-column files) still load,
and ensure() extends an older header with the columns it lacks. Every field is escaped (backslash, tab, newline, CR),
so no description or note can break a row. Rows are appended with flush + fsync; a truncated last line (power loss
mid-write) is cut off on load; the header is written atomically.

One experiment (exp column) may have several rows, one per training run of the same commit:
    run    0 for an experiment's first run, 1, 2, ... for further runs of the same commit.
    seed   AUTORESEARCH_SEED of the run; empty = the trainer's default (42).
    kind   why the run happened: empty for an experiment's first run; "confirm" for a confirmation run (the keep
           rule wanted more evidence); "noise" for a noise-floor run (the baseline's runs at the start of a tag, and
           --remeasure-noise runs of the best commit).
All rows of an experiment carry the experiment's final status and notes, except noise-floor rows: those are always
"keep" (the commit is the reference) and their notes say which measurement run they were; the last one carries the
measured noise floor. So a commit with more than one keep row was confirmed (or is the measured reference), a keep
with a single row was kept on one run (keep rule "single"). Summaries count experiments, not rows, and the best
val_bpb is the mean over the best experiment's runs.
"""

import math
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

# ---------------------------------------------------------------------------
# Columns and statuses
# ---------------------------------------------------------------------------

COLUMNS = [
    "commit", "val_bpb", "memory_gb", "status", "description",  # upstream
    "exp", "tok_sec", "mfu", "steps", "backend", "chip", "dataset", "seconds", "notes",  # ours (issue 5)
    "tag", "llm_tokens", "llm_cost",  # which agent run the row belongs to; LLM usage of the experiment
    "seed", "run", "kind",  # repeated runs of one commit (issue 8, see above)
]
KINDS = ("", "confirm", "noise")
STATUSES = ("keep", "discard", "crash", "skip")
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


# ---------------------------------------------------------------------------
# The file
# ---------------------------------------------------------------------------


class ResultsFile:
    def __init__(self, path, columns=COLUMNS):
        self.path = Path(path)
        self.columns = list(columns)
        self.header: list[str] | None = None
        self.repaired = False  # set when load() had to cut a truncated last line

    def ensure(self) -> None:
        """Create the file with a header, or extend an existing header with columns it lacks (atomic rewrite)."""
        if not self.path.exists() or self.path.stat().st_size == 0:
            self._write_atomic(self.columns, [])
            self.header = list(self.columns)
            return
        rows = self.load(repair=True)
        missing = [c for c in self.columns if c not in self.header]
        if missing:
            self._write_atomic(self.header + missing, rows)
            self.header = self.header + missing

    def load(self, repair: bool = False) -> list[dict]:
        """All rows as dicts keyed by the file's header (missing trailing fields -> ""; extra fields dropped).
        A row is written in one write ending in "\n", so an unterminated last line is either a write in progress
        (readers ignore it) or, for the agent that owns the file (repair=True, at startup), a torn write to cut off."""
        if not self.path.exists():
            self.header = None
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
        lines = data.decode("utf-8", errors="replace").split("\n")
        if not lines or not lines[0].strip():
            self.header = None
            return []
        self.header = [unescape(h).strip() for h in lines[0].split("\t")]
        rows = []
        for line in lines[1:]:
            if not line.strip():
                continue
            fields = [unescape(f) for f in line.split("\t")]
            rows.append({col: (fields[i] if i < len(fields) else "") for i, col in enumerate(self.header)})
        return rows

    def append(self, row: dict) -> None:
        """Append one row (keys not in the header are dropped) with flush + fsync."""
        if self.header is None:
            self.ensure()
        line = "\t".join(escape(row.get(col, "")) for col in self.header) + "\n"
        with open(self.path, "ab") as f:
            f.write(line.encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())

    def _write_atomic(self, header: list[str], rows: list[dict]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = "\t".join(escape(h) for h in header) + "\n"
        text += "".join("\t".join(escape(r.get(c, "")) for c in header) + "\n" for r in rows)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".results.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(text.encode("utf-8"))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise


# ---------------------------------------------------------------------------
# Summaries of a tag's rows
# ---------------------------------------------------------------------------


@dataclass
class Experiment:
    """The rows of one experiment (one exp number), in file order."""
    exp: int | None
    rows: list

    @property
    def status(self) -> str:
        return self.rows[0].get("status", "")

    @property
    def values(self) -> list:
        """val_bpb of every scored run (keep/discard rows with a positive value)."""
        out = []
        for r in self.rows:
            v = as_float(r.get("val_bpb"))
            if r.get("status") in ("keep", "discard") and v is not None and v > 0:
                out.append(v)
        return out

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


def rows_for_tag(rows: list[dict], tag: str) -> list[dict]:
    """Rows of one agent run. Rows without a tag (upstream files, older versions) belong to every tag."""
    return [r for r in rows if not r.get("tag") or r.get("tag") == tag]


def group_experiments(rows: list[dict]) -> list[Experiment]:
    """Rows grouped by experiment, in order of first appearance. A row without an exp number is its own experiment."""
    groups: dict = {}
    for i, r in enumerate(rows):
        n = exp_number(r.get("exp"))
        key = n if n is not None else ("row", i)
        if key not in groups:
            groups[key] = Experiment(n, [])
        groups[key].rows.append(r)
    return list(groups.values())


def summarize(rows: list[dict]) -> Summary:
    s = Summary()
    numbers = [n for n in (exp_number(r.get("exp")) for r in rows) if n is not None]
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
