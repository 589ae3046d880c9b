"""The autonomous research loop: ask the LLM for an edit, commit it, train, keep or revert, record, repeat.

Threading: run() blocks; the dashboard calls it in a worker thread, headless on the main thread. The commands
pause(), resume(), stop(), abort() and skip_current() may be called from any thread: they only set flags that the loop
polls (at least every 0.1 s while training or waiting for the LLM). Every event reaches the listeners on the loop's
thread (see tui.events).

Order inside one experiment (what makes kill -9 at any point recoverable):
    think -> write script -> git commit "expN: ..." -> train -> decide -> revert unless kept -> append the row.
On the next start, a HEAD commit "expN: ..." without a keep row is an interrupted experiment: it is reverted and
experiment N runs again.

Several runs of one commit (tui.decision): the keep rule may ask for confirmation runs with other seeds; the rows of
all runs are appended together once the verdict is in. While a verdict is pending, runs/pending-<tag>.json holds the
finished runs (written atomically after each one), so a kill -9 mid-confirmation loses only the run in progress: the
next start finds HEAD on that experiment's commit with a matching pending file, keeps the commit and continues the
confirmation with the next seed (no new LLM call). Stop finishes the experiment, confirmation runs included; abort and
fatal errors revert it as before (the pending file goes too). Noise-floor runs (the baseline's, --remeasure-noise)
are rows of their own, appended one by one; a measurement cut short is topped up on the next start.
"""

import dataclasses
import json
import os
import re
import shutil
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from tui.config import AgentConfig
from tui.credentials import CredentialError, Redactor, is_local_url, is_secret_name, resolve_key
from tui.decision import DEFAULT_SEED, Candidate, Verdict, latest_measurement, make_keep_rule
from tui.events import ExperimentInfo, ExperimentResult, ListenerGroup, State, Stats
from tui.git_repo import GitError, GitRepo
from tui.llm import (Interrupted, LLMError, RetryPolicy, Usage, call_with_retry, format_cost, make_provider,
                     run_interruptibly)
from tui.lock import LOCK_NAME, AgentLock, LockHeld
from tui.parser import parse_output
from tui.prompt import (AnswerError, PromptContext, ScriptError, apply_proposal, corrective_prompt, find_hparams,
                        parse_answer, system_prompt, user_prompt)
from tui.protected import ProtectedFiles
from tui.results import ResultsFile, exp_number, group_experiments, rows_for_tag, summarize
from tui.status_file import write_json_atomic
from tui.training_run import TrainingRun, kill_process_group

EXP_SUBJECT_RE = re.compile(r"^exp(\d+):")
CRASH_TAIL_LINES = 40
RECENT_CRASH_ROWS = 5  # the last crash's output is shown to the LLM while it is among the latest rows


class FatalError(RuntimeError):
    """Stops the loop; the message is one line that says what is wrong and what to do."""


class StopRequested(Exception):
    """A stop/abort command arrived before the loop started."""


class SkipExperiment(Exception):
    def __init__(self, reason: str, outage: bool = False):
        super().__init__(reason)
        self.reason = reason
        self.outage = outage


@dataclass
class RunSummary:
    ok: bool  # False: a fatal error ended the loop
    reason: str
    stats: Stats
    experiments: int  # experiments finished in this session (rows written)
    aborted: bool = False


@dataclass
class Trial:
    """One experiment's runs of its commit while the keep rule may still want more (saved for a kill -9 resume)."""
    exp: int
    commit: str  # full sha
    description: str
    reasoning: str = ""
    baseline: bool = False
    rows: list = field(default_factory=list)  # one results row per finished run; status and notes set at the end
    values: list = field(default_factory=list)  # val_bpb of each scored run
    seeds: list = field(default_factory=list)

    def candidate(self) -> Candidate:
        return Candidate(self.exp, self.commit, self.description, runs=list(self.values), seeds=list(self.seeds),
                         baseline=self.baseline)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    try:
        shutil.copymode(path, tmp)
    except OSError:
        pass
    os.replace(tmp, path)


