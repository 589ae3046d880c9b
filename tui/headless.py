"""Run the agent loop without a screen: timestamped log lines, the status file, signals, a summary at the end.

Signals: the first SIGINT/SIGTERM/SIGHUP kills the current training run, reverts its commit (the experiment runs
again on the next start) and stops cleanly; a second one exits at once (the training process group is still killed).
Exit codes: 0 the loop ended normally (--max reached), 1 a fatal error, 2 bad configuration, 128+N stopped by
signal N (130 for Ctrl-C).
"""

import dataclasses
import os
import signal
import sys
import threading
import time

from tui.config import AgentConfig, ConfigError
from tui.events import AgentListener, State
from tui.llm import format_cost
from tui.orchestrator import Orchestrator
from tui.status_file import StatusFile

STEP_PRINT_EVERY_PCT = 10  # progress lines are printed at 0% and every 10%


def _ts() -> str:
    return time.strftime("%H:%M:%S")


def _fmt_bpb(value) -> str:
    return "-" if value is None else f"{value:.6f}"


class ConsoleListener(AgentListener):
    """Plain, timestamped lines for a terminal, a log file or journald."""

    def __init__(self, out=None, err=None):
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self._last_state = None
        self._next_pct = 0.0
        self._slot_pct: dict = {}  # several slots: the next progress line due, per slot

    def say(self, text: str, error: bool = False) -> None:
        stream = self.err if error else self.out
        for i, line in enumerate(str(text).splitlines() or [""]):
            print(f"[{_ts()}] {line}" if i == 0 else f"           {line}", file=stream, flush=True)

    def on_state(self, state, message):
        key = (state, message)
        if key != self._last_state:
            self._last_state = key
            self.say(f"{state.value:<12} {message}")

    def on_experiment_start(self, info):
        self._next_pct = 0.0
        self._slot_pct[info.slot] = 0.0
        slot = _slot(info.slot)
        if info.run > 0:  # another run of the same commit (noise floor or confirmation): no new header
            self.say(f"    {slot}exp{info.exp} run {info.run + 1}"
                     + (f" (seed {info.seed})" if info.seed is not None else ""))
            return
        self.say(f"=== {slot}exp{info.exp}: {info.description}" + (f"  [{info.commit}]" if info.commit else ""))
        if info.reasoning and not info.baseline:
            first = " ".join(info.reasoning.split())
            self.say(f"    reasoning: {first[:200]}")

    def on_output(self, line):
        self.say(f"    | {line}")

    def on_step(self, step):
        if step.pct_done + 1e-9 >= self._next_pct:
            self._next_pct = _next(step)
            self.say(f"    {_progress(step)}")

    def on_slot_output(self, slot, line):
        self.say(f"    {_slot(slot)}| {line}")

    def on_slot_step(self, slot, step):
        if step.pct_done + 1e-9 >= self._slot_pct.get(slot, 0.0):
            self._slot_pct[slot] = _next(step)
            self.say(f"    {_slot(slot)}{_progress(step)}")

    def on_experiment_end(self, r):
        text = r.row.format()
        if r.status in ("keep", "discard"):
            self.say(f"{_slot(r.slot)}exp{r.exp} {r.status.upper()}: val_bpb {_fmt_bpb(r.val_bpb)} | mem "
                     f"{text['memory_gb']} GB | tok/s {text['tok_sec']} | steps {text['steps']} | {r.notes}")
        else:
            self.say(f"{_slot(r.slot)}exp{r.exp} {r.status.upper()}: {r.notes}")

    def on_stats(self, s, usage, extra):
        self.stats_line(f"stats: runs {s.runs}, kept {s.kept}, discarded {s.discarded}, crashed {s.crashed}, skipped "
                        f"{s.skipped}, best {_fmt_bpb(s.best_val_bpb)}"
                        + (f" (exp{s.best_exp})" if s.best_exp is not None else "")
                        + (f", LLM {usage.tokens} tokens, cost {format_cost(usage.cost_usd)}" if usage.calls else ""))

    def stats_line(self, text):
        if text != getattr(self, "_last_stats", None):  # unchanged totals are not worth a line
            self._last_stats = text
            self.say(text)

    def on_log(self, level, message):
        prefix = "" if level == "info" else f"{level}: "
        self.say(prefix + message, error=(level == "error"))


def _slot(slot: int) -> str:
    """The prefix that names the slot of a line ("" with a single slot)."""
    return f"[slot {slot}] " if slot else ""


