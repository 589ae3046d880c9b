"""One training subprocess: scrubbed environment, its own process group, a deadline, full output in a log file.

The child gets an environment without any API key, token, secret or provider variable. It runs in a new process
group (session on POSIX) so the deadline, a skip or an abort kills it together with anything it spawned. Output is
read by a thread in chunks, written raw to runs/expN.log and parsed incrementally on the caller's thread, so every
callback runs on the thread that called wait().
"""

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from tui.credentials import scrub_env
from tui.parser import FinalMetrics, OutputParser, StepMetrics

POLL_SECONDS = 0.1
KILL_GRACE = 5.0  # seconds between SIGTERM and SIGKILL
DRAIN_AFTER_EXIT = 1.0  # how long output may keep coming after the main process exited (grandchildren)
IS_WINDOWS = sys.platform == "win32"


@dataclass
class RunOutcome:
    returncode: int | None
    final: FinalMetrics | None
    failed: bool  # the trainer printed FAIL
    timed_out: bool
    stopped: str | None  # why we killed it on request ("skip", "abort"), None otherwise
    seconds: float
    log_path: Path | None
    backend: str | None = None
    last_step: StepMetrics | None = None
    tail: list = field(default_factory=list)
    eval_seconds: float | None = None  # the sealed evaluation's process (tui.sealed), apart from `seconds`
    eval_error: str | None = None  # why the sealed evaluation gave no val_bpb

    @property
    def ok(self) -> bool:
        return self.final is not None and self.final.ok and not self.timed_out and self.stopped is None

    def crash_reason(self) -> str:
        """One line for results.tsv notes and the log."""
        if self.stopped:
            return f"stopped ({self.stopped})"
        if self.timed_out:
            return f"timed out after {self.seconds:.0f}s (killed)"
        if self.failed:
            return "FAIL: training diverged (loss NaN or exploded)"
        if self.eval_error:
            return self.eval_error
        if self.final is not None and self.final.val_bpb is None:
            return "the summary has no val_bpb"
        if self.final is not None and not self.final.ok:
            return f"val_bpb is {self.final.val_bpb} (not a finite positive number)"
        last = next((ln.strip() for ln in reversed(self.tail) if ln.strip()), "")
        code = f"exit code {self.returncode}" if self.returncode is not None else "no exit code"
        return f"{code}: {last[:160]}" if last else f"{code}, no summary printed"


