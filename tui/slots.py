"""Several experiments at once (--workers N or --devices LIST, N > 1): the loop that keeps every slot busy.

    a slot is free -> a run waiting? start the first by priority: a confirmation or a re-applied candidate, then a
                      noise-floor run, then a new candidate
    the LLM        -> is asked for the next candidate whenever none is waiting (one call at a time; the prompt lists
                      the experiments in flight), also while every slot is busy: the next candidate is ready when a
                      slot frees, instead of the slot idling for an LLM call. It is committed beside the branch on top
                      of the best of the time it was proposed.
    exp0 (the baseline) runs first and alone; its noise-floor runs then start side by side, and no new candidate is
    proposed until the reference is measured (the keep rule decides with that noise floor).

Git. Each candidate is a commit on refs/autoresearch/<tag>/exp<N> whose parent is the best commit when it was
proposed (tui.workspace.commit_candidate); the branch autoresearch/<tag>, and the work tree with it, always holds the
best and moves only on a keep (Workspace.advance, under the same expect() check as every write). A run gets the
tracked files of its own commit from git (tui.executor, snapshot), never the work tree. A candidate that looks
promising (the keep rule says keep or rerun) while its parent is no longer the best is re-applied on the best
(three-way merge of the script, tui.git_repo.reapply) and measured again there, since its figures were measured
against an older parent: its earlier runs stay as rows of kind "superseded" (not scored). One that no longer applies
is discarded with that reason.

Threads. The loop's thread owns the state: git, results, the keep rule, the listeners. Each run is waited for on a
thread of its own and the LLM is asked on one; they only post to the loop's queue, and whatever they emit reaches the
listeners on the loop's thread (_Events). Stop: no new candidate, no more noise-floor runs; the runs in flight finish,
their confirmation runs included. Abort and fatal errors cancel every run; nothing of them is recorded and their
markers go (they run again as new experiments). kill -9: a marker per experiment in flight (tui.trial).
"""

import queue
import threading
import time
from dataclasses import dataclass

from tui.controls import FatalError, SkipExperiment
from tui.devices import plan_slots
from tui.events import SlotView, State
from tui.executor import ExecutorError
from tui.git_repo import GitError, GitMoved
from tui.llm import Interrupted, Usage
from tui.lock import process_create_time
from tui.results import SUPERSEDED, summarize
from tui.trial import InFlight, Trial

MORE_RUNS, NOISE, NEW = 0, 1, 2  # Job.priority: a promising candidate's runs, the reference's noise floor, a new one
POLL_SECONDS = 0.2  # how often the loop looks at the commands while nothing is posted
VIEW_EVERY_PCT = 1.0  # on_slots while a run trains: at most once per this much progress of one slot


@dataclass(eq=False)
class Job:
    """One run to start: run `run` of the trial's commit."""
    trial: Trial
    run: int
    seed: int | None
    message: str
    state: State = State.TRAINING
    kind: str = ""
    reasoning: str | None = None
    usage: Usage | None = None
    noise: tuple | None = None  # (NoisePlan, i): noise-floor run i of the plan
    priority: int = 2  # which waiting run takes a free slot first (lowest): MORE_RUNS, NOISE, NEW


class Slot:
    def __init__(self, plan):
        self.plan = plan
        self.job: Job | None = None
        self.handle = None
        self.step = None  # the run's last progress line
        self.shown_pct = -VIEW_EVERY_PCT

    id = property(lambda self: self.plan.id)

    def view(self) -> SlotView:
        j, s = self.job, self.step
        if j is None:
            return SlotView(self.id, self.plan.worker)
        return SlotView(self.id, self.plan.worker, j.trial.exp, j.run, j.trial.description,
                        s.pct_done if s else 0.0, s.tok_per_sec if s else None, "training")


class _Events:
    """The listeners, reached on the loop's thread only: from another thread an event waits in the loop's queue."""

    def __init__(self, group, post):
        self.group, self.post = group, post
        self.owner = threading.get_ident()
        self.listeners = group.listeners

    def add(self, listener) -> None:
        self.group.add(listener)

    def emit(self, method: str, *args) -> None:
        if threading.get_ident() == self.owner:
            self.group.emit(method, *args)
        else:
            self.post(("emit", method, args))


