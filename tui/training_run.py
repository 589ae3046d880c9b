"""One training subprocess: its own session, a deadline, bounded output, and nothing it started outlives it.

The child runs in a new session (POSIX), so a skip, an abort or the deadline can end it; the caller may wrap the
command in a sandbox (tui.sandbox), whose wrapper processes sit at the top of the tree. Containment of processes:
    - on Linux the agent is a child subreaper, so a descendant whose parent exits (a setsid double-forked daemon)
      is re-parented to the agent instead of init and stays findable; under bubblewrap the run has its own PID
      namespace as well, which the kernel kills as a whole with the run;
    - when the trainer exits, and whenever the run is killed, the whole tree goes: the trainer's descendants, its
      process group, and every child the agent adopted from outside its own session (see run_processes), then the
      adopted ones are reaped.
Output is read by a thread in chunks into a bounded queue (a run that prints faster than the agent handles it is
slowed down by the full pipe, never buffered in the agent's memory), parsed completely on the caller's thread (every
callback runs on the thread that called wait()), and read to the end: the reader stops when every writer of the pipe
is gone, which the tree kill guarantees, so the summary at the end of a flood is never dropped. The log keeps the head
and the tail of the output (BoundedLog); a run that prints more than OUTPUT_LIMIT, or whose log cannot be written (disk
full), is killed and is a crash with that reason.
"""

import ctypes
import errno
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from tui.credentials import scrub_env
from tui.parser import FinalMetrics, OutputParser, ParsedLine, StepMetrics

POLL_SECONDS = 0.1
KILL_GRACE = 5.0  # seconds between SIGTERM and SIGKILL
CHUNK = 65536  # bytes per read of the output pipe
QUEUE_CHUNKS = 64  # chunks in flight between the reader thread and wait(): at most 4 MiB of output in memory
MiB = 1 << 20
LOG_HEAD = 1 * MiB  # the log keeps the first LOG_HEAD bytes of output ...
LOG_TAIL = 4 * MiB  # ... and the last LOG_TAIL bytes
OUTPUT_LIMIT = 64 * MiB  # a run that prints more is killed: a crash
LIVE_BYTES = LOG_HEAD  # output lines are passed on live up to this much output; then see TrainingRun._emit
HELD_LINES = 200  # ... the last lines after that are passed on at the end
STEP_EVERY = 0.1  # ... and progress lines at most every STEP_EVERY seconds
DRAIN_AFTER_SWEEP = 5.0  # seconds the pipe may stay open after the run's processes are all dead (see wait())
SWEEP_SECONDS = 2.0  # how long a sweep keeps killing what appears (a fork in flight) before it gives up
IS_WINDOWS = sys.platform == "win32"
IS_LINUX = sys.platform.startswith("linux")
PR_SET_CHILD_SUBREAPER = 36
DISK_FULL_RE = re.compile(r"No space left on device|Disk quota exceeded|\[Errno (28|122)\]")
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


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
    cut: str | None = None  # why the engine ended the run itself (output limit, log not writable), None otherwise
    worker: str | None = None  # where it ran when not here (e.g. "ray:<node id> (<ip>)"), None for a local run
    note: str | None = None  # what happened on the way, e.g. attempts lost with their node (tui.ray_executor)

    @property
    def ok(self) -> bool:
        return (self.final is not None and self.final.ok and not self.timed_out and self.stopped is None
                and self.cut is None)

    def crash_reason(self) -> str:
        """One line for results.tsv notes and the log."""
        if self.stopped:
            return f"stopped ({self.stopped})"
        if self.cut:
            return self.cut
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
        text = f"{code}: {last[:160]}" if last else f"{code}, no summary printed"
        return f"disk full: {text}" if any(DISK_FULL_RE.search(ln) for ln in self.tail) else text


# ---------------------------------------------------------------------------
# Processes: the run's tree, killing it, reaping what the agent adopted
# ---------------------------------------------------------------------------

_subreaper_lock = threading.Lock()
_subreaper = False
LEADERS: set = set()  # leaders of the runs and evaluations alive in this process: never another run's to kill
SPAWN_LOCK = threading.Lock()  # a leader's start and its LEADERS entry are one step for run_processes (several slots)


