"""--executor ray: each run is one Ray task on an existing Ray cluster (`ray start --head`, `ray start --address ...`).

    agent (the Ray driver)                                   a node of the cluster (the task)
    submit(spec): `git archive` of spec.commit (tracked   -> unpack into a fresh temp dir; prepare the dataset once
      files only: never the user's untracked files),         per node (a file lock in the node's data cache);
      shipped as bytes with the task                          LocalExecutor.submit + wait on that copy: the same
    wait(): lines streamed back through a relay actor   <-    sandbox, deadline, bounded log and sealed evaluation as
      (on the agent's node); the bounded log at the end       a local run; then a check that the copy is unchanged

Invariants:
- The run on the node is the local run (tui.executor.LocalExecutor) and nothing else: a RunOutcome comes back with the
  node's bounded log (at most what a local run keeps), which is written to spec.log_path.
- A task asks for one device: `resources` (e.g. {"GPU": 1}, {"slot": 1}); by default one GPU when the cluster has
  GPUs, else one CPU. Tasks are spread over the nodes (SPREAD).
- Ray never retries a task by itself (max_retries=0): when the node (or its worker) is lost mid-run, the run is
  submitted again from scratch, up to `attempts` times, and the outcome carries a note saying so. Nothing was
  recorded for the lost attempt (the orchestrator records only what wait() returns), so nothing is recorded twice.
- cancel(reason) reaches the node through the relay and the local run stops as it does locally (its outcome says
  stopped); a task that does not end within the kill grace, or has not started, is cancelled by Ray (force=True).
  The run's processes die with their worker: the sandbox's --die-with-parent and PID namespace end the whole tree
  when the worker is killed (without a sandbox, only the trainer's process group is killed by Ray's worker exit).
- The python that runs on a node is the node's own (the interpreter of its Ray worker), not spec.python, and the
  environment is the node's allow-listed one plus the run's settings (AUTORESEARCH_*), so paths and the devices Ray
  gave the task (CUDA_VISIBLE_DEVICES) are the node's.
"""

import hashlib
import io
import os
import sys
import tarfile
import tempfile
import threading
import time
import uuid
from dataclasses import replace
from pathlib import Path

from tui.atomic import remove_tree
from tui.executor import Executor, ExecutorError, LocalExecutor, RunHandle, RunSpec, run_env
from tui.git_repo import GitError, GitRepo
from tui.parser import ParsedLine
from tui.training_run import KILL_GRACE, RunOutcome

MISSING = "--executor ray needs the ray package: run `uv sync --extra ray`, then start again"
POLL = 0.2  # seconds between exchanges with the relay (lines out, a cancel request in)
CANCEL_WAIT = 15.0  # seconds past the kill grace a cancelled task may take to report before Ray cancels it by force
ATTEMPTS = 3  # tries of one run when nodes are lost
PREPARED = ".autoresearch-prepared"  # in the node's data cache, per dataset: prepare.py has run there
PREPARE_TIMEOUT = 6 * 3600.0
NODE_LOCAL = ("AUTORESEARCH_CACHE_DIR", "AUTORESEARCH_RUN_DIR")  # paths of the agent's machine: the node has its own
RELAY = "autoresearch-relay"


def import_ray():
    """The ray module, or ExecutorError saying what to install."""
    try:
        import ray
    except ImportError:
        raise ExecutorError(MISSING) from None
    return ray