class SlotLoop:
    def __init__(self, orch):
        self.o = orch
        self.slots = [Slot(p) for p in plan_slots(orch.cfg.workers, orch.cfg.devices)]
        self.queue: queue.Queue = queue.Queue()
        self.waiting: list = []  # Jobs by priority, then oldest first (_queue)
        self.trials: dict = {}  # exp -> Trial: candidates in flight, not recorded yet
        self.noise_left = 0  # noise-floor runs waiting or training
        self.thinking: int | None = None  # the experiment the LLM is being asked for
        self.next_exp = 0
        self.quiet_until = 0.0  # after an LLM outage: no new candidate before this (time.monotonic)
        self._paused_shown = False

    # -- commands (any thread) ------------------------------------------------------------------------------------

    def skip(self, slot: int | None) -> None:
        """Kill the run of `slot` (every run when None): a skip row, the loop goes on."""
        self.cancel_all("skip", slot)

    def cancel_all(self, reason: str, slot: int | None = None) -> None:
        for s in self.slots:
            handle = s.handle
            if handle is not None and slot in (None, s.id):
                handle.cancel(reason)

    # -- the loop ---------------------------------------------------------------------------------------------------

    def run(self) -> str:
        o = self.o
        o.events = _Events(o.events, self.queue.put)
        o.status.events = o.events
        self.next_exp = summarize(o.rows).next_exp
        resumed = ([o.session.resume] if o.session.resume else []) + list(o.session.requeue)
        o.session.resume, o.session.requeue = None, []
        for trial in resumed:
            self._resume(trial)
        if not o.controls.stop_flag.is_set():
            o._noise_due_at_start(self._queue_noise)
        self._views()
        while True:
            self._fill()
            if self._idle():
                if o.controls.stop_flag.is_set():
                    return "stopped on request"
                if self.next_exp >= o.cfg.max_experiments:
                    return o._max_reason()
                if o.controls.pause_flag.is_set() and not self._paused_shown:
                    self._paused_shown = True
                    o.status.set(State.PAUSED, "paused: resume to continue")
            try:
                item = self.queue.get(timeout=POLL_SECONDS)
            except queue.Empty:
                continue
            self._handle(item)

    def _idle(self) -> bool:
        return self.thinking is None and not any(s.job for s in self.slots) and not self._startable()

    def _startable(self) -> list:
        """The waiting runs that may start now, by priority. A stop drops the runs it does not finish (noise-floor
        runs, new candidates: they run again next time); a pause holds new candidates back."""
        c = self.o.controls
        if c.abort_flag.is_set():
            return []
        if c.stop_flag.is_set() and any(j.priority >= NOISE for j in self.waiting):
            dropped = [j for j in self.waiting if j.priority >= NOISE]
            self.waiting = [j for j in self.waiting if j.priority < NOISE]
            self.noise_left = sum(1 for s in self.slots if s.job and s.job.noise)
            if any(j.noise for j in dropped):
                self.o._log("noise floor: stopped before all its runs; the next start completes it")
            for j in dropped:
                if not j.noise:
                    self.trials.pop(j.trial.exp, None)
                    InFlight(self.o.cfg.runs_dir, self.o.cfg.tag, j.trial.exp).drop()
        if c.pause_flag.is_set():
            return [j for j in self.waiting if j.priority == MORE_RUNS]
        return self.waiting

    def _fill(self) -> None:
        for slot in self.slots:
            ready = self._startable() if slot.job is None else []
            if ready:
                job = ready[0]
                self.waiting.remove(job)
                self._start(slot, job)
        if self.thinking is None and self._may_propose():
            self._propose()

    def _may_propose(self) -> bool:
        c, now = self.o.controls, time.monotonic()
        if c.stop_flag.is_set() or c.pause_flag.is_set() or self.next_exp >= self.o.cfg.max_experiments:
            return False
        if now < self.quiet_until and not c.resume_now.is_set():
            return False
        c.resume_now.clear()
        self._paused_shown = False
        # the reference first: the baseline and its noise floor are what every candidate is judged against
        return self.noise_left == 0 and 0 not in self.trials and not any(j.priority >= NOISE for j in self.waiting)

    def _handle(self, item) -> None:
        kind = item[0]
        if kind == "emit":
            self.o.events.group.emit(item[1], *item[2])
        elif kind == "line":
            self._on_line(*item[1:])
        elif kind == "done":
            self._on_done([item])
        elif kind == "proposal":
            self._on_proposal(*item[1:])
        elif kind == "error":  # a bug in a run's thread: the loop ends as on any bug of ours
            raise item[2]

    # -- candidates -----------------------------------------------------------------------------------------------

    def _propose(self) -> None:
        o, n = self.o, self.next_exp
        self.next_exp += 1
        if n == 0:
            trial = Trial(0, o.git.head(), "baseline", f"the unmodified {o.script}", baseline=True)
            self.trials[0] = trial
            self._queue(Job(trial, 0, o.cfg.seed, f"exp0: training the unmodified {o.script}", State.BASELINE))
            return
        self.thinking = n
        note = o.keep_rule.status_note(o.rows)
        o.status.set(State.THINKING, f"exp{n}: asking {o.proposer.describe()}" + (f" ({note})" if note else ""))
        ctx = o._prompt_context(n, o.session.workspace.path.read_text("utf-8"),
                                [f"exp{t.exp}: {t.description}" for t in self.trials.values() if not t.baseline])
        usage = Usage()

        def ask():
            try:
                self.queue.put(("proposal", n, usage, o.proposer.propose(ctx, usage), None))
            except BaseException as e:  # SkipExperiment, Interrupted, or a bug: the loop's thread decides
                self.queue.put(("proposal", n, usage, None, e))
        threading.Thread(target=ask, name=f"propose-exp{n}", daemon=True).start()

    def _on_proposal(self, n: int, usage: Usage, result, error) -> None:
        o = self.o
        self.thinking = None
        if isinstance(error, SkipExperiment):
            o._record_skip(n, error.reason, usage)
            if error.outage and o.cfg.outage_pause > 0:
                self.quiet_until = time.monotonic() + o.cfg.outage_pause
                o.controls.resume_now.clear()
                o.status.set(State.PAUSED, f"LLM unavailable: next experiment in {o.cfg.outage_pause:.0f}s "
                                           f"(resume to retry now)")
            o._check_guards()
            return
        if isinstance(error, Interrupted):  # stop or abort while it thought: the number is free again
            if self.next_exp == n + 1:
                self.next_exp = n
            return
        if error is not None:
            raise error
        proposal, source = result
        desc, reasoning = o.redact(proposal.description), o.redact(proposal.reasoning)
        o.status.set(State.COMMITTING, f"exp{n}: {desc}")
        ws = o.session.workspace
        parent = ws.head
        try:
            sha = ws.commit_candidate(parent, source, f"exp{n}: {desc}")
            o.git.keep_ref(o.cfg.tag, n, sha)
        except SkipExperiment as s:  # the edit holds a secret: nothing was written
            o._record_skip(n, s.reason, usage)
            return
        except GitError as e:
            raise FatalError(f"could not commit exp{n}: {e}") from None
        trial = Trial(n, sha, desc, reasoning, parent=parent)
        self.trials[n] = trial
        self._save(trial)
        self._queue(Job(trial, 0, o.cfg.seed, f"exp{n}: {desc}", usage=usage))

    def _resume(self, trial: Trial) -> None:
        """An experiment a killed agent had in flight: judged with the runs it has, or its run started again."""
        self.trials[trial.exp] = trial
        self.next_exp = max(self.next_exp, trial.exp + 1)
        if trial.values:
            self._judge(trial, None, "", None, 0)
        else:
            self._queue(Job(trial, len(trial.rows), self.o.cfg.seed, f"exp{trial.exp}: {trial.description} (resumed)"))

    # -- runs -----------------------------------------------------------------------------------------------------

    def _start(self, slot: Slot, job: Job) -> None:
        o, t = self.o, job.trial
        log = o._announce_run(t, job.run, job.seed, job.state, f"[slot {slot.id}] {job.message}", job.reasoning,
                              slot=slot.id)
        try:
            handle = o.executor.submit(o._spec(t, job.run, job.seed, log, slot.plan.env))
        except ExecutorError as e:
            raise FatalError(str(e)) from None
        slot.job, slot.handle, slot.step, slot.shown_pct = job, handle, None, -VIEW_EVERY_PCT
        if o.controls.abort_flag.is_set():  # an abort that came while it started
            handle.cancel("abort")
        self._pids()

        def wait():
            try:
                outcome = handle.wait(on_line=lambda pl: self.queue.put(("line", slot.id, pl)))
            except BaseException as e:
                self.queue.put(("error", slot.id, e))
                return
            self.queue.put(("done", slot.id, outcome))
        threading.Thread(target=wait, name=f"slot{slot.id}-exp{t.exp}", daemon=True).start()
        self._views()

    def _on_line(self, slot_id: int, pl) -> None:
        slot = self.slots[slot_id - 1]
        if pl.step is None:
            self.o.events.emit("on_slot_output", slot_id, self.o.redact(pl.text))
            return
        slot.step = pl.step
        self.o.events.emit("on_slot_step", slot_id, pl.step)
        if pl.step.pct_done >= slot.shown_pct + VIEW_EVERY_PCT:
            slot.shown_pct = pl.step.pct_done
            self._views()

    def _on_done(self, done: list) -> None:
        """Runs that ended ("done" items): the ones that ended meanwhile join them, so that one integrity check (a
        scan of site-packages: the loop's largest cost per run) covers them all; with runs side by side a change can
        not be told apart by run anyway. Then each is judged. What else was posted is handled in its order (a run's
        lines come before its "done")."""
        while True:
            try:
                item = self.queue.get_nowait()
            except queue.Empty:
                break
            if item[0] == "done":
                done.append(item)
            else:
                self._handle(item)
        finished = []
        for _, slot_id, outcome in done:
            slot = self.slots[slot_id - 1]
            finished.append((slot, slot.job, outcome))
            slot.job, slot.handle = None, None
        self._pids()
        self._views()
        label = "+".join(f"exp{j.trial.exp}" + (f"-run{j.run}" if j.run else "") for _, j, _ in finished)
        touched = self.o._check_runs(self.o.session.workspace.head, label)
        for slot, job, outcome in finished:
            self._judge_run(slot, job, outcome, touched)

    def _judge_run(self, slot: Slot, job: Job, outcome, touched: list) -> None:
        o, slot_id, t = self.o, slot.id, job.trial
        status, notes, outcome = o._finish_run(t, job.run, job.seed, outcome, job.kind, job.usage, slot.plan.worker,
                                               touched=touched)
        if job.noise:
            plan, i = job.noise
            self.noise_left -= 1
            o._noise_row(plan, i, status, notes, outcome, last=self.noise_left == 0, slot=slot_id)
            if self.noise_left == 0:
                summary = o.keep_rule.noise_summary(o.rows)
                if summary:
                    o._log(summary)
            return
        self._judge(t, status, notes, outcome, slot_id)

    def _judge(self, trial: Trial, status, notes: str, last, slot_id: int) -> None:
        """After one run of a candidate: another run (a confirmation, or a first run on the new best), or the
        verdict: git, then the rows (Orchestrator._record)."""
        o, ws, n = self.o, self.o.session.workspace, trial.exp
        verdict = None
        if status is None:
            verdict = o.keep_rule.decide(trial.candidate(), o.rows)
            if verdict.action in ("keep", "rerun") and not trial.baseline and ws.head not in (trial.parent,
                                                                                               trial.commit):
                if self._reapply(trial):
                    return
                best = summarize(o.rows).best_exp
                status, notes = "discard", (f"no longer applies on the new best {ws.head[:7]} (exp{best}): its "
                                            f"change conflicts with what was kept since ({verdict.reason})")
            elif verdict.action == "rerun":
                self._save(trial)
                o._log(f"exp{n}: {verdict.reason}")
                most = getattr(o.keep_rule, "confirm_runs", None)
                run = len(trial.rows)
                self._queue(Job(
                    trial, run, verdict.seed, f"exp{n}: confirmation run {run}" + (f"/{most}" if most else "")
                    + f" (seed {verdict.seed})", reasoning="", priority=MORE_RUNS))
                return
            else:
                status, notes = verdict.action, verdict.reason
        self.trials.pop(n, None)
        if status == "abort":
            InFlight(o.cfg.runs_dir, o.cfg.tag, n).drop()
            o._log(f"exp{n} aborted: no result recorded; it runs again next time", "warning")
            return
        if status == "keep" and not trial.baseline and ws.head != trial.commit:
            o._save(trial)  # the plain marker: this experiment moves the branch (tui.trial)
            try:
                ws.advance(trial.commit)
            except GitMoved:
                raise
            except GitError as e:
                raise FatalError(f"could not move {o.cfg.branch} to exp{n} ({trial.commit[:7]}): {e}; the next "
                                 f"start will retry") from None
        if o._record(trial, status, notes, last, verdict, slot=slot_id,
                     marker=InFlight(o.cfg.runs_dir, o.cfg.tag, n)):
            self._queue_noise(o.keep_rule.noise_runs_needed(o.rows))
        o._after_experiment()
        o._check_guards()

    def _reapply(self, trial: Trial) -> bool:
        """Carry a promising candidate over to the best (see the module docstring); False when it does not apply."""
        o, ws, n = self.o, self.o.session.workspace, trial.exp
        best, old = ws.head, trial.parent
        try:
            new = o.git.reapply(trial.commit, best, o.script, f"exp{n}: {trial.description} (re-applied on "
                                                              f"{best[:7]})")
        except GitError as e:
            o._log(f"exp{n}: cannot re-apply it on {best[:7]}: {e}", "warning")
            return False
        if new is None:
            return False
        for row in trial.rows:
            row.kind = SUPERSEDED
        trial.commit, trial.parent, trial.values, trial.seeds = new, best, [], []
        o.git.keep_ref(o.cfg.tag, n, new)
        self._save(trial)
        o._log(f"exp{n} looks better, but it was measured on {old[:7]} and the best is now {best[:7]}: re-applied on "
               f"it as {new[:7]}, measuring it there")
        run = len(trial.rows)
        self._queue(Job(trial, run, o.cfg.seed, f"exp{n}: re-applied on {best[:7]}, run {run}", reasoning="",
                        priority=MORE_RUNS))
        return True

    def _queue_noise(self, count: int, fresh: bool = False) -> None:
        """Noise-floor runs of the reference, side by side (Orchestrator._noise_plan, _noise_row)."""
        plan = self.o._noise_plan(count, fresh)
        if plan is None:
            return
        for i in range(count):
            run, seed, label = plan.run(i)
            self._queue(Job(plan.trial, run, seed, f"exp{plan.exp}: {label} (seed {seed})", plan.state,
                            kind="noise", reasoning=label, noise=(plan, i), priority=NOISE))
        self.noise_left = count

    def _queue(self, job: Job) -> None:
        at = next((i for i, j in enumerate(self.waiting) if j.priority > job.priority), len(self.waiting))
        self.waiting.insert(at, job)

    def _save(self, trial: Trial) -> None:
        try:
            InFlight(self.o.cfg.runs_dir, self.o.cfg.tag, trial.exp).save(trial)
        except OSError as e:
            self.o._log(f"could not save the state of exp{trial.exp} ({e}); a restart would redo it", "warning")

    # -- what the screens and the next agent see ------------------------------------------------------------------

    def _views(self) -> None:
        self.o.events.emit("on_slots", [s.view() for s in self.slots])

    def _pids(self) -> None:
        """The lock names every trainer, so a start after kill -9 ends them all (tui.startup)."""
        pids = [s.handle.pid for s in self.slots if s.handle is not None and s.handle.pid]
        self.o.session.lock.update(training_pid=pids[0] if pids else None,
                                   training_create_time=process_create_time(pids[0]) if pids else None,
                                   training_pids=[[p, process_create_time(p)] for p in pids])
        self.o.events.emit("on_training_process", pids[0] if pids else None)

    def shutdown(self) -> None:
        """The loop has ended: cancel what still runs and wait for it to die; what was in flight is not recorded
        and runs again (its markers go)."""
        self.cancel_all("abort")
        deadline = time.monotonic() + self.o.cfg.kill_grace + 10.0
        while any(s.job for s in self.slots) and time.monotonic() < deadline:
            try:
                item = self.queue.get(timeout=POLL_SECONDS)
            except queue.Empty:
                continue
            if item[0] in ("done", "error"):
                self.slots[item[1] - 1].job = self.slots[item[1] - 1].handle = None
        for n in self.trials:
            InFlight(self.o.cfg.runs_dir, self.o.cfg.tag, n).drop()
        if self.trials:
            self.o._log(f"not finished: {', '.join(f'exp{n}' for n in sorted(self.trials))}; nothing recorded, "
                        f"they run again as new experiments", "warning")
        self.trials = {}
        self._views()
