"""What the dashboard reads from disk, strictly read-only: results.tsv while an agent may be appending to it, the
newest runs/expN.log as it grows, and an experiment's diff, log tail and LLM calls for the detail view.

Only the agent that owns results.tsv repairs a torn last line (ResultsFile.load(repair=True)); a viewer racing the
writer just ignores an unterminated line.
No textual here: the app polls these from its timers.
"""

import json
import os
import re
from pathlib import Path

from tui.atomic import read_regular
from tui.git_repo import REF_NAMESPACE, GitError, GitRepo
from tui.parser import OutputParser, parse_step
from tui.results import NO_COMMIT, ResultsFile, Row

LOG_NAME_RE = re.compile(r"^exp(\d+)(?:-run(\d+))?\.log$")
TAIL_LINES = 40
REPLY_CHARS = 4000  # of each LLM reply in the detail view (the whole reply is in runs/expN.llm.jsonl)
MAX_READ = 8 << 20  # bytes of a log read per poll (a runaway log must not stall the screen)

# ---------------------------------------------------------------------------
# results.tsv
# ---------------------------------------------------------------------------


def signature(path) -> tuple | None:
    """(mtime_ns, size, inode) of a file, None when it is missing: cheap change detection."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


def read_results(path) -> list[Row]:
    """The rows of results.tsv; an unterminated last line (a write in progress) is ignored."""
    try:
        return ResultsFile(Path(path)).load()
    except OSError:
        return []


# ---------------------------------------------------------------------------
# The newest training log, followed as it grows
# ---------------------------------------------------------------------------


class LogFollower:
    """Tails the most recently modified runs/exp*.log. poll() returns (path, started_new_file, new ParsedLines);
    .parser holds the state of the file being followed (final metrics, backend, last step)."""

    def __init__(self, runs_dir):
        self.runs_dir = Path(runs_dir)
        self.path: Path | None = None
        self.offset = 0
        self.parser = OutputParser()

    def newest(self) -> Path | None:
        best, best_key = None, None
        try:
            entries = list(os.scandir(self.runs_dir))
        except OSError:
            return None
        for e in entries:
            if not LOG_NAME_RE.match(e.name):
                continue
            try:
                key = (e.stat().st_mtime_ns, e.name)
            except OSError:
                continue
            if best_key is None or key > best_key:
                best, best_key = Path(e.path), key
        return best

    def poll(self) -> tuple[Path | None, bool, list]:
        newest = self.newest()
        if newest is None:
            return self.path, False, []
        started = newest != self.path
        if started:
            self.path, self.offset, self.parser = newest, 0, OutputParser()
        try:
            size = os.path.getsize(self.path)
            if size < self.offset:  # rewritten from scratch (the same experiment ran again)
                self.offset, self.parser, started = 0, OutputParser(), True
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read(MAX_READ)
        except OSError:
            return self.path, started, []
        self.offset += len(data)
        return self.path, started, self.parser.feed(data) if data else []

    @property
    def exp(self) -> int | None:
        m = LOG_NAME_RE.match(self.path.name) if self.path else None
        return int(m.group(1)) if m else None


# ---------------------------------------------------------------------------
# One experiment in detail
# ---------------------------------------------------------------------------


def log_tail(path, lines: int = TAIL_LINES) -> str:
    """The last lines of a training log, with each burst of `\\r` progress lines collapsed to its last line."""
    try:
        data = Path(path).read_bytes()
    except OSError:
        return ""
    out: list[str] = []
    step_run = False
    for raw in re.split(r"\r\n|\r|\n", data.decode("utf-8", errors="replace")):
        line = raw.rstrip()
        if not line.strip():
            continue
        is_step = parse_step(line.strip()) is not None
        if is_step and step_run:
            out[-1] = line.strip()
        else:
            out.append(line.strip() if is_step else line)
        step_run = is_step
    return "\n".join(out[-lines:])


def experiment_ref(row: Row) -> str | None:
    """The git ref of a results row: refs/autoresearch/<tag>/expN when the row has a tag (every run of an experiment
    is the same commit), else its commit column."""
    if row.exp is not None and row.tag:
        return f"{REF_NAMESPACE}/{row.tag}/exp{row.exp}"
    return None if row.commit == NO_COMMIT else row.commit


def experiment_diff(repo, row: Row) -> str:
    """What an experiment changed, as `git show` prints it; a sentence when there is nothing to show."""
    if row.exp == 0 or row.description == "baseline":
        commit = "?" if row.commit == NO_COMMIT else row.commit
        return f"exp0 is the baseline: the unmodified training script at commit {commit}."
    if row.commit == NO_COMMIT and row.status == "skip":
        return f"exp{row.exp} was skipped before anything was committed ({row.notes or 'no notes'})."
    git = GitRepo(repo)
    errors = []
    for rev in dict.fromkeys(c for c in (experiment_ref(row), row.commit) if c and c != NO_COMMIT):
        try:
            if rev.startswith(REF_NAMESPACE) and not git.ok("rev-parse", "--verify", "-q", rev):
                continue
            return git.diff(rev)
        except GitError as e:
            errors.append(str(e))
    return "no diff found for this experiment" + (f": {errors[-1]}" if errors else
                                                   f" (no ref {experiment_ref(row)} and no commit recorded)")


def experiment_log(runs_dir, row: Row) -> Path | None:
    if row.exp is None:
        return None
    name = f"exp{row.exp}-run{row.run}.log" if row.run > 0 else f"exp{row.exp}.log"
    return Path(runs_dir) / name


def experiment_llm_path(runs_dir, row: Row) -> Path | None:
    return None if row.exp is None else Path(runs_dir) / f"exp{row.exp}.llm.jsonl"


def experiment_llm_calls(runs_dir, row: Row) -> str:
    """The LLM calls of an experiment (runs/expN.llm.jsonl, tui.proposer) as the detail view shows them: per call
    what was sent (its size), how long it took, why the answer ended, and the reply or the error."""
    path = experiment_llm_path(runs_dir, row)
    if path is None or row.exp == 0:
        return "(the baseline asks no LLM)"
    try:
        data = read_regular(path, MAX_READ).decode("utf-8", errors="replace")
    except OSError:
        return f"(no LLM calls recorded at {path})"
    out = []
    for i, line in enumerate(data.splitlines(), 1):
        try:
            c = json.loads(line)
        except ValueError:  # a line being written (never: the file is replaced whole) or a foreign one
            continue
        head = [f"call {i}", str(c.get("time", "")), f"{c.get('seconds', 0):.1f} s",
                f"~{c.get('prompt_tokens_estimate', 0):,} prompt tokens ({c.get('prompt_chars', 0):,} chars)",
                f"max_tokens {c.get('max_tokens', '-')}"]
        if "error" in c:
            head.append(f"error ({c.get('error_kind', '?')}): {c['error']}")
        else:
            head.append(f"stop {c.get('stop_reason') or '?'}")
            head.append(f"usage {c.get('input_tokens', 0):,} in / {c.get('output_tokens', 0):,} out")
        out.append(" · ".join(head))
        if c.get("trimmed"):
            out.append(f"  trimmed to fit: {c['trimmed']}")
        reply = c.get("reply")
        if reply is not None:
            more = len(reply) - REPLY_CHARS
            shown = reply if more <= 0 else reply[:REPLY_CHARS] + f"\n[... {more:,} more characters in {path.name}]"
            out.append(shown if shown.strip() else "(empty reply)")
        out.append("")
    return "\n".join(out).strip() or f"(no LLM calls recorded in {path})"
