"""The autonomous research loop: ask the LLM for an edit, commit it, train, keep or revert, record, repeat.

    startup (tui.startup) -> [continue an interrupted confirmation] -> [noise floor due?] ->
    loop: exp0 = the baseline, then for each experiment:
        propose (tui.proposer) -> commit (tui.workspace) -> run(s) through the executor (tui.executor) ->
        judge -> keep or revert -> record the rows (tui.results) -> guards (too many skips or crashes in a row)

Threading: run() blocks; the dashboard calls it in a worker thread, headless on the main thread. The commands
pause(), resume(), stop(), abort() and skip_current() may be called from any thread (tui.controls). Every event
reaches the listeners on the loop's thread (tui.events).

What makes kill -9 recoverable at any point is the order of one trial and its in-flight marker (tui.trial). Stop
finishes the experiment, confirmation runs included; abort and fatal errors revert it (no row: it runs again). The
orchestrator decides what runs and what a result means; how a run is carried out is the executor's business.

With --workers N > 1 the loop is tui.slots.SlotLoop (several experiments in flight, candidates beside the branch);
startup, the run itself (_announce_run, _spec, _finish_run), recording (_record, _append), the noise-floor rows and
shutdown are the ones here, shared by both loops.
"""

import dataclasses
import errno
import os
import time
import traceback
from dataclasses import dataclass

from tui.config import AgentConfig
from tui.controls import Controls, FatalError, SkipExperiment, StopRequested
from tui.decision import DEFAULT_SEED, latest_measurement, make_keep_rule
from tui.devices import plan_slots
from tui.events import ExperimentInfo, ExperimentResult, ListenerGroup, State
from tui.executor import ExecutorError, RunSpec, make_executor, run_env
from tui.git_repo import GitError, GitMoved, GitRepo
from tui.llm import Interrupted, Usage, format_cost
from tui.lock import process_create_time
from tui.prompt import PromptContext
from tui.proposer import Proposer
from tui.results import ResultsFile, Summary, group_experiments, summarize
from tui.slots import SlotLoop
from tui.startup import Session, open_session
from tui.trial import InFlight, Trial, crash_text, judge, make_row

RECENT_CRASH_ROWS = 5  # the last crash's output is shown to the LLM while it is among the latest rows
DISK_RETRY_SECONDS = 5.0  # results.tsv on a full disk: how often the append is tried again


@dataclass
class NoisePlan:
    """More noise-floor runs of the best commit: run i of them is run number first + i with seed base + first + i."""
    trial: Trial  # the best commit's runs in this measurement
    commit: str  # as its rows show it (7 characters)
    first: int
    done: int  # runs of this measurement recorded before
    total: int  # runs the measurement will have
    base: int
    what: str  # "noise floor" | "re-measuring the noise floor"

    exp = property(lambda self: self.trial.exp)
    state = property(lambda self: State.BASELINE if self.trial.exp == 0 else State.TRAINING)

    def run(self, i: int) -> tuple:
        """(run number, seed, label) of run i."""
        return (self.first + i, self.base + self.first + i,
                f"{self.what} run {self.done + i + 1}/{self.total}")


@dataclass
class RunSummary:
    ok: bool  # False: a fatal error ended the loop
    reason: str
    totals: Summary  # the tag's results
    usage: Usage  # this session's LLM calls
    experiments: int  # experiments finished in this session (rows written), skips included
    aborted: bool = False
    skipped: int = 0  # of those, skips: no experiment ran (nothing trained)


class _Status:
    """The loop's state line, shared with the proposer (which reports retries)."""

    def __init__(self, events, redact):
        self.events, self.redact = events, redact
        self.state, self.message = State.INITIALIZING, ""

    def set(self, state: State, message: str = "") -> None:
        self.state, self.message = state, self.redact(message)
        self.events.emit("on_state", state, self.message)


