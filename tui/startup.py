"""Starting (or resuming) an agent run: the checks, the lock, the branch, the repair of an interrupted experiment,
and the facts the loop needs, in this order:

    repository and script -> lock (and the trainer a killed agent left running) -> no foreign uncommitted changes ->
    the LLM works (from here the secrets are out of the environment) -> results.tsv -> the branch checked out, the
    interrupted experiment repaired -> hardware -> the integrity snapshot (tui.integrity; after the checkout: the
    branch's own prepare.py is the reference; after the hardware detection, which imports backends/)

Every refusal is a FatalError with one line that says what to do; nothing in the repository has changed by then,
except what the order above has already done on the agent's own branch.
"""

import time
from dataclasses import dataclass, field
from pathlib import Path

from tui.config import AgentConfig
from tui.controls import FatalError
from tui.devices import gpu_models_problem, shared_device_problem
from tui.events import State
from tui.git_repo import GitError, GitRepo
from tui.integrity import Integrity
from tui.lock import LOCK_NAME, AgentLock, LockHeld
from tui.parser import parse_output
from tui.prompt import ScriptError, find_hparams
from tui.results import ResultsFile, Row, rows_for_tag
from tui.training_run import kill_process_group
from tui.trial import InFlight, Trial, crash_text
from tui.workspace import Workspace, experiment_of


@dataclass
class Session:
    """What startup found and holds: the loop works from this."""
    script: str
    lock: AgentLock
    workspace: Workspace
    integrity: Integrity
    rows: list  # results rows of this tag
    resume: Trial | None = None  # a confirmation cut short by kill -9: continued first
    requeue: list = field(default_factory=list)  # several slots: the other experiments a kill -9 left in flight
    last_crash: tuple | None = None  # (exp, text for the prompt)
    hardware: dict = field(default_factory=dict)
    backend: str | None = None


def open_session(cfg: AgentConfig, git: GitRepo, results: ResultsFile, inflight: InFlight, proposer, status,
                 log, confined: bool = False) -> Session:
    status.set(State.INITIALIZING, f"repository {cfg.repo}, tag {cfg.tag}")
    if not git.is_repo():
        raise FatalError(f"{cfg.repo} is not a git repository: run the agent inside your autoresearch checkout")
    if not git.has_commits():
        raise FatalError("the repository has no commits yet: commit the training script first")
    script, backend = resolve_script(cfg)
    if cfg.executor == "local":
        problem = shared_device_problem(cfg.workers, cfg.devices, *_backend_here(backend)) if (
            cfg.workers > 1) else ""
        if not problem and len(cfg.devices) > 1 and any(d.startswith("cuda:") for d in cfg.devices):
            from backends.hardware import nvidia_gpu_names
            problem = gpu_models_problem(cfg.devices, nvidia_gpu_names())
        if problem:
            raise FatalError(problem)
    try:
        lock = AgentLock(cfg.repo / LOCK_NAME).acquire()
    except LockHeld as e:
        raise FatalError(str(e)) from None
    try:
        return _open(cfg, git, results, inflight, proposer, status, log, script, backend, lock, confined)
    except BaseException:
        lock.release()
        raise


