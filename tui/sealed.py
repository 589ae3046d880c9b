"""The sealed evaluation: a run's val_bpb is computed by fixed code in a separate process, never read from its output.

A trainer run by the engine gets AUTORESEARCH_RUN_DIR (RunSpec.run_dir) and exports its model there
(prepare.export_model) instead of evaluating it. Once it has ended with its summary, the evaluator scores the export:

    python -I -B - --evaluate <run_dir>                                   (prepare.py's text on stdin)
    python -I -X pycache_prefix=<runs>/work/.pycache - --evaluate <run_dir>        (runs without bubblewrap)

- the text is prepare.py as it was before the trainer started (Evaluator reads it at submit): a run that rewrites
  prepare.py is a crash by the protected-file check afterwards, and it never changes the code that scores it;
- -I: no PYTHON* variables and no user site-packages, and neither the repository nor the run directory is on sys.path,
  so no module the trainer wrote can shadow numpy or torch. A script read from stdin has no .pyc of its own;
- bytecode: under bubblewrap a run can write nothing but its run directory, so the evaluator reads the bytecode
  installed with the packages (uv compiles it at install) and writes none (-B). Without a sandbox a run could plant
  a .pyc anywhere (the integrity check finds it, but only after the evaluation), so the pycache prefix sends every
  .pyc lookup to a directory only evaluators write: kept from one evaluation to the next (BytecodeCache) and emptied
  when anything but an evaluator changed it; with several slots a run could rewrite it while another slot's
  evaluation is using it, so each evaluation then gets a fresh private prefix in its run directory instead;
- the environment is the run's (tui.executor.run_env: the allow-list), the working directory the repository;
- the evaluator prints one JSON line {"val_bpb", "tokens", "seconds", "model"}, or exits non-zero with a one-line
  error, which becomes the run's crash note.
The evaluation's time is reported on its own (RunOutcome.eval_seconds, the eval_seconds column): the budget check
(tui.trial.judge) counts the trainer's time only.
"""

import json
import math
import os
import signal
import subprocess
import time
from dataclasses import dataclass, replace
from pathlib import Path

from tui.atomic import remove_tree
from tui.integrity import scan_files
from tui.parser import SEALED_PREFIX, ParsedLine
from tui.training_run import IS_WINDOWS, LEADERS, POLL_SECONDS, RunOutcome, kill_process_group, spawn_leader

EVALUATOR = "prepare.py"
PYCACHE = ".pycache"  # beside the run directories: written by evaluators only
NO_EXPORT = ("the run exported no model: keep the prepare.export_model(...) call at the end of {script} (val_bpb comes "
             "from the sealed evaluation of the exported model, never from what the script prints)")
EXPORTABLE = ("the model must stay exportable (torch.export / mx.export_function of forward(idx) -> logits: no "
              "data-dependent Python control flow, no in-place ops, causal)")


@dataclass(frozen=True)
class SealedResult:
    val_bpb: float
    tokens: int  # target tokens scored
    seconds: float  # the evaluator process on the engine's clock: start, imports, load and evaluation
    model: str = ""  # the file it scored, in the run directory


class BytecodeCache:
    """The evaluators' bytecode cache (the pycache prefix), kept across runs: emptied for every evaluation, it made each
    one compile torch's modules again (about a minute on a 2-core CPU). Only evaluators may write it, and a run without
    a sandbox can reach it, so its listing (size, mtime, ctime and inode of every file; no program can set a ctime
    back) is recorded after each evaluation and compared before the next: any difference empties it. The record lives
    in the agent's memory only, so the first evaluation of a session starts from an empty cache."""

    def __init__(self, path):
        self.path = Path(path)
        self._seen: dict | None = None

    def check(self) -> None:
        if self._seen is None or scan_files(self.path) != self._seen:
            remove_tree(self.path)

    def record(self) -> None:
        self._seen = scan_files(self.path)