def _next(step) -> float:
    return (int(step.pct_done // STEP_PRINT_EVERY_PCT) + 1) * STEP_PRINT_EVERY_PCT


def _progress(step) -> str:
    loss = "-" if step.loss is None else f"{step.loss:.4f}"
    rest = "-" if step.remaining is None else f"{step.remaining:.0f}s"
    return f"step {step.step} ({step.pct_done:.1f}%) loss {loss}, remaining {rest}"


class StatusListener(AgentListener):
    """Mirrors the loop into the status file (.runner_status.json) for monitoring scripts."""

    def __init__(self, path, owns=lambda: True, **static):
        self.file = StatusFile(path, owns, **static)
        self.file.update(state=State.INITIALIZING.value)

    def on_state(self, state, message):
        self.file.update(state=state.value, message=message)

    def on_experiment_start(self, info):
        self.file.update(experiment=info.exp, description=info.description, commit=info.commit)

    def on_training_process(self, pid):
        self.file.update(training_pid=pid)

    def on_slots(self, slots):
        self.file.update(slots=[dataclasses.asdict(v) for v in slots])

    def on_experiment_end(self, r):
        self.file.update(last_result={"exp": r.exp, "status": r.status, "val_bpb": r.val_bpb, "notes": r.notes})

    def on_stats(self, s, usage, extra):
        self.file.update(runs=s.runs, kept=s.kept, discarded=s.discarded, crashed=s.crashed, skipped=s.skipped,
                         best_val_bpb=s.best_val_bpb, best_exp=s.best_exp, next_exp=s.next_exp,
                         llm_tokens=usage.tokens, llm_cost_usd=usage.cost_usd,
                         keep_rule=dict(extra))   # noise floor, margin, plateau: shown by --watch too


def run_headless(config: AgentConfig, out=None, err=None) -> int:
    console = ConsoleListener(out, err)
    try:
        orch = Orchestrator(config, listeners=[console])
    except (ConfigError, ValueError) as e:
        console.say(f"error: {e}", error=True)
        return 2
    cfg = orch.cfg
    status = StatusListener(cfg.status_file, lambda: orch.holds_lock, tag=cfg.tag, branch=cfg.branch, provider=cfg.provider,
                            model=cfg.model, scope=cfg.scope, dataset=cfg.dataset, results=str(cfg.results),
                            workers=cfg.workers)
    orch.events.add(status)
    console.say(f"autoresearch agent (headless): tag {cfg.tag}, branch {cfg.branch}, max {cfg.max_experiments}, "
                f"provider {cfg.provider}" + (f" {cfg.model}" if cfg.model else "") + f", scope {cfg.scope}"
                + (f", {cfg.workers} slots" + (f" ({','.join(cfg.devices)})" if cfg.devices else "")
                   if cfg.workers > 1 else ""))
    console.say(f"results {cfg.results}, logs {cfg.runs_dir}, training deadline {cfg.timeout:.0f}s, status file "
                f"{cfg.status_file}")

    received: list = []

    def on_signal(signum, frame):
        received.append(signum)
        name = signal.Signals(signum).name
        if len(received) == 1:
            console.say(f"{name}: killing the current training run, reverting it and stopping "
                        f"(send {name} again to exit at once)", error=True)
            orch.abort()
        else:
            raise KeyboardInterrupt(name)

    handled = [signal.SIGINT, signal.SIGTERM] + ([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for s in handled:
            previous[s] = signal.signal(s, on_signal)
    t0 = time.monotonic()
    try:
        summary = orch.run()
    except KeyboardInterrupt:
        console.say("forced exit: training killed, repository left for the next start to tidy", error=True)
        status.file.close(state="stopped", message="forced exit")
        code = 128 + (received[-1] if received else signal.SIGINT)
        if previous:  # our own signal handlers: a real process asked to exit at once, so skip the interpreter's
            sys.stdout.flush()  # teardown (collecting torch's objects alone takes seconds)
            sys.stderr.flush()
            os._exit(code)
        return code
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    st, usage = summary.totals, summary.usage
    minutes = (time.monotonic() - t0) / 60
    console.say(f"summary: {summary.reason}")
    skipped = f" ({summary.skipped} of them skipped: nothing trained)" if summary.skipped else ""
    console.say(f"  {summary.experiments} experiment{'' if summary.experiments == 1 else 's'} this session{skipped} "
                f"in {minutes:.1f} min; tag totals: runs {st.runs}, "
                f"kept {st.kept}, discarded {st.discarded}, crashed {st.crashed}, skipped {st.skipped}")
    console.say(f"  best val_bpb {_fmt_bpb(st.best_val_bpb)}" + (f" (exp{st.best_exp})" if st.best_exp is not None
                                                                else "")
                + (f"; LLM {usage.tokens} tokens, cost {format_cost(usage.cost_usd)}" if usage.calls else ""))
    status.file.close(state=orch.state.value, message=summary.reason)
    if received:
        return 128 + received[0]
    return 0 if summary.ok else 1
