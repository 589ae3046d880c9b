"""The seam where "run this candidate" happens: Executor.submit(RunSpec) -> RunHandle.

The orchestrator decides what to run and what a result means; an executor only carries a run out. A RunSpec holds
everything a run needs and nothing more, so the same spec can run as a local subprocess (LocalExecutor, here, in a
sandbox: tui.sandbox), or on another machine: the commit and script, the seed, the training budget, the dataset, the
deadline, where the log goes, the run's own writable directory, and the environment (built from an allow-list: a
variable that is not named below never reaches a training process, whatever the user's shell holds; secrets are
removed even from allowed names).

A RunHandle reports while the run goes on (wait(on_line) calls on_line for every output line, on the caller's thread),
can be cancelled from any thread (cancel(reason): the run is killed with everything it spawned), and ends in one
RunOutcome, whose val_bpb comes from the sealed evaluation of the model the trainer exported (tui.sealed), never from
what the trainer printed.
"""

import io
import os
import sys
import tarfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

from tui.atomic import remove_tree
from tui.credentials import scrub_env
from tui.git_repo import GitError, GitRepo
from tui.sandbox import Sandbox, SandboxError, detect
from tui.sealed import PYCACHE, BytecodeCache, Evaluator
from tui.training_run import KILL_GRACE, RunOutcome, TrainingRun

# Variables a training run may see: the process basics, and the settings of the frameworks and libraries it uses.
ENV_NAMES = {"PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ", "TERM", "TMPDIR", "TEMP", "TMP", "SHELL",
             "VIRTUAL_ENV", "PYTHONPATH", "LD_LIBRARY_PATH", "DYLD_LIBRARY_PATH", "XDG_CACHE_HOME",
             "SYSTEMROOT", "SYSTEMDRIVE", "WINDIR", "COMSPEC", "PATHEXT", "USERPROFILE", "APPDATA", "LOCALAPPDATA",
             "NUMBER_OF_PROCESSORS", "PROCESSOR_ARCHITECTURE"}
ENV_PREFIXES = ("AUTORESEARCH_", "LC_", "CUDA_", "NVIDIA_", "HIP_", "ROCR_", "ROCM_", "HSA_", "MLX_", "METAL_", "MTL_",
                "OMP_", "MKL_", "KMP_", "OPENBLAS_", "GOTO_", "PYTORCH_", "TORCH_", "TORCHINDUCTOR_", "TRITON_",
                "CUBLAS_", "CUDNN_", "NCCL_")


def run_env(environ=None, secrets=(), **settings) -> dict:
    """The environment of a training run: the allowed variables of `environ` without secrets, plus `settings`."""
    environ = os.environ if environ is None else environ
    allowed = {k: v for k, v in environ.items() if k in ENV_NAMES or k.upper().startswith(ENV_PREFIXES)}
    env = scrub_env(allowed, secrets)
    env.update({k: str(v) for k, v in settings.items() if v is not None})
    return env


@dataclass(frozen=True)
class RunSpec:
    commit: str  # full sha of the commit whose script runs
    script: str  # path relative to the repository
    seed: int | None  # AUTORESEARCH_SEED (None: the trainer's default)
    budget: float  # training seconds the run is allowed
    dataset: str
    deadline: float  # wall-clock seconds after which the run is killed (budget + startup and evaluation allowance)
    log_path: Path  # written by the executor, never by the run
    # the run's own writable directory (AUTORESEARCH_RUN_DIR in env), empty when it starts, gone after it; its parent
    # holds nothing but run directories (runs/work/): the executor empties it, which also clears what a killed agent
    # left behind
    run_dir: Path
    env: dict = field(default_factory=dict, hash=False)  # from run_env(): the whole environment of the run
    python: str = sys.executable
    label: str = ""  # "exp3" / "exp3 r1", for messages
    run_dir: Path | None = None  # the run's own writable directory (<runs_dir>/work/exp{N}[-run{R}]), created empty
    # before the run and passed as AUTORESEARCH_RUN_DIR: the trainer exports its model there (tui.sealed)


class ExecutorError(RuntimeError):
    """The executor could not start the run (the message says why)."""


class RunHandle:
    """One submitted run."""

    pid: int | None = None  # the local process, while there is one

    def wait(self, on_line=None) -> RunOutcome:
        raise NotImplementedError

    def cancel(self, reason: str) -> None:
        raise NotImplementedError


class Executor:
    # True when a run can write nowhere but its run directory and none of its processes outlives it (bubblewrap):
    # then nothing outside the run directory can have changed because of it (tui.integrity skips its site scan)
    confined = False

    def prepare(self, log) -> None:
        """At startup, before any run: check what the runs will need, and say in the log (log(message, level)) what
        they can reach. Raises ExecutorError when runs cannot be carried out as configured."""

    def submit(self, spec: RunSpec) -> RunHandle:
        raise NotImplementedError


# ---------------------------------------------------------------------------
# Local: a subprocess in the repository's working tree
# ---------------------------------------------------------------------------