def spawn_leader(argv, **kwargs) -> subprocess.Popen:
    """Start a process in a session of its own (a run or a sealed evaluation) and record it in LEADERS at once: a
    sweep of another slot's run never sees it as an orphan in between."""
    with SPAWN_LOCK:
        proc = subprocess.Popen(argv, **kwargs)
        LEADERS.add(proc.pid)
    return proc


def become_subreaper() -> None:
    """Linux: orphaned descendants are re-parented to this process rather than to init (PR_SET_CHILD_SUBREAPER),
    so a daemon a run double-forks is still found (and killed) at the end of the run. Once per process."""
    global _subreaper
    with _subreaper_lock:
        if _subreaper or not IS_LINUX:
            return
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER) failed")
        _subreaper = True


def run_processes(leader: int, wrappers: int = 0, with_leader: bool = True) -> tuple:
    """(wrapper processes, the others): the live processes of the run led by `leader`.

    The run is the leader and its descendants, plus the agent's children outside the agent's session and their
    descendants: a process the agent starts itself (git, nvidia-smi) stays in the agent's session, while everything
    a run starts is in the run's session or a newer one (a session can only be left for a new one, never re-joined),
    so an adopted orphan is recognised without trusting anything it could change. Invariants: the leaders of the other
    runs and sealed evaluations alive in this process (LEADERS, several with parallel slots) are excluded, but not
    their orphans (an orphan of a run is killed when any run ends), and the agent starts nothing in a session of its
    own but those. The first `wrappers`
    levels of the leader's tree are sandbox wrappers (they get SIGKILL only: a SIGTERM kills a bubblewrap wrapper at
    once, and with it everything inside, without the grace the trainer is due). with_leader=False once the leader
    has been reaped: its pid may already belong to someone else."""
    import psutil
    with SPAWN_LOCK:
        return _run_processes(psutil, leader, wrappers, with_leader)


def _run_processes(psutil, leader: int, wrappers: int, with_leader: bool) -> tuple:
    children: dict = {}
    for p in psutil.process_iter(["ppid", "status"]):
        if p.info["status"] != psutil.STATUS_ZOMBIE:
            children.setdefault(p.info["ppid"], []).append(p)
    todo = []
    if with_leader:  # a zombie leader has no children left: they were re-parented when it died
        try:
            proc = psutil.Process(leader)
            if proc.status() != psutil.STATUS_ZOMBIE:
                todo.append((proc, 0))
        except psutil.Error:
            pass
    if hasattr(os, "getsid"):
        mine = os.getsid(0)
        todo.extend((p, wrappers) for p in children.get(os.getpid(), [])
                    if p.pid != leader and p.pid not in LEADERS and _sid(p.pid) not in (mine, None))
    outer, inner, seen = [], [], set()
    while todo:
        proc, depth = todo.pop()
        if proc.pid in seen:
            continue
        seen.add(proc.pid)
        (outer if depth < wrappers else inner).append(proc)
        todo.extend((c, depth + 1) for c in children.get(proc.pid, []))
    return outer, inner