class Evaluator:
    """prepare.py's evaluator as it is now, before the run starts."""

    def __init__(self, repo, cache: BytecodeCache | None = None):
        self.repo = Path(repo)
        self.cache = cache  # None: the installed bytecode (only where no run can write: bubblewrap)
        try:
            self.source: bytes | None = (self.repo / EVALUATOR).read_bytes()
        except OSError:
            self.source = None

    def argv(self, spec) -> list:
        flags = ["-X", f"pycache_prefix={self.cache.path}"] if self.cache else ["-B"]
        return [spec.python, "-I", *flags, "-", "--evaluate", str(spec.run_dir)]

    def evaluate(self, spec, kill_grace: float, should_stop=None) -> SealedResult | str:
        """Score the export in spec.run_dir; a one-line error when that is impossible (or the run was stopped)."""
        if self.source is None:
            return f"sealed evaluation impossible: there was no {EVALUATOR} in {self.repo} when the run started"
        kwargs = {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP} if IS_WINDOWS else {"start_new_session": True}
        if self.cache:
            self.cache.check()
        t0 = time.monotonic()
        try:
            # in a session of its own like a run's leader: another slot's sweep must not take it for an orphan
            proc = spawn_leader(self.argv(spec), cwd=self.repo, env=spec.env, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)
        except OSError as e:
            return f"sealed evaluation impossible: cannot start {spec.python}: {e}"
        data, why = self.source, None
        try:
            while True:
                try:
                    out, err = proc.communicate(input=data, timeout=POLL_SECONDS)
                    break
                except subprocess.TimeoutExpired:
                    data = None  # sent with the first call; communicate() keeps writing what is left
                if time.monotonic() - t0 > spec.deadline:
                    why = f"the sealed evaluation did not finish within {spec.deadline:.0f}s (killed)"
                elif should_stop is not None and should_stop():
                    why = f"stopped ({should_stop()})"
                if why:
                    kill_process_group(proc.pid, kill_grace, proc)
                    out, err = proc.communicate()
                    break
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            if not IS_WINDOWS:  # whatever the evaluator spawned
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            if self.cache:
                self.cache.record()
            LEADERS.discard(proc.pid)
        seconds = time.monotonic() - t0
        if why:
            return why
        return _result(proc.returncode, out, err, seconds)

    def seal(self, outcome: RunOutcome, spec, kill_grace: float, should_stop=None, on_line=None) -> RunOutcome:
        """The outcome with val_bpb from the sealed evaluation, or with the reason there is none (a crash).
        A run that crashed, was killed or printed no summary is returned as it is: there is nothing to score."""
        if outcome.final is None or outcome.failed or outcome.timed_out or outcome.stopped:
            return outcome
        claimed = outcome.final.val_bpb
        final = replace(outcome.final, val_bpb=None)  # what the trainer printed is never a result
        run_dir = Path(spec.run_dir) if spec.run_dir is not None else None
        exported = run_dir is not None and run_dir.is_dir() and any(p.name != "tmp" for p in run_dir.iterdir())
        if not exported:  # (tmp/ is the executor's, for the run's temporary files)
            result = NO_EXPORT.format(script=spec.script)
        else:
            result = self.evaluate(spec, kill_grace, should_stop)
        stopped = should_stop() if should_stop is not None else None
        if isinstance(result, SealedResult):
            final = replace(final, val_bpb=result.val_bpb)
            text = (f"{SEALED_PREFIX}val_bpb {result.val_bpb:.6f} on {result.tokens:,} tokens in "
                    f"{result.seconds:.1f}s ({EVALUATOR} --evaluate)")
            outcome = replace(outcome, final=final, eval_seconds=result.seconds)
            _drop_model(run_dir, result.model)
        else:
            text = f"{SEALED_PREFIX}{result}"
            outcome = replace(outcome, final=final, eval_error=None if stopped else result, stopped=stopped)
        if claimed is not None:
            text += f"; the trainer printed val_bpb {claimed}, which is not used"
        _report(text, outcome, spec.log_path, on_line)
        return outcome


def _result(returncode, out: bytes, err: bytes, seconds: float) -> SealedResult | str:
    """The evaluator's answer: its last stdout line as JSON on exit 0, else its last stderr line."""
    lines = [ln.strip() for ln in out.decode("utf-8", "replace").splitlines() if ln.strip()]
    if returncode != 0:
        errors = [ln.strip() for ln in err.decode("utf-8", "replace").splitlines() if ln.strip()]
        last = errors[-1].removeprefix("error: ") if errors else f"exit code {returncode}, no message"
        return f"sealed evaluation failed: {last[:400]}; {EXPORTABLE}"
    try:
        data = json.loads(lines[-1])
        # at the precision of the summary and of results.tsv: the number the loop decides on is the one a resume reads
        val_bpb, tokens, model = round(float(data["val_bpb"]), 6), int(data["tokens"]), str(data.get("model", ""))
    except (IndexError, ValueError, TypeError, KeyError):
        return f"sealed evaluation failed: the evaluator printed no result line ({(lines or ['nothing'])[-1][:200]})"
    if not (math.isfinite(val_bpb) and val_bpb > 0):
        return f"val_bpb is {val_bpb} (not a finite positive number)"
    return SealedResult(val_bpb, tokens, seconds, model)


def _drop_model(run_dir: Path, name: str) -> None:
    """Remove a scored model's weights: a night of runs would otherwise fill the disk (tens of MB each, more on a
    GPU), and weights were never kept before. export.json stays as the record of what was scored."""
    if name and Path(name).name == name and name not in (".", ".."):
        try:
            (run_dir / name).unlink()
        except OSError:
            pass


def _report(text: str, outcome: RunOutcome, log_path, on_line) -> None:
    """The evaluation's line: after the trainer's output in its log, on the screen, and in the crash tail."""
    outcome.tail.append(text)
    if log_path is not None:
        try:
            with open(log_path, "ab") as f:
                f.write(("\n" + text + "\n").encode("utf-8"))
        except OSError:
            pass
    if on_line is not None:
        on_line(ParsedLine(text))