def _open(cfg, git, results, inflight, proposer, status, log, script, backend, lock, confined) -> Session:
    _kill_leftover_trainer(lock.previous, cfg.kill_grace, log)
    dirty = _foreign_changes(cfg, git, script)
    if dirty:
        more = f" and {len(dirty) - 8} more" if len(dirty) > 8 else ""
        raise FatalError(f"uncommitted changes in tracked files: {', '.join(dirty[:8])}{more}; commit or stash "
                         f"them first (the agent commits and reverts {script} and touches nothing else)")
    if not git.is_tracked(script):
        raise FatalError(f"{script} is not tracked by git: commit it first (git add {script} && git commit)")
    proposer.connect()

    try:
        results.ensure()
        all_rows = results.load()
    except OSError as e:
        raise FatalError(f"cannot use the results file {cfg.results}: {e}") from None
    if results.repaired:
        log(f"{cfg.results.name}: the last line was incomplete (interrupted write) and was removed", "warning")
    rows = rows_for_tag(all_rows, cfg.tag)

    ws = Workspace(git, script, cfg.branch, cfg.runs_dir, log, proposer.redact)
    resume, recovered = None, False
    try:
        if git.current_branch() == cfg.branch:
            resume, recovered = recover_interrupted(ws, rows, inflight, log), True
        if rows and not git.branch_exists(cfg.branch):
            raise FatalError(f"{cfg.results.name} already has {len(rows)} rows for tag {cfg.tag!r} but "
                             f"branch {cfg.branch} does not exist: use a new --tag or another --results file")
        saved = ws.restore_committed()
        if saved:
            log(f"{script} had uncommitted changes: saved them to {saved} and restored the committed version "
                f"(commit your edits first if they should be the baseline)", "warning")
        created = git.checkout_branch(cfg.branch)
        if not recovered:
            resume = recover_interrupted(ws, rows, inflight, log)
        ws.sync()
    except GitError as e:
        raise FatalError(str(e)) from None
    log(f"{'created' if created else 'on'} branch {cfg.branch} at {git.head(short=True)}", "info")
    requeue = requeue_in_flight(cfg, rows, resume, log)
    if cfg.scope == "hparams":
        try:
            find_hparams((cfg.repo / script).read_text(encoding="utf-8"))
        except ScriptError as e:
            raise FatalError(f"{script}: {e}") from None
    hardware, backend = _detect_hardware(cfg, backend)
    t0 = time.perf_counter()
    integrity = Integrity(cfg.repo, cfg.protected, ws, results, cfg.runs_dir, proposer.redact,
                          site=not confined).take()
    log(f"integrity snapshot ({time.perf_counter() - t0:.2f}s): {integrity.describe()}; a run that changes them is "
        f"a crash", "info")
    return Session(script, lock, ws, integrity, rows, resume, requeue, _last_crash(cfg, rows, proposer.redact),
                   hardware, backend)


def _backend_here(backend: str | None) -> tuple:
    """(the backend the runs use, whether this is Apple Silicon); the backend is detected when --script chose the
    script, None when it cannot be told."""
    try:
        from backends.hardware import detect_backend, is_apple_silicon
        return backend or detect_backend(), is_apple_silicon()
    except Exception:  # BackendUnavailable, or no backends package: shared_device_problem has nothing to say
        return backend, False


def resolve_script(cfg: AgentConfig) -> tuple:
    """(the training script relative to the repository, the detected backend or None)."""
    script, backend = cfg.script, None
    if not script:
        try:
            import backends
            backend = backends.detect_backend()
            script = backends.training_script_for(backend)
        except ImportError:
            raise FatalError("cannot detect the backend (the backends package is not importable): pass "
                             "--script train.py or --script train_mlx.py") from None
        except Exception as e:  # BackendUnavailable carries a one-line message
            raise FatalError(str(e)) from None
    path = Path(script)
    path = path if path.is_absolute() else cfg.repo / path
    if not path.is_file():
        raise FatalError(f"training script {script} not found in {cfg.repo}")
    try:
        rel = path.resolve().relative_to(cfg.repo).as_posix()
    except ValueError:
        raise FatalError(f"training script {script} is outside the repository {cfg.repo}") from None
    if any(rel == p or rel.startswith(p.rstrip("/") + "/") for p in cfg.protected):
        raise FatalError(f"{rel} is a protected file and cannot be the training script")
    return rel, backend


def recover_interrupted(ws: Workspace, rows: list, inflight: InFlight, log) -> Trial | None:
    """Repair what a kill -9 left (see tui.trial). Returns the trial to continue, if any."""
    marker = inflight.load()
    n = experiment_of(ws.git.head_subject())
    if n is None or any(r.exp == n for r in rows):  # not an experiment, or one with a result: never reverted
        inflight.drop()
        return None
    sha = ws.git.head()
    if marker is not None and marker.exp == n and marker.commit == sha and marker.values:
        log(f"exp{n} was interrupted during its confirmation runs: continuing it ({len(marker.values)} "
            f"run{'s' if len(marker.values) != 1 else ''} done, no new LLM call)", "warning")
        return marker
    ws.git.revert_experiment(sha, ws.script, f"exp{n}: revert (interrupted)")
    inflight.drop()
    log(f"exp{n} was interrupted before its result was recorded: reverted {ws.script} (commit {sha[:7]}); it runs "
        f"again", "warning")
    return None