def kill_process_group(pid: int, grace: float = KILL_GRACE, proc: subprocess.Popen | None = None) -> None:
    """SIGTERM the group, wait up to `grace` for the leader, then SIGKILL whatever is left of the group."""
    if IS_WINDOWS:
        import psutil
        try:
            parent = psutil.Process(pid)
            procs = parent.children(recursive=True) + [parent]
        except psutil.Error:
            return
        for p in procs:
            try:
                p.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(procs, timeout=grace)
        return
    try:
        os.killpg(pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        return
    if proc is not None:
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    else:
        end = time.monotonic() + grace
        while time.monotonic() < end and _group_alive(pid):
            time.sleep(0.05)
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _sigkill_group(pid: int, proc: subprocess.Popen | None = None) -> None:
    if IS_WINDOWS:
        kill_process_group(pid, 0.0, proc)
        return
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _group_alive(pgid: int) -> bool:
    """Any live (non-zombie) process left in the group? Zombies count as gone: their parent may never reap them."""
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    import psutil
    for p in psutil.process_iter(["status"]):
        try:
            if os.getpgid(p.pid) == pgid and p.info["status"] != psutil.STATUS_ZOMBIE:
                return True
        except (OSError, psutil.Error):
            continue
    return False


class TrainingRun:
    def __init__(self, script: str, cwd, log_path=None, deadline: float | None = None, python: str = sys.executable,
                 seed: int | None = None, secrets=(), extra_env: dict | None = None, kill_grace: float = KILL_GRACE,
                 on_line=None, should_stop=None, env: dict | None = None):
        self.script = script
        self.cwd = Path(cwd)
        self.log_path = Path(log_path) if log_path else None
        self.deadline = deadline
        self.python = python
        self.seed = seed
        self.secrets = tuple(secrets)
        self.extra_env = dict(extra_env or {})
        self.env = env  # the whole environment (tui.executor.run_env); None: os.environ without secrets
        self.kill_grace = kill_grace
        self.on_line = on_line  # on_line(ParsedLine)
        self.should_stop = should_stop  # should_stop() -> reason str or None, polled while running
        self.parser = OutputParser()
        self.proc: subprocess.Popen | None = None
        self._queue: queue.Queue = queue.Queue()
        self._kill_lock = threading.Lock()
        self._killed = False
        self._t0 = 0.0

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def child_env(self) -> dict:
        env = dict(self.env) if self.env is not None else scrub_env(os.environ, self.secrets)
        env.update(scrub_env(self.extra_env, self.secrets))
        env["PYTHONUNBUFFERED"] = "1"
        env["PYTHONIOENCODING"] = "utf-8"
        if self.seed is not None:
            env["AUTORESEARCH_SEED"] = str(int(self.seed))
        return env

    def start(self) -> int:
        kwargs = {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP} if IS_WINDOWS else {"start_new_session": True}
        self._t0 = time.monotonic()
        self.proc = subprocess.Popen([self.python, "-u", self.script], cwd=self.cwd, env=self.child_env(),
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     bufsize=0, **kwargs)
        threading.Thread(target=self._read, name="training-output", daemon=True).start()
        return self.proc.pid

    def _read(self) -> None:
        fd = self.proc.stdout.fileno()
        try:
            while True:
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                self._queue.put(chunk)
        except OSError:
            pass
        finally:
            self._queue.put(None)

    def kill(self, force: bool = False) -> None:
        """Kill the whole process group: SIGTERM, then SIGKILL after kill_grace; force=True sends SIGKILL at once.
        Safe to call from any thread, more than once."""
        if self.proc is None:
            return
        if force:
            _sigkill_group(self.proc.pid, self.proc)
            return
        with self._kill_lock:
            if self._killed:
                return
            self._killed = True
        kill_process_group(self.proc.pid, self.kill_grace, self.proc)

    def wait(self) -> RunOutcome:
        """Drain output until the process and its group are done, the deadline passes, or should_stop() fires."""
        log = open(self.log_path, "wb") if self.log_path else None
        timed_out, stopped, exited_at, kill_requested = False, None, None, False
        try:
            while True:
                try:
                    chunk = self._queue.get(timeout=POLL_SECONDS)
                except queue.Empty:
                    chunk = b""
                if chunk is None:
                    break
                if chunk:
                    if log:
                        log.write(chunk)
                        log.flush()
                    self._emit(self.parser.feed(chunk))
                now = time.monotonic()
                if not kill_requested:
                    # killing takes up to kill_grace seconds: do it on a helper thread and keep draining output
                    if self.deadline is not None and now - self._t0 > self.deadline:
                        timed_out = kill_requested = True
                        self._emit_note(f"training exceeded the {self.deadline:.0f}s deadline: killing it")
                        threading.Thread(target=self.kill, daemon=True).start()
                    elif self.should_stop is not None and (reason := self.should_stop()):
                        stopped, kill_requested = reason, True
                        threading.Thread(target=self.kill, daemon=True).start()
                if self.proc.poll() is not None:
                    # the main process is gone; a grandchild may still hold the pipe open
                    exited_at = exited_at or now
                    if now - exited_at > DRAIN_AFTER_EXIT and not kill_requested:
                        kill_requested = True
                        threading.Thread(target=self.kill, daemon=True).start()
                    if now - exited_at > DRAIN_AFTER_EXIT + self.kill_grace + 1.0:
                        break
            self._emit(self.parser.finish())
        finally:
            if log:
                log.close()
        try:
            returncode = self.proc.wait(timeout=self.kill_grace + 1.0)
        except subprocess.TimeoutExpired:
            self.kill()
            returncode = self.proc.wait()
        if not IS_WINDOWS:  # leftovers of the group (workers that outlived the trainer)
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        p = self.parser
        return RunOutcome(returncode=returncode, final=p.final, failed=p.failed, timed_out=timed_out, stopped=stopped,
                          seconds=time.monotonic() - self._t0, log_path=self.log_path, backend=p.backend,
                          last_step=p.last_step, tail=list(p.tail))

    def run(self) -> RunOutcome:
        self.start()
        return self.wait()

    def _emit(self, lines) -> None:
        if self.on_line:
            for pl in lines:
                self.on_line(pl)

    def _emit_note(self, text: str) -> None:
        from tui.parser import ParsedLine
        self.parser.tail.append(text)
        if self.on_line:
            self.on_line(ParsedLine(text))