def _sid(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except OSError:
        return None


def _signal_all(procs, hard: bool) -> None:
    for p in procs:
        try:
            if hard:
                p.kill()
            else:
                p.terminate()
        except Exception:  # psutil.Error: gone already
            pass


def _killpg(pgid: int, hard: bool) -> None:
    if IS_WINDOWS:
        return
    try:
        os.killpg(pgid, signal.SIGKILL if hard else signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        pass


def _unreaped(proc: subprocess.Popen | None) -> bool:
    """Is the leader's pid still the leader's (not reaped: alive or a zombie, so neither its pid nor its group can
    have been reused)? Without its Popen (a leftover of another agent) the caller vouches for the pid."""
    return proc is None or proc.returncode is None


def sweep(leader: int, wrappers: int = 0, proc: subprocess.Popen | None = None) -> None:
    """SIGKILL everything of the run (run_processes) and its process group, again until nothing is left (a fork in
    flight while we kill shows up in the next round, re-parented to us), then reap the children we adopted."""
    end = time.monotonic() + SWEEP_SECONDS
    while True:
        with_leader = _unreaped(proc)
        outer, inner = run_processes(leader, wrappers, with_leader)
        _signal_all(inner + outer, hard=True)
        if with_leader:
            _killpg(leader, hard=True)
        if not (outer or inner) or time.monotonic() > end:
            break
        time.sleep(0.01)
    reap_adopted(leader)


def reap_adopted(leader: int) -> None:
    """Collect the exit status of children we adopted (dead orphans of runs): a subreaper that does not reap them
    collects zombies. Only those known to be outside our session: our own subprocesses are their Popen's to reap."""
    if not IS_LINUX:
        return
    import psutil
    mine = os.getsid(0)
    try:
        kids = psutil.Process().children()
    except psutil.Error:
        return
    for p in kids:
        if p.pid == leader or p.pid in LEADERS:
            continue
        try:
            sid = _sid(p.pid)
            if p.status() == psutil.STATUS_ZOMBIE and sid is not None and sid != mine:
                os.waitpid(p.pid, os.WNOHANG)
        except (psutil.Error, OSError):
            pass


def kill_process_group(pid: int, grace: float = KILL_GRACE, proc: subprocess.Popen | None = None,
                       wrappers: int = 0) -> None:
    """End the run led by `pid` with everything it started: SIGTERM its processes (not the sandbox wrappers) and its
    group, wait up to `grace` for them to go, then sweep() whatever is left. `proc`: the leader's Popen, if ours."""
    with_leader = _unreaped(proc)
    outer, inner = run_processes(pid, wrappers, with_leader)
    _signal_all(inner, hard=False)
    if with_leader and not wrappers:
        _killpg(pid, hard=False)
    end = time.monotonic() + grace
    while time.monotonic() < end and run_processes(pid, wrappers, _unreaped(proc))[1]:
        time.sleep(0.05)
    sweep(pid, wrappers, proc)


def exited(proc: subprocess.Popen) -> bool:
    """Has the process ended? Without reaping it (POSIX), so its pid and group stay ours to sweep."""
    if proc.returncode is not None:
        return True
    if not hasattr(os, "waitid"):  # Windows: a process handle keeps the pid anyway
        return proc.poll() is not None
    try:
        return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


# ---------------------------------------------------------------------------
# The log: head and tail
# ---------------------------------------------------------------------------


class BoundedLog:
    """runs/expN.log: the first `head` bytes of the output, then a line saying how many bytes were dropped, then the
    last `tail` bytes. While the run goes the file is readable live and holds at most head + 2 * tail bytes (the part
    after the head is cut back to the last `tail` bytes whenever it reaches twice that). A write error (disk full)
    ends the writing and is kept in .error; the caller decides what it means for the run."""

    def __init__(self, path, head: int = LOG_HEAD, tail: int = LOG_TAIL):
        self.path = Path(path)
        self.head, self.tail = head, tail
        self.error: OSError | None = None
        self.total = 0  # bytes received
        self._ring: deque = deque()  # the last chunks after the head: at least `tail` bytes once there are that many
        self._ring_bytes = 0
        self._after_head = 0  # bytes in the file after the head (and the note)
        try:
            self._f = open(self.path, "wb")
        except OSError as e:
            self._f, self.error = None, e

    @property
    def dropped(self) -> int:
        return max(0, self.total - self.head - self._ring_bytes)

    def write(self, data: bytes) -> None:
        if self._f is None:
            return
        try:
            if self.total < self.head:
                n = min(len(data), self.head - self.total)
                self._f.write(data[:n])
                self.total += n
                data = data[n:]
            if data:
                self.total += len(data)
                self._ring.append(data)
                self._ring_bytes += len(data)
                while self._ring_bytes - len(self._ring[0]) >= self.tail:
                    self._ring_bytes -= len(self._ring.popleft())
                self._f.write(data)
                self._after_head += len(data)
                if self._after_head > 2 * self.tail:
                    self._compact()
            self._f.flush()
        except OSError as e:
            self._fail(e)

    def _compact(self) -> None:
        self._f.flush()
        self._f.seek(self.head)
        self._f.truncate()
        note = (f"\n[autoresearch: {self.dropped:,} bytes of output dropped here; the log keeps the first "
                f"{self.head / MiB:g} MiB and the last {self.tail / MiB:g} MiB]\n").encode()
        self._f.write(note)
        for chunk in self._ring:
            self._f.write(chunk)
        self._after_head = self._ring_bytes

    def _fail(self, e: OSError) -> None:
        self.error = e
        try:
            self._f.close()
        except OSError:
            pass
        self._f = None

    def close(self) -> None:
        if self._f is None:
            return
        try:
            if self.dropped:
                self._compact()  # the note says the final count, and the tail is exactly the last `tail` bytes
            self._f.close()
        except OSError as e:
            self._fail(e)
        self._f = None

    def problem(self) -> str | None:
        """Why the log could not be written, as a crash reason; None while it could."""
        e = self.error
        if e is None:
            return None
        if e.errno in DISK_FULL_ERRNOS:
            return f"disk full while writing the log ({self.path}: {e.strerror})"
        return f"could not write the log {self.path}: {e.strerror or e}"


# ---------------------------------------------------------------------------
# One run
# ---------------------------------------------------------------------------


class TrainingRun:
    def __init__(self, script: str, cwd, log_path=None, deadline: float | None = None, python: str = sys.executable,
                 seed: int | None = None, secrets=(), extra_env: dict | None = None, kill_grace: float = KILL_GRACE,
                 on_line=None, should_stop=None, env: dict | None = None, argv: list | None = None,
                 wrappers: int = 0):
        self.script = script
        self.cwd = Path(cwd)
        self.log_path = Path(log_path) if log_path else None
        self.deadline = deadline
        self.python = python
        self.seed = seed
        self.secrets = tuple(secrets)
        self.extra_env = dict(extra_env or {})
        self.env = env  # the whole environment (tui.executor.run_env); None: os.environ without secrets
        self.argv = list(argv) if argv else [python, "-u", script]  # e.g. wrapped in a sandbox (tui.sandbox)
        self.wrappers = wrappers  # levels of sandbox wrapper processes at the top of the tree (run_processes)
        self.kill_grace = kill_grace
        self.on_line = on_line  # on_line(ParsedLine)
        self.should_stop = should_stop  # should_stop() -> reason str or None, polled while running
        self.parser = OutputParser()
        self.proc: subprocess.Popen | None = None
        self._queue: queue.Queue = queue.Queue(maxsize=QUEUE_CHUNKS)
        self._closed = threading.Event()  # wait() is done: the reader drops what it still reads
        self._kill_lock = threading.Lock()
        self._killed = False
        self._t0 = 0.0
        self._output = 0  # bytes of output so far
        self._held: deque = deque(maxlen=HELD_LINES)
        self._held_count = 0
        self._last_step_emit = 0.0

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
        become_subreaper()
        self._t0 = time.monotonic()
        self.proc = spawn_leader(self.argv, cwd=self.cwd, env=self.child_env(), stdin=subprocess.DEVNULL,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, bufsize=0, **kwargs)
        threading.Thread(target=self._read, name="training-output", daemon=True).start()
        return self.proc.pid

    def _read(self) -> None:
        """Pipe -> queue until EOF (every writer gone). A full queue blocks this thread, and so the writers."""
        fd = self.proc.stdout.fileno()
        try:
            while True:
                chunk = os.read(fd, CHUNK)
                if not chunk:
                    break
                self._put(chunk)
        except OSError:
            pass
        finally:
            self._put(None)  # the end of the output

    def _put(self, item) -> None:
        """Queue an item, waiting while the queue is full, unless wait() is done (then nobody reads it)."""
        while not self._closed.is_set():
            try:
                self._queue.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    def kill(self, force: bool = False) -> None:
        """Kill the run with everything it started: SIGTERM, then SIGKILL after kill_grace; force=True sends SIGKILL
        at once. Safe to call from any thread, more than once."""
        if self.proc is None:
            return
        if force:
            sweep(self.proc.pid, self.wrappers, self.proc)
            return
        with self._kill_lock:
            if self._killed:
                return
            self._killed = True
        kill_process_group(self.proc.pid, self.kill_grace, self.proc, self.wrappers)

    def wait(self) -> RunOutcome:
        """Read and parse the output to its end; kill the run at the deadline, on should_stop(), past the output
        limit or when the log cannot be written; once the trainer has exited, kill what it left behind."""
        log = BoundedLog(self.log_path) if self.log_path else None
        timed_out, stopped, cut, kill_requested, swept_at = False, None, None, False, None
        try:
            while True:
                try:
                    chunk = self._queue.get(timeout=POLL_SECONDS)
                except queue.Empty:
                    chunk = b""
                if chunk is None:
                    break
                if chunk:
                    self._output += len(chunk)
                    if log:
                        log.write(chunk)
                    if cut is None:  # past the limit the run is a crash anyway: the rest is only logged
                        self._emit(self.parser.feed(chunk))
                now = time.monotonic()
                if not kill_requested:
                    if log and log.problem():
                        cut = log.problem()
                    elif self._output > OUTPUT_LIMIT:
                        cut = (f"printed {self._output / MiB:.0f} MiB, over the {OUTPUT_LIMIT / MiB:.0f} MiB "
                               f"output limit (killed)")
                    if cut:
                        kill_requested = True
                        self._emit_note(cut)
                        threading.Thread(target=self.kill, kwargs={"force": True}, daemon=True).start()
                    elif self.deadline is not None and now - self._t0 > self.deadline:
                        # killing takes up to kill_grace seconds: do it on a helper thread and keep reading
                        timed_out = kill_requested = True
                        self._emit_note(f"training exceeded the {self.deadline:.0f}s deadline: killing it")
                        threading.Thread(target=self.kill, daemon=True).start()
                    elif self.should_stop is not None and (reason := self.should_stop()):
                        stopped, kill_requested = reason, True
                        threading.Thread(target=self.kill, daemon=True).start()
                if swept_at is None and exited(self.proc):
                    # the trainer is gone: what it left behind goes now, so every writer of the pipe is gone too
                    sweep(self.proc.pid, self.wrappers, self.proc)
                    swept_at = now
                elif swept_at is not None and now - swept_at > DRAIN_AFTER_SWEEP:
                    self._emit_note(f"the output pipe was still open {DRAIN_AFTER_SWEEP:.0f}s after the run ended "
                                    f"(held by a process outside the run): stopped reading it")
                    break
            if cut is None:
                self._emit(self.parser.finish())
            self._emit_held()
        finally:
            self._closed.set()
            if log:
                log.close()
                if cut is None and log.problem():  # the last write, or the final compaction, failed
                    cut = log.problem()
        try:
            returncode = self.proc.wait(timeout=self.kill_grace + 1.0)
        except subprocess.TimeoutExpired:
            self.kill(force=True)
            returncode = self.proc.wait()
        sweep(self.proc.pid, self.wrappers, self.proc)  # anything that appeared since, and the adopted zombies
        LEADERS.discard(self.proc.pid)
        p = self.parser
        return RunOutcome(returncode=returncode, final=p.final, failed=p.failed, timed_out=timed_out, stopped=stopped,
                          seconds=time.monotonic() - self._t0, log_path=self.log_path, backend=p.backend,
                          last_step=p.last_step, tail=list(p.tail), cut=cut)

    def run(self) -> RunOutcome:
        self.start()
        return self.wait()

    def _emit(self, lines) -> None:
        """Lines go to on_line live while the output is under LIVE_BYTES. After that a flood must not flood the
        screen too (the dashboard queues every line it is given): progress lines go at most every STEP_EVERY
        seconds, other lines are held (the last HELD_LINES) and passed on at the end, the summary among them."""
        if not self.on_line:
            return
        for pl in lines:
            if self._output <= LIVE_BYTES:
                self.on_line(pl)
            elif pl.step is not None:
                now = time.monotonic()
                if now - self._last_step_emit >= STEP_EVERY:
                    self._last_step_emit = now
                    self.on_line(pl)
            else:
                if not self._held_count:
                    self.on_line(ParsedLine(f"(over {LIVE_BYTES / MiB:g} MiB of output: further lines are shown "
                                            f"at the end, the last {HELD_LINES} of them)"))
                self._held_count += 1
                self._held.append(pl)

    def _emit_held(self) -> None:
        if not self.on_line or not self._held:
            return
        if self._held_count > len(self._held):
            self.on_line(ParsedLine(f"({self._held_count - len(self._held):,} lines not shown: see the log)"))
        for pl in self._held:
            self.on_line(pl)
        self._held.clear()

    def _emit_note(self, text: str) -> None:
        self.parser.tail.append(text)
        if self.on_line:
            self.on_line(ParsedLine(text))