def connect(address: str):
    """This process joins the cluster at `address` as its driver (once per process); returns the ray module. The
    engine's own package goes with the job (py_modules), so a node needs the project's environment, not its code."""
    ray = import_ray()
    if not ray.is_initialized():
        import tui
        try:
            ray.init(address=address, log_to_driver=False, configure_logging=False,
                     runtime_env={"py_modules": [str(Path(tui.__file__).parent)]})
        except (ConnectionError, RuntimeError, ValueError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise ExecutorError(f"cannot connect to the Ray cluster at {address} ({first}): start one with "
                                f"`ray start --head`, or pass --ray-address HOST:PORT") from None
    return ray


# ---------------------------------------------------------------------------
# The relay: lines from the nodes to the agent, cancel requests from the agent to the nodes
# ---------------------------------------------------------------------------


class Relay:
    """A Ray actor on the agent's node (it lives as long as the agent's Ray job). Per run id: queued events, and the
    cancel reason once there is one."""

    def __init__(self):
        self.events, self.cancels = {}, {}

    def exchange(self, run_id: str, events: list):
        """From a node: its new events; returns the cancel reason (None while the run should go on)."""
        if events:
            self.events.setdefault(run_id, []).extend(events)
        return self.cancels.get(run_id)

    def take(self, run_id: str) -> list:
        return self.events.pop(run_id, [])

    def cancel(self, run_id: str, reason: str) -> None:
        self.cancels.setdefault(run_id, reason)

    def forget(self, run_id: str) -> None:
        self.events.pop(run_id, None)
        self.cancels.pop(run_id, None)


# ---------------------------------------------------------------------------
# On the node
# ---------------------------------------------------------------------------


class _Outbox:
    """The node side of the relay: events are sent in batches every POLL seconds by a thread, which also learns of a
    cancel request and passes it to `on_cancel`."""

    def __init__(self, ray, relay, run_id: str, on_cancel):
        self.ray, self.relay, self.run_id, self.on_cancel = ray, relay, run_id, on_cancel
        self._items, self._lock, self._done = [], threading.Lock(), threading.Event()
        self._thread = threading.Thread(target=self._loop, name="ray-relay", daemon=True)
        self._thread.start()

    def put(self, event) -> None:
        with self._lock:
            self._items.append(event)

    def _flush(self) -> None:
        with self._lock:
            items, self._items = self._items, []
        try:
            reason = self.ray.get(self.relay.exchange.remote(self.run_id, items))
        except Exception:  # the agent's node is unreachable: the run goes on, its log comes back at the end
            return
        if reason:
            self.on_cancel(reason)

    def _loop(self) -> None:
        while not self._done.wait(POLL):
            self._flush()

    def close(self) -> None:
        self._done.set()
        self._thread.join()
        self._flush()


def _tree_hashes(root: Path) -> dict:
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            p = Path(dirpath) / name
            try:
                out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
            except OSError:
                out[str(p.relative_to(root))] = None
    return out


def _unpack(archive: bytes, dest: Path) -> None:
    dest.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        if hasattr(tarfile, "data_filter"):  # no absolute paths, no links out of dest
            tar.extractall(dest, filter="data")
        else:
            tar.extractall(dest)


def node_env(spec_env: dict, run_dir: Path) -> dict:
    """The node's allow-listed environment, then the run's settings (AUTORESEARCH_*, PYTHONDONTWRITEBYTECODE) except
    the agent machine's paths."""
    env = run_env(os.environ)
    env.pop("PYTHONPATH", None)  # the worker's is Ray's (the job's py_modules, the engine's code): not for a trainer
    env.update({k: v for k, v in spec_env.items()
                if (k.startswith("AUTORESEARCH_") and k not in NODE_LOCAL) or k == "PYTHONDONTWRITEBYTECODE"})
    env["AUTORESEARCH_RUN_DIR"] = str(run_dir)
    return env


def ensure_dataset(repo: Path, env: dict, dataset: str, say) -> str | None:
    """Prepare `dataset` in this node's data cache unless it was already: `python prepare.py` of the run's code copy,
    once per node and cache, under a file lock so that two tasks on one node never prepare at once. Returns None, or
    why the dataset cannot be used."""
    import fcntl
    import subprocess

    from tui.sandbox import cache_dir
    if Path(dataset).name != dataset or dataset.startswith("."):
        return f"invalid dataset name {dataset!r}: use letters, digits, '.', '_' and '-'"
    cache = Path(cache_dir(env))
    marker = cache / dataset / PREPARED
    if marker.exists():
        return None
    try:
        cache.mkdir(parents=True, exist_ok=True)
        with open(cache / ".autoresearch-prepare.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also when the task is killed
            if marker.exists():  # another task prepared it while this one waited
                return None
            say(f"preparing the dataset {dataset} in this node's cache {cache} (once per node)")
            try:
                p = subprocess.run([sys.executable, "prepare.py"], cwd=repo, env=env, capture_output=True,
                                   text=True, timeout=PREPARE_TIMEOUT, stdin=subprocess.DEVNULL)
            except (OSError, subprocess.TimeoutExpired) as e:
                return f"could not prepare the dataset {dataset} on the node: {e}"
            if p.returncode != 0:
                last = (p.stderr.strip() or p.stdout.strip() or f"exit code {p.returncode}").splitlines()[-1]
                return f"could not prepare the dataset {dataset} on the node (uv run prepare.py there): {last[:300]}"
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.touch()
    except OSError as e:
        return f"could not prepare the dataset {dataset} in {cache} on the node: {e}"
    return None


def _crash(why: str, t0: float) -> RunOutcome:
    return RunOutcome(returncode=None, final=None, failed=False, timed_out=False, stopped=None,
                      seconds=time.monotonic() - t0, log_path=None, tail=[why], cut=why)


def node_run(spec: RunSpec, archive: bytes, relay, run_id: str, kill_grace: float, sandbox: str) -> dict:
    """The Ray task: one local run of the archived commit on this node. Returns {"outcome", "log", "node"}."""
    import ray
    ctx = ray.get_runtime_context()
    node = f"{ctx.get_node_id()[:12]} ({ray.util.get_node_ip_address()})"
    t0 = time.monotonic()
    base = Path(tempfile.mkdtemp(prefix="autoresearch-ray-"))
    repo, log_path = base / "repo", base / "run.log"
    run_dir = base / "work" / Path(spec.run_dir).name
    handle = None
    outbox = _Outbox(ray, relay, run_id, lambda reason: handle.cancel(reason) if handle is not None else None)

    def say(text: str) -> None:
        outbox.put(("line", ParsedLine(text)))
    try:
        outbox.put(("node", node))
        _unpack(archive, repo)
        before = _tree_hashes(repo)
        env = node_env(spec.env, run_dir)
        problem = ensure_dataset(repo, env, spec.dataset, say)
        if problem:
            return {"outcome": _crash(problem, t0), "log": problem.encode() + b"\n", "node": node}
        local = replace(spec, log_path=log_path, run_dir=run_dir, env=env, python=sys.executable)
        try:
            executor = LocalExecutor(repo, kill_grace, sandbox)
            level, text = executor.sandbox.describe()
            if level != "info":  # e.g. no bubblewrap on this node: the agent's user must hear of it
                say(f"[autoresearch: on Ray node {node}: {text}]")
            handle = executor.submit(local)
        except ExecutorError as e:
            return {"outcome": _crash(str(e), t0), "log": str(e).encode() + b"\n", "node": node}
        outcome = handle.wait(on_line=lambda pl: outbox.put(("line", pl)))
        after = _tree_hashes(repo)
        changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
        if changed and outcome.stopped is None:
            outcome = replace(outcome, cut=f"the run changed its code on the node ({', '.join(changed[:5])}): "
                                           f"a crash, whatever it printed")
        try:
            log = log_path.read_bytes()
        except OSError:
            log = b""
        return {"outcome": replace(outcome, log_path=None), "log": log, "node": node}
    finally:
        outbox.close()
        remove_tree(base)


# ---------------------------------------------------------------------------
# On the agent
# ---------------------------------------------------------------------------


class RayRun(RunHandle):
    """One run on the cluster, submitted again (up to `attempts` times) when its node is lost."""

    pid = None  # no local process: the run's processes are on a node

    def __init__(self, executor: "RayExecutor", spec: RunSpec, archive: bytes):
        self.ex, self.spec, self.archive = executor, spec, archive
        self.ray = executor.ray
        self._reason: str | None = None
        self._lock = threading.Lock()
        self.attempt, self.notes = 0, []
        self._submit()

    def _submit(self) -> None:
        self.attempt += 1
        self.run_id = f"{self.spec.label or 'run'}-{uuid.uuid4().hex[:12]}"
        self.ref = self.ex.task.remote(self.spec, self.archive, self.ex.relay, self.run_id, self.ex.kill_grace,
                                       self.ex.sandbox)
        self.node = None
        self._cancel_sent = self._forced = None

    def cancel(self, reason: str) -> None:
        with self._lock:
            self._reason = self._reason or reason

    def _log_line(self, text: str) -> None:
        try:
            with open(self.spec.log_path, "a", encoding="utf-8") as f:
                f.write(text.rstrip("\n") + "\n")
        except OSError:
            pass

    def _say(self, text: str, on_line) -> None:
        self._log_line(text)
        if on_line is not None:
            on_line(ParsedLine(text))

    def _pump(self, on_line) -> None:
        """Events from the node: its lines go to the log file (live, for --watch) and to on_line."""
        for kind, value in self.ray.get(self.ex.relay.take.remote(self.run_id)):
            if kind == "node":
                self.node = value
                self._say(f"[autoresearch: {self.spec.label} runs on Ray node {value}, attempt {self.attempt}]",
                          on_line)
            else:
                self._log_line(value.text)
                if on_line is not None:
                    on_line(value)

    def _handle_cancel(self, now: float) -> None:
        reason = self._reason
        if reason is None:
            return
        if self._cancel_sent is None:
            self._cancel_sent = now
            self.ex.relay.cancel.remote(self.run_id, reason)
            if self.node is None:  # still waiting for a node: it never starts
                self.ray.cancel(self.ref)
        elif not self._forced and now - self._cancel_sent > self.ex.kill_grace + CANCEL_WAIT:
            self._forced = True
            self.ray.cancel(self.ref, force=True)

    def _stopped(self, reason: str, t0: float) -> RunOutcome:
        return RunOutcome(returncode=None, final=None, failed=False, timed_out=False, stopped=reason,
                          seconds=time.monotonic() - t0, log_path=self.spec.log_path)

    def wait(self, on_line=None) -> RunOutcome:
        ray, exc = self.ray, self.ray.exceptions
        lost = (exc.NodeDiedError, exc.WorkerCrashedError, exc.ObjectLostError)  # the node or its worker is gone
        t0 = time.monotonic()
        self.spec.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.spec.log_path.write_bytes(b"")
        try:
            while True:
                done, _ = ray.wait([self.ref], timeout=POLL)
                self._pump(on_line)
                self._handle_cancel(time.monotonic())
                if not done:
                    continue
                try:
                    result = ray.get(self.ref)
                except exc.TaskCancelledError:
                    return self._stopped(self._reason or "cancelled", t0)
                except lost as e:
                    if self._reason:
                        return self._stopped(self._reason, t0)
                    why = type(e).__name__  # Ray's message is a paragraph; the node is named already
                    where = f"Ray node {self.node}" if self.node else "its Ray node"
                    if self.attempt >= self.ex.attempts:
                        text = (f"{self.spec.label}: {where} was lost mid-run ({why}), attempt {self.attempt} of "
                                f"{self.ex.attempts}: giving up")
                        self._say(f"[autoresearch: {text}]", on_line)
                        return replace(_crash(text, t0), log_path=self.spec.log_path)
                    note = f"{where} was lost mid-run ({why}); run again from the start"
                    self.notes.append(f"attempt {self.attempt}: {note}")
                    self._say(f"[autoresearch: {self.spec.label}: {note} (attempt {self.attempt + 1} of "
                              f"{self.ex.attempts})]", on_line)
                    self.ex.relay.forget.remote(self.run_id)
                    self._submit()
                    continue
                except exc.RayTaskError as e:  # an error of ours on the node: a crash with its last line
                    last = (str(e).strip().splitlines() or [type(e).__name__])[-1][:300]
                    text = f"the Ray task failed on {self.node or 'its node'}: {last}"
                    self._say(f"[autoresearch: {text}]", on_line)
                    return replace(_crash(text, t0), log_path=self.spec.log_path)
                self._pump(on_line)
                return self._finish(result)
        except BaseException:  # a forced exit of the agent: the run on the node must not go on
            ray.cancel(self.ref, force=True)
            raise
        finally:
            self.ex.relay.forget.remote(self.run_id)

    def _finish(self, result: dict) -> RunOutcome:
        """The node's outcome with the log at spec.log_path: the node's bounded log, after the lines saying where it
        ran (and which attempts were lost)."""
        head = "".join(f"[autoresearch: {n}]\n" for n in self.notes)
        head += f"[autoresearch: {self.spec.label} ran on Ray node {result['node']}, attempt {self.attempt}]\n"
        try:
            self.spec.log_path.write_bytes(head.encode() + result["log"])
        except OSError:
            pass
        note = "; ".join(self.notes) or None
        return replace(result["outcome"], log_path=self.spec.log_path, worker=f"ray:{result['node']}", note=note)


class RayExecutor(Executor):
    """Runs on the Ray cluster at `address` ("auto": the one started on this machine, or RAY_ADDRESS)."""

    def __init__(self, repo, address: str = "auto", kill_grace: float = KILL_GRACE, sandbox: str = "auto",
                 resources: dict | None = None, attempts: int = ATTEMPTS):
        self.repo = Path(repo)
        self.address, self.kill_grace, self.sandbox = address or "auto", kill_grace, sandbox
        self.resources, self.attempts = dict(resources) if resources else None, attempts
        self.ray = self.task = self.relay = None

    def prepare(self, log) -> None:
        ray = self.ray = connect(self.address)
        total = ray.cluster_resources()
        want = self.resources or ({"GPU": 1} if total.get("GPU") else {"CPU": 1})
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        if not any(all(n.get("Resources", {}).get(k, 0) >= v for k, v in want.items()) for n in nodes):
            raise ExecutorError(f"no node of the Ray cluster at {self.address} has {want} (the cluster has "
                                f"{ {k: v for k, v in total.items() if not k.startswith('node:')} }): start the "
                                f"nodes with these resources, or choose others with --ray-resources")
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self.relay = ray.remote(num_cpus=0)(Relay).options(
            name=f"{RELAY}-{os.getpid()}", get_if_exists=True, scheduling_strategy=here).remote()
        gpus = want.pop("GPU", 0)
        cpus = want.pop("CPU", 0)
        self.task = ray.remote(node_run).options(num_cpus=cpus, num_gpus=gpus, resources=want, max_retries=0,
                                                 scheduling_strategy="SPREAD")
        log(f"experiments run as Ray tasks on the cluster at {self.address} ({len(nodes)} nodes), each asking for "
            f"{self.resources or {'GPU' if gpus else 'CPU': 1}}; a node gets the commit's tracked files only (git "
            f"archive) and runs it in its own sandbox (--sandbox {self.sandbox})", "info")

    def submit(self, spec: RunSpec) -> RayRun:
        try:
            archive = GitRepo(self.repo).archive(spec.commit)
        except GitError as e:
            raise ExecutorError(f"cannot archive {spec.commit[:7]} for the Ray cluster: {e}") from None
        return RayRun(self, spec, archive)