class Orchestrator:
    def __init__(self, config: AgentConfig, listeners=(), provider=None, keep_rule=None):
        self.cfg = config.resolved()
        self.events = ListenerGroup(listeners)
        self.provider = provider  # tests and embedders may pass a ready Provider; otherwise built from the config
        self.keep_rule = keep_rule or make_keep_rule(self.cfg.keep_rule, noise_runs=self.cfg.noise_runs,
                                                     confirm_runs=self.cfg.confirm_runs, plateau=self.cfg.plateau)
        self.git = GitRepo(self.cfg.repo)
        self.results = ResultsFile(self.cfg.results)
        self.policy = RetryPolicy(self.cfg.llm_attempts, self.cfg.backoff_base, self.cfg.backoff_cap,
                                  self.cfg.retry_after_cap)
        self.state = State.INITIALIZING
        self.state_message = ""
        self.stats = Stats()
        self.usage = Usage()  # whole session
        self.rows: list = []  # results rows of this tag
        self.script: str = ""
        self.backend: str | None = None
        self.hardware: dict = {}
        self.credential_source = ""
        self.last_prompt = ""  # the latest user prompt sent (for the dashboard's detail view)
        self.redact = Redactor()
        self._secrets: list = []
        self._free = False
        self._lock: AgentLock | None = None
        self._run: TrainingRun | None = None
        self._pending: tuple | None = None  # (exp, sha) of a committed experiment without a row yet
        self._last_crash: tuple | None = None  # (exp, text)
        self._skips_in_a_row = 0
        self._crashes_in_a_row = 0
        self._session_rows = 0
        self._resume: Trial | None = None  # a confirmation cut short by kill -9, continued first
        self._last_note = ""
        self._stop = threading.Event()
        self._abort = threading.Event()
        self._skip = threading.Event()
        self._pause = threading.Event()
        self._resume_now = threading.Event()
        self._wake = threading.Event()

    # -------------------------------------------------------------------------
    # Commands (any thread)
    # -------------------------------------------------------------------------

    def pause(self) -> None:
        """Pause before the next experiment (the current one finishes)."""
        self._pause.set()
        self._wake.set()

    def resume(self) -> None:
        self._pause.clear()
        self._resume_now.set()
        self._wake.set()

    def stop(self) -> None:
        """Finish the current training run, record it, then stop. While thinking, stop at once (nothing to lose)."""
        self._stop.set()
        self._wake.set()

    def abort(self) -> None:
        """Kill the current training now, revert its commit (no row: it runs again next time) and stop."""
        self._abort.set()
        self._stop.set()
        self._wake.set()

    def skip_current(self) -> None:
        """Kill the current training (or drop the pending LLM call) now, record a skip row, revert, continue."""
        self._skip.set()
        self._wake.set()

    @property
    def paused(self) -> bool:
        return self._pause.is_set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    @property
    def holds_lock(self) -> bool:
        """True while this agent owns the repository (its PID lock is taken)."""
        return self._lock is not None

    @property
    def training_pid(self) -> int | None:
        run = self._run
        return run.pid if run else None

    # -------------------------------------------------------------------------
    # Reporting
    # -------------------------------------------------------------------------

    def _set_state(self, state: State, message: str = "") -> None:
        self.state, self.state_message = state, self.redact(message)
        self.events.emit("on_state", state, self.state_message)

    def _log(self, message: str, level: str = "info") -> None:
        self.events.emit("on_log", level, self.redact(message))

    def _refresh_stats(self) -> None:
        s = summarize(self.rows)
        st = self.stats
        st.runs, st.kept, st.discarded, st.crashed, st.skipped = s.runs, s.kept, s.discarded, s.crashed, s.skipped
        st.best_val_bpb, st.best_exp, st.next_exp = s.best_val_bpb, s.best_exp, s.next_exp
        st.llm_calls, st.input_tokens = self.usage.calls, self.usage.input_tokens
        st.output_tokens = self.usage.output_tokens
        st.cost_usd = self.usage.cost_usd
        st.extra = dict(self.keep_rule.stats_extra(self.rows))
        self.events.emit("on_stats", dataclasses.replace(st, extra=dict(st.extra)))

    # -------------------------------------------------------------------------
    # The loop
    # -------------------------------------------------------------------------

    def run(self) -> RunSummary:
        ok, reason = True, ""
        try:
            self._startup()
            if self._resume is not None:  # a confirmation cut short by kill -9: finish it before anything else
                trial, self._resume = self._resume, None
                self._continue_trial(trial)
                self.stats.experiment = None
                self._refresh_stats()
                self._announce()
            if not self._stop.is_set():
                self._startup_noise()
            while True:
                if self._stop.is_set():
                    reason = "stopped on request"
                    break
                n = self.stats.next_exp
                if n >= self.cfg.max_experiments:
                    reason = f"reached --max {self.cfg.max_experiments} (exp0..exp{self.cfg.max_experiments - 1})"
                    break
                if self._pause.is_set():
                    self._paused()
                    continue
                self.stats.experiment = n
                if n == 0:
                    self._baseline()
                else:
                    self._experiment(n)
                self.stats.experiment = None
                self._refresh_stats()
                self._announce()
                self._check_guards()
        except StopRequested:
            reason = "stopped on request"
        except FatalError as e:
            ok, reason = False, str(e)
            self._log(reason, "error")
        except Exception as e:  # a bug of ours: say where, keep the repository consistent, stop
            ok, reason = False, f"unexpected error: {type(e).__name__}: {e}"
            self._log(reason + "\n" + traceback.format_exc(limit=8), "error")
        finally:
            self._shutdown(ok, reason)
        return RunSummary(ok, self.redact(reason), dataclasses.replace(self.stats), self._session_rows,
                          aborted=self._abort.is_set())

    def _paused(self) -> None:
        self._set_state(State.PAUSED, "paused: resume to continue")
        while self._pause.is_set() and not self._stop.is_set():
            self._wake.wait(0.5)
            self._wake.clear()
        self._resume_now.clear()

    def _check_guards(self) -> None:
        cfg = self.cfg
        if cfg.max_consecutive_skips and self._skips_in_a_row >= cfg.max_consecutive_skips:
            raise FatalError(f"{self._skips_in_a_row} experiments in a row were skipped (see the log): stopping; "
                             f"check the LLM provider, then start again to resume")
        if cfg.max_consecutive_crashes and self._crashes_in_a_row >= cfg.max_consecutive_crashes:
            raise FatalError(f"{self._crashes_in_a_row} experiments in a row crashed: stopping; look at "
                             f"{cfg.runs_dir}/ for the logs, fix the setup, then start again to resume")

    # -------------------------------------------------------------------------
    # Startup
    # -------------------------------------------------------------------------

    def _startup(self) -> None:
        cfg = self.cfg
        self._set_state(State.INITIALIZING, f"repository {cfg.repo}, tag {cfg.tag}")
        if not self.git.is_repo():
            raise FatalError(f"{cfg.repo} is not a git repository: run the agent inside your autoresearch checkout")
        if not self.git.has_commits():
            raise FatalError("the repository has no commits yet: commit the training script first")
        self.script = self._resolve_script()
        try:
            self._lock = AgentLock(cfg.repo / LOCK_NAME).acquire()
        except LockHeld as e:
            raise FatalError(str(e)) from None
        self._kill_leftover_trainer(self._lock.previous)

        dirty = self._foreign_changes()
        if dirty:
            more = f" and {len(dirty) - 8} more" if len(dirty) > 8 else ""
            raise FatalError(f"uncommitted changes in tracked files: {', '.join(dirty[:8])}{more}; commit or stash "
                             f"them first (the agent commits and reverts {self.script} and touches nothing else)")
        if not self.git.is_tracked(self.script):
            raise FatalError(f"{self.script} is not tracked by git: commit it first (git add {self.script} && "
                             f"git commit)")
        self._connect_llm()
        self.protected = ProtectedFiles(cfg.repo, cfg.protected).take()

        try:
            self.results.ensure()
            all_rows = self.results.load()
        except OSError as e:
            raise FatalError(f"cannot use the results file {cfg.results}: {e}") from None
        if self.results.repaired:
            self._log(f"{cfg.results.name}: the last line was incomplete (interrupted write) and was removed",
                      "warning")
        self.rows = rows_for_tag(all_rows, cfg.tag)

        try:
            if self.git.current_branch() == cfg.branch:
                self._revert_interrupted()
            if self.rows and not self.git.branch_exists(cfg.branch):
                raise FatalError(f"{cfg.results.name} already has {len(self.rows)} rows for tag {cfg.tag!r} but "
                                 f"branch {cfg.branch} does not exist: use a new --tag or another --results file")
            self._rescue_dirty_script()
            created = self.git.checkout_branch(cfg.branch)
            if not created:
                self._revert_interrupted()
            if self._resume is None:
                self._drop_pending()  # a confirmation that was reverted or recorded: nothing to continue
        except GitError as e:
            raise FatalError(str(e)) from None
        self._log(f"{'created' if created else 'on'} branch {cfg.branch} at {self.git.head(short=True)}")
        if cfg.scope == "hparams":
            try:
                find_hparams((cfg.repo / self.script).read_text(encoding="utf-8"))
            except ScriptError as e:
                raise FatalError(f"{self.script}: {e}") from None

        self._load_last_crash()
        self._detect_hardware()
        self._refresh_stats()
        st = self.stats
        if st.next_exp > 0:
            best = f"{st.best_val_bpb:.6f} (exp{st.best_exp})" if st.best_val_bpb is not None else "none yet"
            self._log(f"resuming at exp{st.next_exp}: {st.runs} experiments so far ({st.kept} kept, {st.discarded} "
                      f"discarded, {st.crashed} crashed, {st.skipped} skipped), best val_bpb {best}")
            note = self.keep_rule.noise_summary(self.rows)
            if note:
                self._log(note)

    def _resolve_script(self) -> str:
        cfg = self.cfg
        script = cfg.script
        if not script:
            try:
                import backends
                self.backend = backends.detect_backend()
                script = backends.training_script_for(self.backend)
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
        return rel

    def _rel(self, path: Path) -> str | None:
        try:
            return Path(path).resolve().relative_to(self.cfg.repo).as_posix()
        except ValueError:
            return None

    def _foreign_changes(self) -> list:
        """Dirty tracked files other than the ones the agent owns (script, results, status, lock, runs/)."""
        own = {self.script, LOCK_NAME, self._rel(self.cfg.results), self._rel(self.cfg.status_file)}
        runs = self._rel(self.cfg.runs_dir)
        return [f for f in self.git.dirty_tracked_files()
                if f not in own and not (runs and (f + "/").startswith(runs + "/"))]

    def _kill_leftover_trainer(self, previous: dict) -> None:
        """A killed agent may have left its training process group running: end it before training again."""
        pid = previous.get("training_pid")
        if not pid:
            return
        try:
            import psutil
            proc = psutil.Process(int(pid))
            created = previous.get("training_create_time")
            if created and abs(proc.create_time() - float(created)) > 1.0:
                return  # the pid was reused by an unrelated process
        except Exception:
            return
        kill_process_group(int(pid), self.cfg.kill_grace)
        self._log(f"killed the training run (pid {pid}) left behind by an agent that did not exit cleanly",
                  "warning")

    def _connect_llm(self) -> None:
        cfg = self.cfg
        env_secrets = [v for k, v in os.environ.items() if is_secret_name(k) and len(v) >= 8]
        if self.provider is None:
            try:
                cred = resolve_key(cfg.provider, cfg.base_url)
            except CredentialError as e:
                raise FatalError(str(e)) from None
            self.credential_source = cred.source
            self._secrets = [cred.key] if cred.key else []
            try:
                self.provider = make_provider(cfg.provider, cfg.model, cred.key, cfg.base_url, cfg.llm_timeout,
                                              cfg.max_tokens)
            except Exception as e:
                raise FatalError(f"cannot set up the {cfg.provider} client: {e}") from None
        self._secrets = list(dict.fromkeys(self._secrets + env_secrets))
        self.redact = Redactor(self._secrets)
        host = cfg.base_url or (os.environ.get("OLLAMA_HOST") or "127.0.0.1:11434" if cfg.provider == "ollama" else "")
        if host and "://" not in host:
            host = "http://" + host
        self._free = cfg.provider in ("ollama", "openai") and is_local_url(host)
        self._set_state(State.INITIALIZING, f"checking the LLM: {self.provider.describe()}")
        try:
            self._with_retry(self.provider.check, cancel_on_stop=True)
        except Interrupted:
            raise StopRequested() from None
        except LLMError as e:
            raise FatalError(self._llm_fatal_message(e, during="check")) from None
        src = f" (key from {self.credential_source})" if self.credential_source else ""
        self._log(f"LLM: {self.provider.describe()}{src}")

    def _llm_fatal_message(self, e: LLMError, during: str) -> str:
        p = self.cfg.provider
        what = self.provider.describe() if self.provider else p
        if e.status in (401, 403) or "authentication" in str(e).lower():
            return (f"LLM authentication failed for {what}: {e}. Check the key with: uv run dashboard.py --check-key "
                    f"--provider {p}; store a new one with --setup-key --provider {p}")
        if e.status == 404:
            return f"LLM {what}: {e}. Check --model (and --base-url)"
        if e.kind == "retryable":
            return f"cannot reach the LLM {what} ({during}): {e}"
        return f"LLM {what} refused the request ({during}): {e}"

    def _revert_interrupted(self) -> None:
        m = EXP_SUBJECT_RE.match(self.git.head_subject())
        if not m or self._resume is not None:
            return
        n = int(m.group(1))
        mine = [r for r in self.rows if exp_number(r.get("exp")) == n]
        if mine and mine[-1].get("status") == "keep":
            return
        sha = self.git.head()
        trial = self._load_pending(n, sha) if not mine else None
        if trial is not None:
            self._resume = trial
            self._log(f"exp{n} was interrupted during its confirmation runs: continuing it ({len(trial.values)} "
                      f"run{'s' if len(trial.values) != 1 else ''} done, no new LLM call)", "warning")
            return
        self.git.revert_experiment(sha, self.script, f"exp{n}: revert (interrupted)")
        self._log(f"exp{n} was interrupted before its result was recorded: reverted {self.script} "
                  f"(commit {sha[:7]}); it runs again", "warning")

    def _rescue_dirty_script(self) -> None:
        if self.script not in self.git.dirty_tracked_files():
            return
        self.cfg.runs_dir.mkdir(parents=True, exist_ok=True)
        p = Path(self.script)
        dest = self.cfg.runs_dir / f"{p.stem}.uncommitted-{time.strftime('%Y%m%d-%H%M%S')}{p.suffix}"
        shutil.copy2(self.cfg.repo / self.script, dest)
        self.git.restore_file("HEAD", self.script)
        self._log(f"{self.script} had uncommitted changes: saved them to {dest} and restored the committed version "
                  f"(commit your edits first if they should be the baseline)", "warning")

    def _load_last_crash(self) -> None:
        crashes = [r for r in self.rows if r.get("status") == "crash"]
        if not crashes:
            return
        r = crashes[-1]
        n = exp_number(r.get("exp"))
        log = self.cfg.runs_dir / f"exp{n}.log"
        tail = []
        if log.is_file():
            tail = list(parse_output(log.read_bytes()).tail)[-CRASH_TAIL_LINES:]
        self._last_crash = (n, self._crash_text(n, r.get("description", ""), r.get("notes", ""), tail))

    def _detect_hardware(self) -> None:
        """Hardware facts for the prompt. Detection takes seconds (it imports torch, and on a CPU the first call
        measures the GEMM peak). It runs before any training on purpose: measured next to a training run, the cached
        peak would be too low for every later MFU, and the training run would be slowed too."""
        if self.cfg.hardware is not None:
            self.hardware = dict(self.cfg.hardware)
            return

        def detect():
            try:
                import backends
                self.hardware = backends.get_hardware_info().to_dict()
                if self.backend is None:
                    self.backend = backends.detect_backend()
            except Exception:
                self.hardware = {}

        detect()

    # -------------------------------------------------------------------------
    # Waiting and the LLM
    # -------------------------------------------------------------------------

    def _cancel_reason(self, include_stop: bool = True) -> str | None:
        if self._abort.is_set():
            return "abort"
        if self._skip.is_set():
            return "skip"
        if include_stop and self._stop.is_set():
            return "stop"
        return None

    def _training_stop_reason(self) -> str | None:
        return self._cancel_reason(include_stop=False)

    def _wait(self, seconds: float, until_resume: bool = False) -> bool:
        """Sleep interruptibly; False when a command asks to give up."""
        end = time.monotonic() + seconds
        while True:
            if self._cancel_reason() or (until_resume and self._resume_now.is_set()):
                return False
            remaining = end - time.monotonic()
            if remaining <= 0:
                return True
            self._wake.wait(min(remaining, 0.5))
            self._wake.clear()

    def _with_retry(self, fn, cancel_on_stop: bool = True):
        state = self.state

        def attempt():
            return run_interruptibly(fn, lambda: self._cancel_reason(cancel_on_stop) is not None,
                                     timeout=self.cfg.llm_timeout)

        def on_retry(n, delay, err):
            self._set_state(State.WAITING, f"LLM {err}: retry {n}/{self.policy.attempts - 1} in {delay:.1f}s")

        def wait(delay):
            ok = self._wait(delay)
            self._set_state(state, self.state_message if self.state == state else "retrying the LLM call")
            return ok

        return call_with_retry(attempt, self.policy, wait, on_retry)

    def _ask(self, system: str, messages: list):
        try:
            return self._with_retry(lambda: self.provider.complete(system, messages))
        except LLMError as e:
            if e.kind == "fatal":
                raise FatalError(self._llm_fatal_message(e, during="experiment")) from None
            if e.kind == "request":
                raise SkipExperiment(f"LLM request rejected: {e}") from None
            raise SkipExperiment(f"LLM unavailable after {self.policy.attempts} attempts: {e}", outage=True) from None

    def _propose(self, ctx: PromptContext, usage: Usage):
        system = system_prompt(ctx.scope, ctx.script_name, ctx.time_budget)
        self.last_prompt = user_prompt(ctx)
        messages = [{"role": "user", "content": self.last_prompt}]
        for attempt in range(2):
            reply = self._ask(system, messages)
            usage.add(reply, self.provider.model, self._free)
            self.usage.add(reply, self.provider.model, self._free)
            try:
                proposal = parse_answer(reply.text, ctx.scope)
                return proposal, apply_proposal(ctx.source, proposal, ctx.scope, ctx.script_name)
            except AnswerError as e:
                if attempt == 1:
                    raise SkipExperiment(f"unusable answer after a corrective retry: {e}") from None
                self._log(f"exp{ctx.exp}: the answer could not be used ({e}); asking once more", "warning")
                messages = messages + [{"role": "assistant", "content": reply.text.strip() or "(empty answer)"},
                                       {"role": "user", "content": corrective_prompt(str(e), ctx.scope)}]
        raise AssertionError("unreachable")

    # -------------------------------------------------------------------------
    # One experiment
    # -------------------------------------------------------------------------

    def _prompt_context(self, n: int, source: str) -> PromptContext:
        s = summarize(self.rows)
        crash = None
        if self._last_crash:
            recent = [exp_number(r.get("exp")) for r in self.rows[-RECENT_CRASH_ROWS:]]
            if self._last_crash[0] in recent:
                crash = self._last_crash[1]
        return PromptContext(exp=n, scope=self.cfg.scope, script_name=self.script, source=source, history=self.rows,
                             history_len=self.cfg.history_len, best_val_bpb=s.best_val_bpb, best_exp=s.best_exp,
                             hardware=self.hardware, backend=self.backend, dataset=self.cfg.dataset,
                             time_budget=self.cfg.time_budget, last_crash=crash,
                             notes=list(self.keep_rule.prompt_notes(self.rows)))

    def _baseline(self) -> None:
        sha = self.git.head()
        info = ExperimentInfo(0, "baseline", f"the unmodified {self.script}", sha[:7], baseline=True,
                              log_path=str(self.cfg.runs_dir / "exp0.log"))
        self.events.emit("on_experiment_start", info)
        self._set_state(State.BASELINE, f"exp0: training the unmodified {self.script}")
        outcome = self._train(0)
        self._conclude(0, sha, "baseline", info.reasoning, outcome, Usage(), baseline=True)

    def _experiment(self, n: int) -> None:
        self._skip.clear()  # a skip pressed between experiments must not hit the next one
        script_path = self.cfg.repo / self.script
        note = self.keep_rule.status_note(self.rows)
        self._set_state(State.THINKING, f"exp{n}: asking {self.provider.describe()}" + (f" ({note})" if note else ""))
        source = script_path.read_text(encoding="utf-8")
        usage = Usage()
        try:
            proposal, new_source = self._propose(self._prompt_context(n, source), usage)
        except SkipExperiment as s:
            self._record_skip(n, s.reason, usage)
            if s.outage:
                self._outage_pause()
            return
        except Interrupted:
            if self._cancel_reason() == "skip":
                self._skip.clear()
                self._record_skip(n, "skipped by the user while the LLM was thinking", usage, by_user=True)
            return
        # a model could echo anything, even a key it saw somewhere: nothing it wrote is stored unredacted
        desc, reasoning = self.redact(proposal.description), self.redact(proposal.reasoning)
        self._set_state(State.COMMITTING, f"exp{n}: {desc}")
        try:
            _write_atomic(script_path, new_source)
            sha = self.git.commit_file(self.script, f"exp{n}: {desc}")
            self._pending = (n, sha)
            self.git.keep_ref(self.cfg.tag, n, sha)
        except (GitError, OSError) as e:
            try:
                self.git.restore_file("HEAD", self.script)
            except GitError:
                pass
            raise FatalError(f"could not commit exp{n}: {e}") from None
        info = ExperimentInfo(n, desc, reasoning, sha[:7], log_path=str(self.cfg.runs_dir / f"exp{n}.log"))
        self.events.emit("on_experiment_start", info)
        self._set_state(State.TRAINING, f"exp{n}: {desc}")
        outcome = self._train(n)
        self._conclude(n, sha, desc, reasoning, outcome, usage)

    def _train(self, n: int, run: int = 0, seed: int | None = None):
        cfg = self.cfg
        cfg.runs_dir.mkdir(parents=True, exist_ok=True)
        log_path = cfg.runs_dir / (f"exp{n}.log" if run == 0 else f"exp{n}-run{run}.log")
        seed = cfg.seed if seed is None else seed
        tr = TrainingRun(self.script, cfg.repo, log_path, deadline=cfg.timeout, python=cfg.python, seed=seed,
                         secrets=self._secrets, kill_grace=cfg.kill_grace, on_line=self._on_line,
                         should_stop=self._training_stop_reason)
        try:
            pid = tr.start()
        except OSError as e:
            raise FatalError(f"cannot start {cfg.python} {self.script}: {e}") from None
        self._run = tr
        try:
            import psutil
            created = psutil.Process(pid).create_time()
        except Exception:
            created = None
        self._lock.update(training_pid=pid, training_create_time=created)
        self.events.emit("on_training_process", pid)
        try:
            return tr.wait()
        except BaseException:  # a forced exit (second signal) must not leave the trainer running
            tr.kill(force=True)
            raise
        finally:
            self._run = None
            self._lock.update(training_pid=None, training_create_time=None)
            self.events.emit("on_training_process", None)

    def _on_line(self, pl) -> None:
        if pl.step is not None:
            self.events.emit("on_step", pl.step)
        else:
            self.events.emit("on_output", self.redact(pl.text))

    def _conclude(self, n, sha, desc, reasoning, outcome, usage, baseline=False) -> None:
        trial = Trial(n, sha, desc, reasoning, baseline=baseline)
        self._continue_trial(trial, outcome, self.cfg.seed, usage)

    def _continue_trial(self, trial: Trial, outcome=None, seed=None, usage: Usage | None = None) -> None:
        """Record the run just finished (if any), then ask the keep rule, training again while it says rerun."""
        n, status, notes, verdict, last = trial.exp, None, "", None, outcome
        self._pending = None if trial.baseline else (n, trial.commit)
        self.stats.experiment = n
        while True:
            if outcome is not None:
                self._set_state(State.EVALUATING, f"exp{n}: evaluating")
                run = len(trial.rows)
                status, notes = self._judge(outcome)
                # provisional status "discard" so the row carries the run's figures; the final one is set at the end
                trial.rows.append(self._row(n, status or "discard", trial.description, trial.commit, outcome, notes,
                                            usage or Usage(), run=run, seed=seed))
                if status is not None:  # a crash, skip or abort (also during a confirmation run) ends the experiment
                    break
                trial.values.append(outcome.final.val_bpb)
                trial.seeds.append(seed)
            verdict = self.keep_rule.decide(trial.candidate(), self.rows)
            if verdict.action != "rerun":
                status, notes = verdict.action, verdict.reason
                break
            self._save_pending(trial)
            seed, run, usage = verdict.seed, len(trial.rows), Usage()
            self._log(f"exp{n}: {verdict.reason}")
            info = ExperimentInfo(n, trial.description, "", trial.commit[:7], baseline=trial.baseline, run=run,
                                  seed=seed, log_path=str(self.cfg.runs_dir / f"exp{n}-run{run}.log"))
            self.events.emit("on_experiment_start", info)
            most = getattr(self.keep_rule, "confirm_runs", None)
            self._set_state(State.TRAINING, f"exp{n}: confirmation run {run}" + (f"/{most}" if most else "")
                            + f" (seed {seed})")
            outcome = last = self._train(n, run=run, seed=seed)
        self._finish_trial(trial, status, notes, verdict, last)

    def _finish_trial(self, trial: Trial, status: str, notes: str, verdict: Verdict | None, last) -> None:
        n, sha, desc, baseline = trial.exp, trial.commit, trial.description, trial.baseline
        if status == "abort":
            self._drop_pending()
            if not baseline:
                self._revert(n, sha, "aborted")
            self._log(f"exp{n} aborted: {'reverted, ' if not baseline else ''}no result recorded; it runs again "
                      f"next time", "warning")
            return
        if status != "keep" and not baseline:
            self._revert(n, sha, status)
        if status == "crash":
            self._crashes_in_a_row += 1
            tail = last.tail[-CRASH_TAIL_LINES:] if last is not None else []
            self._last_crash = (n, self._crash_text(n, desc, notes, tail))
            if baseline:
                where = f"; see {last.log_path}" if last is not None else ""
                self._log("the unmodified baseline crashed: the setup may be broken (data prepared? enough "
                          f"memory?){where}", "error")
        elif status in ("keep", "discard"):
            self._crashes_in_a_row = 0
        if status != "skip":
            self._skips_in_a_row = 0
        noise = bool(verdict is not None and verdict.noise and status == "keep")
        for row in trial.rows:
            row["status"], row["notes"] = status, self.redact(notes)
            row["kind"] = "noise" if noise else ("confirm" if int(row["run"]) > 0 else "")
            if status not in ("keep", "discard"):
                row["val_bpb"], row["memory_gb"] = "0.000000", "0.0"
            self.results.append(row)
            self.rows.append(row)
        self._drop_pending()  # only now: a kill -9 before this point still finds the runs (or the rows) on restart
        self._pending = None
        self._session_rows += 1
        value = trial.candidate().mean if status in ("keep", "discard") and trial.values else None
        result = ExperimentResult(n, status, desc, value, sha[:7], notes, last.final if last else None,
                                  last.seconds if last else 0.0, run=len(trial.rows) - 1, row=self.rows[-1])
        self.events.emit("on_experiment_end", result)
        if noise:
            self._measure_noise(self.keep_rule.noise_runs_needed(self.rows))

    # -------------------------------------------------------------------------
    # Noise floor
    # -------------------------------------------------------------------------

    def _startup_noise(self) -> None:
        """--remeasure-noise, or a measurement that is due (cut short by a restart, or missing on an older tag)."""
        s = summarize(self.rows)
        if self.cfg.remeasure_noise and s.best_exp is not None:
            self._measure_noise(max(self.cfg.noise_runs, 2), fresh=True)
            return
        if self.cfg.remeasure_noise:
            self._log("--remeasure-noise: nothing to re-measure yet (no kept experiment); the baseline measures the "
                      "noise floor")
        todo = self.keep_rule.noise_runs_needed(self.rows)
        if todo:
            self._measure_noise(todo)

    def _measure_noise(self, count: int, fresh: bool = False) -> None:
        """Run the reference commit (the best kept experiment, which must be HEAD) `count` more times with new seeds,
        appending one "noise" row per run. A crash, skip or abort ends the measurement early (what ran is kept)."""
        if count <= 0:
            return
        s = summarize(self.rows)
        exp = next((e for e in group_experiments(self.rows) if e.exp == s.best_exp), None)
        if exp is None or exp.exp is None:
            return
        ref = exp.rows[0]
        head = self.git.head()
        if not head.startswith(ref.get("commit", "-")) and ref.get("commit", "-") != "-":
            self._log(f"noise floor: HEAD {head[:7]} is not the best commit {ref.get('commit')} (exp{exp.exp}); "
                      f"not measuring", "warning")
            return
        n, desc = exp.exp, ref.get("description", "")
        used = [int(r["run"]) for r in exp.rows if str(r.get("run", "")).isdigit()]
        first = max(used) + 1 if used else len(exp.rows)
        done = 0  # runs of this measurement so far (for "run j/N")
        block = latest_measurement(self.rows)
        if block and not fresh and exp_number(self.rows[block[0]].get("exp")) == n:
            done = sum(1 for r in self.rows[block[0]:block[1]] if r.get("status") == "keep")
        total = count if fresh else done + count
        base = self.cfg.seed if self.cfg.seed is not None else DEFAULT_SEED
        what = "re-measuring the noise floor" if fresh else "noise floor"
        if fresh:
            self._log(f"{what} on exp{n} ({ref.get('commit')}): {count} runs with seeds {base + first}.."
                      f"{base + first + count - 1}")
        for i in range(count):
            if self._stop.is_set():
                self._log(f"noise floor: stopped after {done + i}/{total} runs; the next start completes it")
                return
            run, seed = first + i, base + first + i
            info = ExperimentInfo(n, desc, f"{what} run {done + i + 1}/{total}", ref.get("commit", ""),
                                  baseline=(n == 0), run=run, seed=seed,
                                  log_path=str(self.cfg.runs_dir / f"exp{n}-run{run}.log"))
            self.events.emit("on_experiment_start", info)
            self._set_state(State.BASELINE if n == 0 else State.TRAINING,
                            f"exp{n}: {what} run {done + i + 1}/{total} (seed {seed})")
            outcome = self._train(n, run=run, seed=seed)
            status, notes = self._judge(outcome)
            if status is not None:
                self._log(f"noise floor run {done + i + 1}/{total} of exp{n} did not finish ({notes}); the "
                          f"measurement keeps the {done + i} runs it has", "warning")
                if status == "crash":
                    self._last_crash = (n, self._crash_text(n, desc, notes, outcome.tail[-CRASH_TAIL_LINES:]))
                break
            notes = f"noise floor run {done + i + 1}/{total} (seed {seed})"
            row = self._row(n, "keep", desc, ref.get("commit", ""), outcome, notes, Usage(), run=run, seed=seed,
                            kind="noise")
            if i == count - 1:
                row["notes"] = f"{notes}; {self.keep_rule.noise_summary(self.rows + [row])}"
            self.results.append(row)
            self.rows.append(row)
            self.events.emit("on_experiment_end", ExperimentResult(
                n, "keep", desc, outcome.final.val_bpb, ref.get("commit", ""), row["notes"], outcome.final,
                outcome.seconds, run=run, row=row))
            self._refresh_stats()
        summary = self.keep_rule.noise_summary(self.rows)
        if summary:
            self._log(summary)

    def _announce(self) -> None:
        """Say in the log when the keep rule's status note appears (e.g. a plateau was reached)."""
        note = self.keep_rule.status_note(self.rows)
        if note and not self._last_note:
            self._log(note, "warning")
        self._last_note = note

    # -------------------------------------------------------------------------
    # The pending file (a confirmation in progress)
    # -------------------------------------------------------------------------

    @property
    def _pending_path(self) -> Path:
        return self.cfg.runs_dir / f"pending-{self.cfg.tag}.json"

    def _save_pending(self, trial: Trial) -> None:
        try:
            write_json_atomic(self._pending_path, {"tag": self.cfg.tag, **dataclasses.asdict(trial)})
        except OSError as e:
            self._log(f"could not save the confirmation state ({e}); a restart would redo exp{trial.exp}", "warning")

    def _load_pending(self, n: int, sha: str) -> Trial | None:
        """The saved confirmation of experiment n at commit sha, or None (a file that does not match is removed)."""
        try:
            data = json.loads(self._pending_path.read_text(encoding="utf-8"))
            tag = data.pop("tag", None)
            trial = Trial(**data)
        except (OSError, ValueError, TypeError):
            return None
        if tag != self.cfg.tag or trial.exp != n or trial.commit != sha or not trial.values:
            self._drop_pending()
            return None
        return trial

    def _drop_pending(self) -> None:
        try:
            self._pending_path.unlink()
        except OSError:
            pass

    def _judge(self, outcome):
        """(status, notes) for a run that did not produce a usable result; (None, "") when it did."""
        touched = self.protected.restore()
        if outcome.stopped == "abort":
            return "abort", "aborted by the user"
        if outcome.stopped == "skip":
            self._skip.clear()
            return "skip", "skipped by the user during training"
        if touched:
            return "crash", f"the run modified protected files ({', '.join(touched)}); they were restored"
        if not outcome.ok:
            return "crash", outcome.crash_reason()
        if outcome.returncode not in (0, None):
            self._log(f"the trainer exited with code {outcome.returncode} after printing its summary", "warning")
        return None, ""

    def _crash_text(self, n, desc, notes, tail) -> str:
        return f"exp{n} ({desc}): {notes}\n" + "\n".join(tail)

    def _record_skip(self, n: int, reason: str, usage: Usage, by_user: bool = False) -> None:
        if not by_user:
            self._skips_in_a_row += 1
        row = self._row(n, "skip", "(no experiment)", "", None, reason, usage)
        self.results.append(row)
        self.rows.append(row)
        self._session_rows += 1
        self.events.emit("on_experiment_end", ExperimentResult(n, "skip", row["description"], notes=row["notes"],
                                                               row=row))

    def _outage_pause(self) -> None:
        if self.cfg.outage_pause <= 0 or self._stop.is_set():
            return
        self._resume_now.clear()
        self._set_state(State.PAUSED, f"LLM unavailable: next experiment in {self.cfg.outage_pause:.0f}s "
                                      f"(resume to retry now)")
        self._wait(self.cfg.outage_pause, until_resume=True)
        self._resume_now.clear()
        self._skip.clear()

    def _revert(self, n: int, sha: str, why: str) -> None:
        try:
            self.git.revert_experiment(sha, self.script, f"exp{n}: revert ({why})")
        except GitError as e:
            raise FatalError(f"could not revert exp{n} ({sha[:7]}): {e}; the next start will retry") from None
        self._pending = None

    def _row(self, n, status, description, commit, outcome, notes, usage, run=0, seed=None, kind="") -> dict:
        f = outcome.final if outcome else None
        scored = status in ("keep", "discard") and f is not None and f.ok
        tok_sec = ""
        step_rate = outcome.last_step.tok_per_sec if outcome and outcome.last_step else None
        if f and f.total_tokens_M and f.training_seconds and (f.total_tokens_M >= 10 or not step_rate):
            # the summary's token count has one decimal (in millions): exact enough from 10M tokens up
            tok_sec = int(f.total_tokens_M * 1e6 / f.training_seconds)
        elif step_rate:
            tok_sec = int(step_rate)
        steps = f.num_steps if f and f.num_steps is not None else (
            outcome.last_step.step if outcome and outcome.last_step else "")
        cost = "" if not usage.calls else ("unknown" if usage.cost_usd is None else f"{usage.cost_usd:.6f}")
        row = {
            "commit": commit[:7] if commit else "-",
            "val_bpb": f"{f.val_bpb:.6f}" if scored else "0.000000",
            "memory_gb": f"{f.peak_vram_mb / 1024:.1f}" if scored and f.peak_vram_mb is not None else "0.0",
            "status": status,
            "description": " ".join(str(description).split()),
            "exp": f"exp{n}",
            "tok_sec": tok_sec,
            "mfu": f"{f.mfu_percent:.2f}" if f and f.mfu_percent is not None else "",
            "steps": steps,
            "backend": (f.backend if f and f.backend else (outcome.backend if outcome else "")) or "",
            "chip": (f.chip if f else "") or "",
            "dataset": self.cfg.dataset,
            "seconds": f"{outcome.seconds:.1f}" if outcome else "",
            "notes": notes,
            "tag": self.cfg.tag,
            "llm_tokens": usage.tokens if usage.calls else "",
            "llm_cost": cost,
            "seed": "" if seed is None else seed,
            "run": run,
            "kind": kind,
        }
        return {k: self.redact(str(v)) for k, v in row.items()}

    # -------------------------------------------------------------------------
    # Shutdown
    # -------------------------------------------------------------------------

    def _shutdown(self, ok: bool, reason: str) -> None:
        self._set_state(State.STOPPING, reason)
        run = self._run
        if run is not None:
            run.kill()
        if self._pending:
            n, sha = self._pending
            try:
                self.git.revert_experiment(sha, self.script, f"exp{n}: revert (agent stopped)")
                self._log(f"exp{n} did not finish: reverted {self.script}", "warning")
            except GitError as e:
                self._log(f"could not revert exp{n}: {e}; the next start will retry", "error")
            self._pending = None
        if self._lock is not None:
            self._lock.release()
            self._lock = None
        self.stats.experiment = None
        try:
            self._refresh_stats()
        except Exception:
            pass
        cost = format_cost(self.usage.cost_usd)
        if self.usage.calls:
            self._log(f"LLM usage: {self.usage.calls} calls, {self.usage.tokens} tokens, cost {cost}")
        self._set_state(State.STOPPED if ok else State.FAILED, reason)