class LocalRun(RunHandle):
    def __init__(self, spec: RunSpec, cwd: Path, kill_grace: float, sandbox: Sandbox, repo: Path | None = None,
                 on_end=None, cache: "BytecodeCache | None" = None):
        self.spec = spec
        self.kill_grace = kill_grace
        self._reason: str | None = None
        self._lock = threading.Lock()
        self._on_end = on_end
        self.evaluator = Evaluator(repo or cwd, cache)  # the scoring code as it is before the trainer runs
        argv = sandbox.wrap([spec.python, "-u", spec.script], cwd, spec.run_dir, spec.env)
        tmp = str(spec.run_dir / "tmp")  # the run's temporary files go with its directory
        self.run = TrainingRun(spec.script, cwd, spec.log_path, deadline=spec.deadline, python=spec.python,
                               seed=spec.seed, env=spec.env, extra_env={"TMPDIR": tmp}, kill_grace=kill_grace,
                               should_stop=lambda: self._reason, argv=argv, wrappers=sandbox.wrappers)
        try:
            self.pid = self.run.start()
        except OSError as e:
            self._end()
            raise ExecutorError(f"cannot start {argv[0]} {spec.script}: {e}") from None

    def wait(self, on_line=None) -> RunOutcome:
        self.run.on_line = on_line
        try:
            outcome = self.run.wait()
            return self.evaluator.seal(outcome, self.spec, self.kill_grace, should_stop=lambda: self._reason,
                                       on_line=on_line)
        except BaseException:  # a forced exit (second signal) must not leave the trainer running
            self.run.kill(force=True)
            raise
        finally:  # what the run wrote goes with it (its processes are all dead by now): a full disk has space again
            self._end()

    def _end(self) -> None:
        (self._on_end or remove_tree)(self.spec.run_dir)

    def cancel(self, reason: str) -> None:
        with self._lock:
            self._reason = self._reason or reason

    def kill(self) -> None:
        self.run.kill()


class LocalExecutor(Executor):
    """Runs in the repository itself, in the sandbox `sandbox` names (tui.sandbox.SANDBOXES): the working tree must
    hold spec.commit's script (the orchestrator commits before it submits).

    With snapshot=True (several slots: the work tree holds only the best commit while candidates train beside it) a
    run gets instead the tracked files of spec.commit, from git, in its own directory (RUN_DIR/code, its working
    directory): never the work tree's or the user's untracked files. The sealed evaluation still uses the
    repository's prepare.py. Runs may overlap: submit() clears only run directories that are not in use."""

    def __init__(self, repo, kill_grace: float = KILL_GRACE, sandbox: str = "auto", snapshot: bool = False):
        self.repo = Path(repo)
        self.kill_grace = kill_grace
        self.choice = sandbox
        self.snapshot = snapshot
        self._sandbox: Sandbox | None = None
        self._caches: dict = {}  # runs/work -> its evaluators' BytecodeCache, for the agent's lifetime
        self._active: set = set()  # run directories of runs in progress
        self._active_lock = threading.Lock()

    @property
    def sandbox(self) -> Sandbox:
        if self._sandbox is None:
            try:
                self._sandbox = detect(self.choice)
            except SandboxError as e:
                raise ExecutorError(str(e)) from None
        return self._sandbox

    @property
    def confined(self) -> bool:
        return self.sandbox.kind == "bwrap"

    def prepare(self, log) -> None:
        level, message = self.sandbox.describe()
        log(message, level)

    def submit(self, spec: RunSpec) -> LocalRun:
        with self._active_lock:
            try:
                spec.log_path.parent.mkdir(parents=True, exist_ok=True)
                if spec.run_dir.parent.is_dir():
                    for old in spec.run_dir.parent.iterdir():
                        if old not in self._active and old.name != PYCACHE:  # the cache guards itself
                            remove_tree(old)
                (spec.run_dir / "tmp").mkdir(parents=True)
                self._active.add(spec.run_dir)
            except OSError as e:
                raise ExecutorError(f"cannot prepare the run directory {spec.run_dir}: {e}; free some space or fix "
                                    f"the permissions, then start again") from None
        cwd = self.repo
        if self.snapshot:
            cwd = spec.run_dir / "code"
            try:
                with tarfile.open(fileobj=io.BytesIO(GitRepo(self.repo).archive(spec.commit))) as tar:
                    tar.extractall(cwd, filter="data")
            except (GitError, OSError, tarfile.TarError) as e:
                self._release(spec.run_dir)
                raise ExecutorError(f"cannot check out {spec.commit[:7]} for {spec.label}: {e}") from None
        # the evaluators' bytecode (tui.sealed): the installed one where no run can write; without a sandbox a cache
        # kept across runs, or, with several slots, one of its own (another slot's run trains during the evaluation)
        cache = None
        if not self.confined:
            cache = self._caches.setdefault(spec.run_dir.parent, BytecodeCache(spec.run_dir.parent / PYCACHE)) if (
                not self.snapshot) else BytecodeCache(spec.run_dir / f"{PYCACHE}-{os.urandom(8).hex()}")
        return LocalRun(spec, cwd, self.kill_grace, self.sandbox, repo=self.repo, on_end=self._release, cache=cache)

    def _release(self, run_dir: Path) -> None:
        remove_tree(run_dir)
        with self._active_lock:
            self._active.discard(run_dir)


EXECUTORS = ("local", "ray")


def make_executor(cfg) -> Executor:
    """The executor an AgentConfig (resolved) asks for. The Ray one imports ray only in prepare(), so a missing
    extra is a one-line startup error, not an ImportError here."""
    if cfg.executor == "ray":
        from tui.ray_executor import RayExecutor
        return RayExecutor(cfg.repo, cfg.ray_address, cfg.kill_grace, cfg.sandbox, resources=cfg.ray_resources)
    # several slots: each run trains on its commit's files, unpacked in its run directory, not in the work tree
    return LocalExecutor(cfg.repo, cfg.kill_grace, cfg.sandbox, snapshot=cfg.workers > 1)