class Orchestrator:
    def __init__(self, config: AgentConfig, listeners=(), provider=None, keep_rule=None, executor=None):
        self.cfg = config.resolved()
        self.events = ListenerGroup(listeners)
        self.controls = Controls()
        self.status = _Status(self.events, lambda text: self.proposer.redact(text))
        self.proposer = Proposer(self.cfg, self.controls, self.status, self._log, provider,
                                 on_call=self._refresh_stats)
        self.keep_rule = keep_rule or make_keep_rule(self.cfg.keep_rule, noise_runs=self.cfg.noise_runs,
                                                     confirm_runs=self.cfg.confirm_runs, plateau=self.cfg.plateau)
        self.executor = executor or make_executor(self.cfg)
        self.git = GitRepo(self.cfg.repo)
        self.results = ResultsFile(self.cfg.results)
        self.inflight = InFlight(self.cfg.runs_dir, self.cfg.tag)
        self.session: Session | None = None
        self.rows: list = []  # results rows of this tag
        self._handle = None  # the run in progress
        self._committed: Trial | None = None  # an experiment commit without its rows yet (reverted on abort)
        self._skips_in_a_row = self._crashes_in_a_row = self._session_rows = self._session_skips = 0
        self._fatal: str | None = None  # a run left what cannot be repaired (tui.integrity.Repair.fatal)
        self._last_note = ""
        self._lock_held = False
        self.slots = SlotLoop(self) if self.cfg.workers > 1 else None
        self._device_env = plan_slots(1, self.cfg.devices)[0].env  # one slot: --devices cuda:3 still pins the run

    # -- commands (any thread) and what the screen reads ------------------------------------------------------

    def pause(self) -> None:
        """Pause before the next experiment (the current one finishes)."""
        self.controls.pause()

    def resume(self) -> None:
        self.controls.resume()

    def stop(self) -> None:
        """Finish the current training run, record it, then stop. While thinking, stop at once (nothing to lose)."""
        self.controls.stop()

    def abort(self) -> None:
        """Kill the current training now, revert its commit (no row: it runs again next time) and stop."""
        self.controls.abort()
        self._cancel_run("abort")

    def skip_current(self, slot: int | None = None) -> None:
        """Kill the current training (or drop the pending LLM call) now, record a skip row, revert, continue.
        With several slots: the run of `slot` (every run when None); the LLM call goes on."""
        if self.slots is not None:
            self.slots.skip(slot)
            return
        self.controls.skip()
        self._cancel_run("skip")

    def _cancel_run(self, reason: str) -> None:
        if self.slots is not None:
            self.slots.cancel_all(reason)
        handle = self._handle
        if handle is not None:
            handle.cancel(reason)

    paused = property(lambda self: self.controls.pause_flag.is_set())
    holds_lock = property(lambda self: self._lock_held)  # this agent owns the repository
    training_pid = property(lambda self: getattr(self._handle, "pid", None))
    state = property(lambda self: self.status.state)
    hardware = property(lambda self: self.session.hardware if self.session else {})
    backend = property(lambda self: self.session.backend if self.session else None)
    script = property(lambda self: self.session.script if self.session else "")
    last_prompt = property(lambda self: self.proposer.last_prompt)
    usage = property(lambda self: self.proposer.usage)
    redact = property(lambda self: self.proposer.redact)

    # -- reporting ------------------------------------------------------------------------------------------------

    def _log(self, message: str, level: str = "info") -> None:
        self.events.emit("on_log", level, self.redact(message))

    def _refresh_stats(self) -> None:
        self.events.emit("on_stats", summarize(self.rows), dataclasses.replace(self.usage),
                         dict(self.keep_rule.stats_extra(self.rows)))

    def _announce(self) -> None:
        """Say in the log when the keep rule's status note appears (e.g. a plateau was reached)."""
        note = self.keep_rule.status_note(self.rows)
        if note and not self._last_note:
            self._log(note, "warning")
        self._last_note = note

    # -- the loop ---------------------------------------------------------------------------------------------------

    def run(self) -> RunSummary:
        ok, reason = True, ""
        try:
            self._startup()
            reason = self.slots.run() if self.slots is not None else self._loop()
        except StopRequested:
            reason = "stopped on request"
        except FatalError as e:
            ok, reason = False, str(e)
            self._log(reason, "error")
        except GitMoved as e:  # somebody else changed the repository: touch nothing more
            ok, reason = False, str(e)
            self._committed = None
            self._log(reason, "error")
        except Exception as e:  # a bug of ours: say where, keep the repository consistent, stop
            ok, reason = False, f"unexpected error: {type(e).__name__}: {e}"
            self._log(reason + "\n" + traceback.format_exc(limit=8), "error")
        finally:
            self._shutdown(ok, reason)
        return RunSummary(ok, self.redact(reason), summarize(self.rows), dataclasses.replace(self.usage),
                          self._session_rows, aborted=self.controls.abort_flag.is_set(), skipped=self._session_skips)

    def _loop(self) -> str:
        """One experiment at a time; returns why it ended."""
        if self.session.resume is not None:  # a confirmation cut short by kill -9: finish it first
            trial, self.session.resume = self.session.resume, None
            self._committed = trial
            self._judge_and_record(trial, None, "", None)
            self._after_experiment()
        if not self.controls.stop_flag.is_set():
            self._noise_due_at_start()
        while True:
            if self.controls.stop_flag.is_set():
                return "stopped on request"
            n = summarize(self.rows).next_exp
            if n >= self.cfg.max_experiments:
                return self._max_reason()
            if self.controls.pause_flag.is_set():
                self.status.set(State.PAUSED, "paused: resume to continue")
                self.controls.wait_while_paused()
                continue
            self._baseline() if n == 0 else self._experiment(n)
            self._after_experiment()
            self._check_guards()

    def _max_reason(self) -> str:
        """--max bounds the experiment numbers, skips included: the rows, refs and commits are numbered by it, and a
        flaky LLM cannot stretch a night without end. The reason says how many of them really ran."""
        s = summarize(self.rows)
        skipped = f", {s.skipped} skipped (no experiment ran: see their notes)" if s.skipped else ""
        return (f"reached --max {self.cfg.max_experiments} (exp0..exp{self.cfg.max_experiments - 1}: {s.runs} "
                f"experiment{'' if s.runs == 1 else 's'} with a result{skipped})")

    def _startup(self) -> None:
        try:
            self.executor.prepare(self._log)
        except ExecutorError as e:
            raise FatalError(str(e)) from None
        self.session = open_session(self.cfg, self.git, self.results, self.inflight, self.proposer, self.status,
                                    self._log, confined=self.executor.confined)
        self.rows = self.session.rows
        self._lock_held = True
        self._refresh_stats()
        s = summarize(self.rows)
        if s.next_exp > 0:
            best = f"{s.best_val_bpb:.6f} (exp{s.best_exp})" if s.best_val_bpb is not None else "none yet"
            self._log(f"resuming at exp{s.next_exp}: {s.runs} experiment{'' if s.runs == 1 else 's'} so far "
                      f"({s.kept} kept, {s.discarded} "
                      f"discarded, {s.crashed} crashed, {s.skipped} skipped), best val_bpb {best}")
            note = self.keep_rule.noise_summary(self.rows)
            if note:
                self._log(note)

    def _after_experiment(self) -> None:
        self._refresh_stats()
        self._announce()

    def _check_guards(self) -> None:
        cfg = self.cfg
        if self._fatal:
            raise FatalError(self._fatal)
        diagnosis = self.proposer.diagnosis()
        if diagnosis:
            raise FatalError(diagnosis)
        if cfg.max_consecutive_skips and self._skips_in_a_row >= cfg.max_consecutive_skips:
            raise FatalError(f"{self._skips_in_a_row} experiments in a row were skipped (see the log): stopping; "
                             f"check the LLM provider, then start again to resume")
        if cfg.max_consecutive_crashes and self._crashes_in_a_row >= cfg.max_consecutive_crashes:
            raise FatalError(f"{self._crashes_in_a_row} experiments in a row crashed: stopping; look at "
                             f"{cfg.runs_dir}/ for the logs, fix the setup, then start again to resume")

    # -- one experiment -------------------------------------------------------------------------------------------

    def _baseline(self) -> None:
        trial = Trial(0, self.git.head(), "baseline", f"the unmodified {self.script}", baseline=True)
        self._judge_and_record(trial, *self._start(trial, 0, self.cfg.seed, State.BASELINE,
                                                   f"exp0: training the unmodified {self.script}"))

    def _experiment(self, n: int) -> None:
        self.controls.skip_flag.clear()  # a skip pressed between experiments must not hit the next one
        ws = self.session.workspace
        note = self.keep_rule.status_note(self.rows)
        self.status.set(State.THINKING, f"exp{n}: asking {self.proposer.describe()}" + (f" ({note})" if note else ""))
        usage = Usage()
        try:
            proposal, new_source = self.proposer.propose(self._prompt_context(n, ws.path.read_text("utf-8")), usage)
        except SkipExperiment as s:
            self._record_skip(n, s.reason, usage)
            if s.outage:
                self._outage_pause()
            return
        except Interrupted:
            if self.controls.cancel_reason() == "skip":
                self.controls.skip_flag.clear()
                self._record_skip(n, "skipped by the user while the LLM was thinking", usage, by_user=True)
            return
        # a model could echo anything, even a key it saw somewhere: nothing it wrote is stored unredacted
        desc, reasoning = self.redact(proposal.description), self.redact(proposal.reasoning)
        self.status.set(State.COMMITTING, f"exp{n}: {desc}")
        try:
            parent = ws.head
            sha = ws.commit_script(new_source, f"exp{n}: {desc}")
            trial = Trial(n, sha, desc, reasoning, parent=parent)
            self._committed = trial
            self.git.keep_ref(self.cfg.tag, n, sha)
        except SkipExperiment as s:  # the edit holds a secret: nothing was written
            self._record_skip(n, s.reason, usage)
            return
        except GitMoved:
            raise
        except (GitError, OSError) as e:
            try:
                self.git.restore_file("HEAD", self.script)
            except GitError:
                pass
            raise FatalError(f"could not commit exp{n}: {e}") from None
        self._save(trial)
        self._judge_and_record(trial, *self._start(trial, 0, self.cfg.seed, State.TRAINING, f"exp{n}: {desc}",
                                                   usage=usage))

    def _start(self, trial: Trial, run: int, seed, state: State, message: str, kind: str = "", reasoning=None,
               usage: Usage | None = None) -> tuple:
        """Announce and do one run of the trial's commit; its row (and value) join the trial.
        Returns (status, notes, outcome): status None when the run gave a usable val_bpb."""
        log = self._announce_run(trial, run, seed, state, message, reasoning)
        return self._finish_run(trial, run, seed, self._train(trial, run, seed, log), kind, usage)

    def _announce_run(self, trial: Trial, run: int, seed, state: State, message: str, reasoning=None,
                      slot: int = 0):
        """Tell the listeners a run of the trial starts; returns its log path."""
        log = self.cfg.runs_dir / (f"exp{trial.exp}.log" if run == 0 else f"exp{trial.exp}-run{run}.log")
        self.events.emit("on_experiment_start", ExperimentInfo(
            trial.exp, trial.description, trial.reasoning if reasoning is None else reasoning, trial.commit[:7],
            baseline=trial.baseline, run=run, seed=seed, log_path=str(log), slot=slot))
        self.status.set(state, message)
        return log

    def _finish_run(self, trial: Trial, run: int, seed, outcome, kind: str = "", usage: Usage | None = None,
                    worker: str = "", touched: list | None = None) -> tuple:
        """Judge a finished run and add its row to the trial: (status, notes, outcome) as _start. touched: what the
        integrity check (_check_runs) found, when the caller ran it for several runs at once."""
        self.status.set(State.EVALUATING, f"exp{trial.exp}: evaluating")
        self._redact_run(outcome)
        if touched is None:
            touched = self._check_runs(trial.commit, _run_label(trial, run))
        status, notes = judge(outcome, touched, self.cfg.time_budget, self.cfg.budget_allowance)
        if status is None and outcome.returncode not in (0, None):
            self._log(f"the trainer exited with code {outcome.returncode} after printing its summary", "warning")
        if status == "skip":
            self.controls.skip_flag.clear()
        # provisional status "discard" so the row carries the run's figures; the verdict sets the real one
        row = make_row(trial.exp, status or "discard", trial.description, trial.commit, outcome, notes,
                       usage or Usage(), dataset=self.cfg.dataset, tag=self.cfg.tag, run=run, seed=seed, kind=kind,
                       parent=trial.parent, worker=worker)
        trial.add(row.redacted(self.redact), outcome.final.val_bpb if status is None else None, seed)
        return status, notes, outcome

    def _redact_run(self, outcome) -> None:
        """Before anything is judged, committed or sent: every known secret out of the run's log and crash tail."""
        if outcome.log_path is not None:
            self.redact.redact_file(outcome.log_path)
        outcome.tail = [self.redact(line) for line in outcome.tail]

    def _check_runs(self, tree: str, label: str) -> list:
        """Before anything is judged: repair what the runs that just ended changed (tui.integrity; `tree`: the commit
        the work tree must hold, `label`: which runs, for the quarantine and the log). Returns what was changed (the
        runs are then crashes)."""
        repair = self.session.integrity.verify_and_repair(tree, label)  # GitMoved: the user moved the branch
        if repair.touched:
            saved = f"; what it left is saved in {repair.quarantine}" if repair.quarantine else ""
            self._log(f"{label}: the run changed what it may not change (a crash): "
                      f"{'; '.join(repair.details)}{saved}", "warning")
        for line in repair.warnings:
            self._log(f"{label}: {line}", "warning")
        self._fatal = self._fatal or repair.fatal
        return repair.touched

    def _spec(self, trial: Trial, run: int, seed, log, slot_env=None) -> RunSpec:
        cfg = self.cfg
        run_dir = cfg.runs_dir / "work" / (f"exp{trial.exp}" + (f"-run{run}" if run else ""))
        return RunSpec(commit=trial.commit, script=self.script, seed=seed, budget=cfg.time_budget,
                       dataset=cfg.dataset, deadline=cfg.timeout, log_path=log, run_dir=run_dir, python=cfg.python,
                       env=run_env(secrets=self.proposer.secrets, AUTORESEARCH_DATASET=cfg.dataset,
                                   AUTORESEARCH_TIME_BUDGET=f"{cfg.time_budget:g}", AUTORESEARCH_RUN_DIR=run_dir,
                                   # no bytecode: a pyc next to a protected module is then always planted
                                   PYTHONDONTWRITEBYTECODE="1", **(slot_env or {})),
                       label=f"exp{trial.exp}" + (f" r{run}" if run else ""))

    def _train(self, trial: Trial, run: int, seed, log):
        spec = self._spec(trial, run, seed, log, self._device_env)
        try:
            handle = self.executor.submit(spec)
        except ExecutorError as e:
            raise FatalError(str(e)) from None
        self._handle = handle
        reason = self.controls.cancel_reason(include_stop=False)  # a command that came while it started
        if reason:
            handle.cancel(reason)
        created = process_create_time(handle.pid)
        self.session.lock.update(training_pid=handle.pid, training_create_time=created)
        self.events.emit("on_training_process", handle.pid)
        try:
            return handle.wait(on_line=self._on_line)
        finally:
            self._handle = None
            self.session.lock.update(training_pid=None, training_create_time=None)
            self.events.emit("on_training_process", None)

    def _on_line(self, pl) -> None:
        if pl.step is not None:
            self.events.emit("on_step", pl.step)
        else:
            self.events.emit("on_output", self.redact(pl.text))

    def _judge_and_record(self, trial: Trial, status, notes: str, last) -> None:
        """After a run (status, notes, outcome from _start): ask the keep rule while the runs are usable, training
        again while it says rerun; then keep or revert and record. A trial resumed after kill -9 arrives with its
        finished runs and no new one (last None)."""
        n, verdict = trial.exp, None
        while status is None:
            verdict = self.keep_rule.decide(trial.candidate(), self.rows)
            if verdict.action != "rerun":
                status, notes = verdict.action, verdict.reason
                break
            self._save(trial)
            run = len(trial.rows)
            self._log(f"exp{n}: {verdict.reason}")
            most = getattr(self.keep_rule, "confirm_runs", None)
            status, notes, last = self._start(trial, run, verdict.seed, State.TRAINING,
                                              f"exp{n}: confirmation run {run}" + (f"/{most}" if most else "")
                                              + f" (seed {verdict.seed})", reasoning="")
        if status == "abort":
            self.inflight.drop()
            if not trial.baseline:
                self._revert(trial, "aborted")
            self._log(f"exp{n} aborted: {'reverted, ' if not trial.baseline else ''}no result recorded; it runs "
                      f"again next time", "warning")
            return
        if status != "keep" and not trial.baseline:
            self._revert(trial, status)
        if self._record(trial, status, notes, last, verdict):
            self._measure_noise(self.keep_rule.noise_runs_needed(self.rows))

    def _record(self, trial: Trial, status: str, notes: str, last, verdict, slot: int = 0,
                marker: InFlight | None = None) -> bool:
        """Record a decided experiment (its git side is done): every run's row, then the markers go. Returns True
        when it became the reference whose noise floor is to be measured."""
        self._committed = None
        self._tally(trial, status, notes, last)
        noise = bool(verdict is not None and verdict.noise and status == "keep")
        rows = trial.finish(status, self.redact(notes), noise)
        for row in rows:
            self._append(row)
        self.inflight.drop()  # only now: a kill -9 before this point still finds the runs (or the rows)
        if marker is not None:
            marker.drop()
        self._session_rows += 1
        value = trial.candidate().mean if status in ("keep", "discard") and trial.values else None
        self.events.emit("on_experiment_end", ExperimentResult(
            trial.exp, status, trial.description, value, trial.commit[:7], notes, last.final if last else None,
            last.seconds if last else 0.0, run=len(rows) - 1, row=rows[-1], slot=slot))
        return noise

    def _tally(self, trial: Trial, status: str, notes: str, last) -> None:
        if status == "crash":
            self._crashes_in_a_row += 1
            tail = last.tail if last is not None else []
            self.session.last_crash = (trial.exp, crash_text(trial.exp, trial.description, notes, tail))
            if trial.baseline:
                where = f"; see {last.log_path}" if last is not None else ""
                self._log("the unmodified baseline crashed: the setup may be broken (data prepared? enough "
                          f"memory?){where}", "error")
        elif status in ("keep", "discard"):
            self._crashes_in_a_row = 0
        if status != "skip":
            self._skips_in_a_row = 0

    def _append(self, row) -> None:
        """Record a row. On a full disk, wait for space (trying again every DISK_RETRY_SECONDS) rather than lose the
        experiment; an abort, or a stop given while it waits, gives up (the experiment runs again on the next start).
        A stop given before still wants this row recorded: it waits on."""
        fixed = self.results.restore()  # changed since our last write (a leftover process, a user): ours again
        if fixed:
            self._log(f"{fixed} before recording {row.label}", "warning")
        path, warned, stop_before = self.cfg.results, False, self.controls.stop_flag.is_set()
        while True:
            size = path.stat().st_size if path.exists() else 0
            try:
                self.results.append(row)
                break
            except OSError as e:
                if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                try:
                    os.truncate(path, size)  # a torn line must not stay: the next try writes the whole row
                except OSError:
                    pass
            if not warned:
                warned = True
                self._log(f"cannot write {path.name}: the disk is full; free some space, the agent tries again "
                          f"every {DISK_RETRY_SECONDS:.0f}s (stop to give up)", "warning")
            retry = time.monotonic() + DISK_RETRY_SECONDS
            while time.monotonic() < retry:
                if self.controls.abort_flag.is_set() or (self.controls.stop_flag.is_set() and not stop_before):
                    raise FatalError(f"exp{row.exp} not recorded: {path} is on a full disk; free some space and "
                                     f"start again (exp{row.exp} runs again)")
                time.sleep(0.2)
        if warned:
            self._log(f"{path.name}: space is back, exp{row.exp} recorded")
        self.rows.append(row)

    def _save(self, trial: Trial) -> None:
        try:
            self.inflight.save(trial)
        except OSError as e:
            self._log(f"could not save the state of exp{trial.exp} ({e}); a restart would redo it", "warning")

    def _revert(self, trial: Trial, why: str) -> None:
        try:
            self.session.workspace.revert(trial.commit, f"exp{trial.exp}: revert ({why})")
        except GitMoved:
            raise
        except GitError as e:
            raise FatalError(f"could not revert exp{trial.exp} ({trial.commit[:7]}): {e}; the next start will "
                             f"retry") from None
        self._committed = None

    def _record_skip(self, n: int, reason: str, usage: Usage, by_user: bool = False) -> None:
        if not by_user:
            self._skips_in_a_row += 1
        row = make_row(n, "skip", "(no experiment)", "", None, reason, usage, dataset=self.cfg.dataset,
                       tag=self.cfg.tag).redacted(self.redact)
        self._append(row)
        self._session_rows += 1
        self._session_skips += 1
        self.events.emit("on_experiment_end", ExperimentResult(n, "skip", row.description, notes=row.notes, row=row))

    def _outage_pause(self) -> None:
        if self.cfg.outage_pause <= 0 or self.controls.stop_flag.is_set():
            return
        self.controls.resume_now.clear()
        self.status.set(State.PAUSED, f"LLM unavailable: next experiment in {self.cfg.outage_pause:.0f}s "
                                      f"(resume to retry now)")
        self.controls.wait(self.cfg.outage_pause, until_resume=True)
        self.controls.resume_now.clear()
        self.controls.skip_flag.clear()

    def _prompt_context(self, n: int, source: str, running=()) -> PromptContext:
        s = summarize(self.rows)
        crash = self.session.last_crash
        if crash and crash[0] not in [r.exp for r in self.rows[-RECENT_CRASH_ROWS:]]:
            crash = None
        return PromptContext(exp=n, scope=self.cfg.scope, script_name=self.script, source=source, history=self.rows,
                             history_len=self.cfg.history_len, best_val_bpb=s.best_val_bpb, best_exp=s.best_exp,
                             hardware=self.hardware, backend=self.backend, dataset=self.cfg.dataset,
                             time_budget=self.cfg.time_budget, last_crash=crash[1] if crash else None,
                             notes=list(self.keep_rule.prompt_notes(self.rows)), running=list(running))

    # -- the noise floor: more runs of the reference commit, each recorded as it finishes ---------------------------

    def _noise_due_at_start(self, measure=None) -> None:
        """--remeasure-noise, or a measurement that is due (cut short by a restart, or missing on an older tag).
        measure(count, fresh): how the runs are done (_measure_noise, one after the other, by default)."""
        measure = measure or self._measure_noise
        s = summarize(self.rows)
        if self.cfg.remeasure_noise and s.best_exp is not None:
            measure(max(self.cfg.noise_runs, 2), fresh=True)
            return
        if self.cfg.remeasure_noise:
            self._log("--remeasure-noise: nothing to re-measure yet (no kept experiment); the baseline measures the "
                      "noise floor")
        todo = self.keep_rule.noise_runs_needed(self.rows)
        if todo:
            measure(todo)

    def _measure_noise(self, count: int, fresh: bool = False) -> None:
        """Run the reference commit (the best kept experiment, which must be HEAD) `count` more times with new seeds,
        appending one "noise" row per run. A crash, skip or abort ends the measurement early (what ran is kept)."""
        plan = self._noise_plan(count, fresh)
        if plan is None:
            return
        for i in range(count):
            if self.controls.stop_flag.is_set():
                self._log(f"noise floor: stopped after {plan.done + i}/{plan.total} runs; the next start completes it")
                return
            run, seed, label = plan.run(i)
            result = self._start(plan.trial, run, seed, plan.state, f"exp{plan.exp}: {label} (seed {seed})",
                                 kind="noise", reasoning=label)
            if not self._noise_row(plan, i, *result, last=(i == count - 1)):
                break
        summary = self.keep_rule.noise_summary(self.rows)
        if summary:
            self._log(summary)

    def _noise_plan(self, count: int, fresh: bool = False):
        """What `count` more noise-floor runs of the best commit are (NoisePlan), or None when there is nothing to
        measure on."""
        s = summarize(self.rows)
        exp = next((e for e in group_experiments(self.rows) if e.exp == s.best_exp), None)
        if count <= 0 or exp is None or exp.exp is None:
            return None
        head = self.git.head()
        if exp.commit != "-" and not head.startswith(exp.commit):
            self._log(f"noise floor: HEAD {head[:7]} is not the best commit {exp.commit} (exp{exp.exp}); "
                      f"not measuring", "warning")
            return None
        n = exp.exp
        first = max(r.run for r in exp.rows) + 1
        done = 0  # runs of this measurement so far (for "run j/N")
        block = latest_measurement(self.rows)
        if block and not fresh and self.rows[block[0]].exp == n:
            done = sum(1 for r in self.rows[block[0]:block[1]] if r.status == "keep")
        base = self.cfg.seed if self.cfg.seed is not None else DEFAULT_SEED
        plan = NoisePlan(Trial(n, head, exp.first.description, baseline=(n == 0)), exp.commit, first, done,
                         count if fresh else done + count, base,
                         "re-measuring the noise floor" if fresh else "noise floor")
        if fresh:
            self._log(f"{plan.what} on exp{n} ({exp.commit}): {count} runs with seeds {base + first}.."
                      f"{base + first + count - 1}")
        return plan

    def _noise_row(self, plan, i: int, status, notes: str, outcome, last: bool, slot: int = 0) -> bool:
        """Record noise run i of the plan (finished: status, notes, outcome as _start); False when it did not give a
        value (the measurement keeps what it has)."""
        n, desc = plan.exp, plan.trial.description
        if status is not None:
            self._log(f"noise floor run {plan.done + i + 1}/{plan.total} of exp{n} did not finish ({notes}); the "
                      f"measurement keeps the {plan.done + i} runs it has", "warning")
            if status == "crash":
                self.session.last_crash = (n, crash_text(n, desc, notes, outcome.tail))
            return False
        run, seed, label = plan.run(i)
        row = plan.trial.rows[-1]
        row.status, row.notes, row.commit = "keep", f"{label} (seed {seed})", plan.commit
        if last:
            row.notes = f"{row.notes}; {self.keep_rule.noise_summary(self.rows + [row])}"
        self._append(row)
        self.events.emit("on_experiment_end", ExperimentResult(
            n, "keep", desc, row.val_bpb, plan.commit, row.notes, outcome.final, outcome.seconds, run=run,
            row=row, slot=slot))
        self._refresh_stats()
        return True

    # -- shutdown -------------------------------------------------------------------------------------------------

    def _shutdown(self, ok: bool, reason: str) -> None:
        self.status.set(State.STOPPING, reason)
        handle = self._handle
        if handle is not None:
            handle.cancel("abort")
        if self.slots is not None:
            self.slots.shutdown()
        trial, self._committed = self._committed, None
        if trial is not None and not trial.baseline and self.session is not None:
            try:
                self.session.workspace.revert(trial.commit, f"exp{trial.exp}: revert (agent stopped)")
                self.inflight.drop()
                self._log(f"exp{trial.exp} did not finish: reverted {self.script}", "warning")
            except GitError as e:
                self._log(f"could not revert exp{trial.exp}: {e}; the next start will retry", "error")
        if self._lock_held:
            self.session.lock.release()
            self._lock_held = False
        try:
            self._refresh_stats()
        except Exception:
            pass
        if self.usage.calls:
            self._log(f"LLM usage: {self.usage.calls} calls, {self.usage.tokens} tokens, cost "
                      f"{format_cost(self.usage.cost_usd)}")
        self.status.set(State.STOPPED if ok else State.FAILED, reason)


def _run_label(trial: Trial, run: int) -> str:
    return f"exp{trial.exp}" + (f"-run{run}" if run else "")