def requeue_in_flight(cfg: AgentConfig, rows: list, resume: Trial | None, log) -> list:
    """Several slots: the experiments a killed agent had in flight beside the branch (tui.trial), to run on with the
    runs they have. A marker whose experiment has rows is stale; with a single slot they are not resumed (dropped:
    their numbers are taken again by new experiments)."""
    out = []
    for marker in InFlight.each(cfg.runs_dir, cfg.tag):
        trial = marker.load()
        if resume is not None and trial is not None and trial.exp == resume.exp:
            continue  # the one that was moving the branch: resumed from the plain marker
        if trial is None or any(r.exp == trial.exp for r in rows) or cfg.workers == 1:
            if trial is not None and cfg.workers == 1 and not any(r.exp == trial.exp for r in rows):
                log(f"exp{trial.exp} was in flight with several workers: not resumed with one (start with the same "
                    f"--workers to resume it); its number is used again", "warning")
            marker.drop()
            continue
        out.append(trial)
    if out:
        listed = ", ".join(f"exp{t.exp} ({len(t.values)} run{'s' if len(t.values) != 1 else ''} done)" for t in out)
        log(f"{len(out)} experiment{'s' if len(out) > 1 else ''} in flight when the agent was killed: re-queued "
            f"{listed}, no new LLM call", "warning")
    return out


def _rel(cfg: AgentConfig, path: Path) -> str | None:
    try:
        return Path(path).resolve().relative_to(cfg.repo).as_posix()
    except ValueError:
        return None


def _foreign_changes(cfg: AgentConfig, git: GitRepo, script: str) -> list:
    """Dirty tracked files other than the ones the agent owns (script, results, status, lock, runs/)."""
    own = {script, LOCK_NAME, _rel(cfg, cfg.results), _rel(cfg, cfg.status_file)}
    runs = _rel(cfg, cfg.runs_dir)
    return [f for f in git.dirty_tracked_files()
            if f not in own and not (runs and (f + "/").startswith(runs + "/"))]


def _kill_leftover_trainer(previous: dict, grace: float, log) -> None:
    """A killed agent may have left its training process groups running (training_pids with several slots): end
    them before training again."""
    leftovers = dict([(previous.get("training_pid"), previous.get("training_create_time")),
                      *(tuple(p) for p in previous.get("training_pids") or [])])
    for pid, created in leftovers.items():
        if pid:
            _kill_leftover(pid, created, grace, log)


def _kill_leftover(pid, created, grace: float, log) -> None:
    try:
        import psutil
        proc = psutil.Process(int(pid))
        if created and abs(proc.create_time() - float(created)) > 1.0:
            return  # the pid was reused by an unrelated process
    except Exception:
        return
    kill_process_group(int(pid), grace)
    log(f"killed the training run (pid {pid}) left behind by an agent that did not exit cleanly", "warning")


def _last_crash(cfg: AgentConfig, rows: list, redact) -> tuple | None:
    crashes: list[Row] = [r for r in rows if r.status == "crash"]
    if not crashes:
        return None
    r = crashes[-1]
    log_path = cfg.runs_dir / f"exp{r.exp}.log"
    tail = list(parse_output(log_path.read_bytes()).tail) if log_path.is_file() else []
    return r.exp, redact(crash_text(r.exp, r.description, r.notes, tail))


def _detect_hardware(cfg: AgentConfig, backend: str | None) -> tuple:
    """Hardware facts for the prompt. Detection takes seconds (it imports torch, and on a CPU the first call measures
    the GEMM peak). It runs before any training on purpose: measured next to a training run, the cached peak would be
    too low for every later MFU, and the training run would be slowed too."""
    if cfg.hardware is not None:
        return dict(cfg.hardware), backend
    try:
        import backends
        hardware = backends.get_hardware_info().to_dict()
        return hardware, backend or backends.detect_backend()
    except Exception:
        return {}, backend
