"""Where a training run can reach: the sandbox its command is wrapped in.

The training script is written by an LLM: it is run as hostile code. What it may touch:

    Linux, bubblewrap (bwrap_command):
        /                     read-only (the system, the venv and its site-packages, the repository)
        the run's directory   writable: RunSpec.run_dir (runs/work/expN), emptied before and removed after the run;
                              TMPDIR points into it. The log is written by the agent, not the run.
        $HOME, /home, /root   empty tmpfs: keyrings, ~/.config, ~/.ssh, ~/.netrc, tokens are not there. Put back
                              read-only where the run needs them: the repository, the data cache, the Python
                              installation (pyenv, uv and conda keep it in the home directory)
        /tmp, /var/tmp        private tmpfs
        /run (/var/run)       empty tmpfs: the D-Bus session and system buses, Docker's and other daemons' sockets
                              are gone (a read-only mount does not stop connect() on a Unix socket)
        /proc, /dev           its own: the PID namespace's /proc (/proc/sys read-only), a minimal /dev plus the
                              GPU device nodes
        network               none (its own empty network namespace)
        processes             its own PID namespace: when the trainer exits or is killed, the kernel kills every
                              process left in it (setsid double-forked daemons included); --die-with-parent ends it
                              when the agent dies, even by kill -9; no capabilities, even when the agent is root
    macOS, sandbox-exec (sandbox_exec_command, profile sandbox_macos.sb): writes only in the run's directory and the
        per-user temporary directory, no network, no reading the home directory except the repository, the data cache
        and the Python installation, no keychain. No PID namespace: a daemon that double-forks outlives the run.
    Elsewhere, or when bwrap is missing or broken: nothing (detect() says so, and the agent says it loudly at start).

The data cache is read-only inside: prepare.py builds the token cache (`uv run prepare.py`, its last step), so a
trainer only reads it. A shard changed after prepare.py would make the trainer re-tokenize it, which fails (read-only
file system) and the baseline crash says so: run `uv run prepare.py` again. The CPU peak (backends/hardware.json) is
measured and cached by the agent at startup, before any run; a run that cannot cache it only measures it again.
"""

import functools
import glob
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

SANDBOXES = ("auto", "bwrap", "sandbox-exec", "none")
INSTALL = "sudo apt install bubblewrap"  # Fedora: sudo dnf install bubblewrap; Arch: sudo pacman -S bubblewrap
MACOS_PROFILE = Path(__file__).with_name("sandbox_macos.sb")
SELF_TEST_TIMEOUT = 10.0
TMPFS_SIZE = 256 << 20  # bytes each for the private $HOME and /tmp (tmpfs is RAM); TMPDIR is on disk, in run_dir
HIDE_SIZE = 1 << 20  # the other hidden directories: nothing is meant to be written there
# hidden (empty tmpfs) besides $HOME: other users' homes, shared temporary directories, runtime sockets
HIDDEN = ("/home", "/root", "/tmp", "/var/tmp", "/run", "/var/run")
GPU_DEVICES = ("/dev/nvidia*", "/dev/nvidia-caps", "/dev/dri", "/dev/kfd")  # NVIDIA, DRM render nodes, ROCm


class SandboxError(RuntimeError):
    """The sandbox asked for cannot be used here (the message says why and what to do)."""


@dataclass(frozen=True)
class Sandbox:
    kind: str  # "bwrap" | "sandbox-exec" | "none"
    program: str = ""  # the bwrap / sandbox-exec executable
    problem: str = ""  # kind "none": why there is no sandbox ("" when --sandbox none chose it)
    sized_tmpfs: bool = False  # bwrap knows --size (0.8+): the private $HOME and /tmp are capped

    @property
    def wrappers(self) -> int:
        """Wrapper processes above the trainer: bwrap's monitor and the PID namespace's init (sandbox-exec execs)."""
        return 2 if self.kind == "bwrap" else 0

    def wrap(self, argv: list, repo, run_dir, env: dict) -> list:
        """The command that runs `argv` (python -u script) in the sandbox, in `repo`, with `env`."""
        if self.kind == "bwrap":
            return bwrap_command(self.program, argv, repo, run_dir, env, sized=self.sized_tmpfs)
        if self.kind == "sandbox-exec":
            return sandbox_exec_command(self.program, argv, repo, run_dir, env, darwin_user_dir())
        return list(argv)

    def describe(self) -> tuple:
        """(log level, one line for the start of the log) saying what a run can and cannot reach."""
        if self.kind == "bwrap":
            return "info", ("training runs in a bubblewrap sandbox: repository read-only except its runs/work/ "
                            "directory, no home directory (data cache read-only), private /tmp, no D-Bus, no "
                            "network, own PID namespace")
        if self.kind == "sandbox-exec":
            return "info", ("training runs under sandbox-exec: writes only in its runs/work/ directory and temp, no "
                            "network, no home directory (data cache and repository read-only), no keychain; a "
                            "double-forked daemon can outlive its run (macOS has no PID namespace)")
        exposed = ("the LLM-written training code runs with all your rights: it can read your home directory "
                   "(API keys, SSH keys, tokens), write anywhere you can, use the network and D-Bus")
        if not self.problem:
            return "warning", f"training runs are NOT sandboxed (--sandbox none): {exposed}"
        fix = f"install bubblewrap ({INSTALL})" if sys.platform.startswith("linux") else "run it on Linux or macOS"
        return "warning", (f"training runs are NOT sandboxed: {self.problem}; {exposed}. To sandbox it, {fix}. "
                           f"Still applied: every process of a run is killed with it, output and log are capped, "
                           f"a full disk is a crash")


def detect(choice: str = "auto") -> Sandbox:
    """The sandbox for `choice` (SANDBOXES) on this machine. "auto": the platform's, or none (with the reason);
    "bwrap" / "sandbox-exec": that one or SandboxError; "none": none."""
    if choice not in SANDBOXES:
        raise SandboxError(f"unknown sandbox {choice!r}: choose one of {', '.join(SANDBOXES)}")
    if choice == "none":
        return Sandbox("none")
    linux, mac = sys.platform.startswith("linux"), sys.platform == "darwin"
    if choice == "bwrap" and not linux or choice == "sandbox-exec" and not mac:
        raise SandboxError(f"--sandbox {choice} is not available on {sys.platform}: use --sandbox auto")
    if linux:
        path = shutil.which("bwrap")
        problem = _bwrap_problem(path) if path else "bubblewrap (bwrap) is not installed"
        if not problem:
            return Sandbox("bwrap", path, sized_tmpfs=_bwrap_has_size(path))
        if choice == "bwrap":
            raise SandboxError(f"--sandbox bwrap: {problem}; install it ({INSTALL}) or choose --sandbox auto")
        return Sandbox("none", problem=problem)
    if mac:
        path = shutil.which("sandbox-exec")
        problem = _sandbox_exec_problem(path) if path else "sandbox-exec is missing"
        if not problem:
            return Sandbox("sandbox-exec", path)
        if choice == "sandbox-exec":
            raise SandboxError(f"--sandbox sandbox-exec: {problem}; choose --sandbox auto")
        return Sandbox("none", problem=problem)
    return Sandbox("none", problem=f"no sandbox is supported on {sys.platform}")


@functools.lru_cache(maxsize=None)
def _bwrap_problem(path: str) -> str:
    """"" when bwrap can build the namespaces a run gets; else what goes wrong (e.g. unprivileged user namespaces
    are disabled, or AppArmor restricts them, as on Ubuntu 24.04 without a bwrap profile)."""
    true = shutil.which("true") or "/bin/true"
    cmd = [path, *_BWRAP_ISOLATION, "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp",
           "--", true]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=SELF_TEST_TIMEOUT, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"bwrap does not run ({e})"
    if p.returncode != 0:
        why = (p.stderr.strip().splitlines() or [f"exit code {p.returncode}"])[-1]
        return (f"bwrap fails its self-test ({why}); unprivileged user namespaces may be disabled "
                f"(sysctl kernel.unprivileged_userns_clone=1, or an AppArmor profile for bwrap)")
    return ""


@functools.lru_cache(maxsize=None)
def _bwrap_has_size(path: str) -> bool:
    try:
        p = subprocess.run([path, "--help"], capture_output=True, text=True, timeout=SELF_TEST_TIMEOUT,
                           stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "--size" in p.stdout + p.stderr


@functools.lru_cache(maxsize=None)
def _sandbox_exec_problem(path: str) -> str:
    try:
        p = subprocess.run([path, "-p", "(version 1)(allow default)", "/usr/bin/true"], capture_output=True,
                           text=True, timeout=SELF_TEST_TIMEOUT, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"sandbox-exec does not run ({e})"
    return "" if p.returncode == 0 else f"sandbox-exec fails its self-test ({p.stderr.strip()[:200]})"


# ---------------------------------------------------------------------------
# The paths a run needs
# ---------------------------------------------------------------------------


def _user_home() -> str:
    import pwd  # POSIX only, as the sandboxes are
    return pwd.getpwuid(os.getuid()).pw_dir


def home_dirs(env: dict) -> list:
    """The run's $HOME and the user's home directory (they may differ); "/" is never one."""
    homes = [env.get("HOME"), _user_home()]
    return list(dict.fromkeys(os.path.abspath(h) for h in homes if h and os.path.abspath(h) != "/"))


def cache_dir(env: dict) -> str:
    """The data cache as prepare.py finds it in the run's environment (AUTORESEARCH_CACHE_DIR, ~/.cache/...)."""
    raw = env.get("AUTORESEARCH_CACHE_DIR") or "~/.cache/autoresearch"
    if raw == "~" or raw.startswith("~/"):  # expanded with the run's HOME, as prepare.py will
        raw = (env.get("HOME") or _user_home()) + raw[1:]
    return os.path.abspath(raw)


def python_dirs(python: str, env: dict) -> list:
    """Where the interpreter and its packages live: the venv it belongs to, the installation the venv points to (its
    pyvenv.cfg "home"), the real interpreter's prefix, PYTHONPATH, and the user's site-packages (a run by the agent's
    own interpreter sees them)."""
    exe = Path(os.path.abspath(python))
    dirs = [os.path.realpath(exe).rsplit("/bin/", 1)[0]]
    cfg = exe.parent.parent / "pyvenv.cfg"
    if cfg.is_file():
        dirs.append(str(exe.parent.parent))
        for line in cfg.read_text(encoding="utf-8", errors="replace").splitlines():
            key, _, value = line.partition("=")
            if key.strip() == "home" and value.strip():
                dirs.append(str(Path(value.strip()).parent))
    dirs += [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if os.path.isabs(p)]  # relative: in the repo
    if os.path.realpath(python) == os.path.realpath(sys.executable):
        import site
        if site.ENABLE_USER_SITE:
            dirs.append(site.getusersitepackages())
    return list(dict.fromkeys(os.path.abspath(d) for d in dirs))


def _under(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip("/") + "/")


# ---------------------------------------------------------------------------
# Linux: bubblewrap
# ---------------------------------------------------------------------------

_BWRAP_ISOLATION = ("--die-with-parent",  # the agent dies (even kill -9): so does the run
                    "--new-session",  # no controlling terminal: nothing typed into the agent's terminal (TIOCSTI)
                    "--unshare-net",  # no network: an empty network namespace (loopback only, down)
                    "--unshare-pid",  # its own PID namespace: the kernel kills what is left when the trainer ends
                    "--unshare-ipc",  # no SysV / POSIX shared memory with the agent's processes
                    "--cap-drop", "ALL")  # no capabilities even when the agent runs as root


def bwrap_command(bwrap: str, argv: list, repo, run_dir, env: dict, sized: bool = True) -> list:
    """bwrap ... -- argv: see the module docstring for what the run can reach. Mounts are applied in order: the
    read-only root, the hidden directories (empty tmpfs), what the run needs inside them put back read-only, then the
    run's own directory read-write on top."""
    repo = os.path.realpath(repo)
    hidden = []
    for d in [*home_dirs(env), *HIDDEN]:
        if os.path.isdir(d) and not os.path.islink(d) and not any(_under(d, h) for h in hidden):
            hidden = [h for h in hidden if not _under(h, d)] + [d]
    args = [bwrap, *_BWRAP_ISOLATION, "--ro-bind", "/", "/", "--dev", "/dev"]
    for pattern in GPU_DEVICES:
        for dev in sorted(glob.glob(pattern)):
            args += ["--dev-bind-try", dev, dev]
    args += ["--proc", "/proc", "--ro-bind", "/proc/sys", "/proc/sys",
             "--ro-bind-try", "/proc/sysrq-trigger", "/proc/sysrq-trigger"]
    for d in sorted(hidden, key=len):
        big = d in home_dirs(env) or d == "/tmp"
        if sized:
            args += ["--size", str(TMPFS_SIZE if big else HIDE_SIZE)]
        args += ["--tmpfs", d]
    binds = {}  # destination -> source, for what the run needs from inside the hidden directories
    for path in [repo, cache_dir(env), *python_dirs(argv[0], env)]:
        real = os.path.realpath(path)
        for dest in (path, real):  # the path the run uses, and where it leads (a symlink in $HOME to elsewhere)
            if any(_under(dest, h) for h in hidden):
                binds[dest] = real
    shown = []  # a path bound onto itself makes everything under it visible: no second bind for those
    for dest in sorted(binds, key=len):
        if not (binds[dest] == dest and any(_under(dest, s) and binds[s] == s for s in shown)):
            args += ["--ro-bind-try", binds[dest], dest]
            shown.append(dest)
    if run_dir is not None:
        run_dir = os.path.realpath(run_dir)
        args += ["--bind", run_dir, run_dir]
    args += ["--chdir", repo, "--", *argv]
    return args


# ---------------------------------------------------------------------------
# macOS: sandbox-exec
# ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def darwin_user_dir() -> str:
    """The per-user directory under /private/var/folders (its T/ is $TMPDIR, its C/ holds the Metal shader cache)."""
    try:
        out = subprocess.run(["getconf", "DARWIN_USER_DIR"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        out = ""
    return os.path.realpath(out) if out else os.path.realpath(os.environ.get("TMPDIR", "/private/tmp"))


def sandbox_exec_command(program: str, argv: list, repo, run_dir, env: dict, user_dir: str) -> list:
    """sandbox-exec -f sandbox_macos.sb -D NAME=value ... argv. The profile matches resolved paths (/var is
    /private/var on macOS), so every value is a realpath. Two Python directories are allowed (the venv and the
    installation it points to); PYTHONPATH entries in the home directory are not."""
    pydirs = python_dirs(argv[0], env)
    params = {
        "HOME": (home_dirs(env) or ["/var/empty"])[0],
        "REPO": repo,
        "RUN_DIR": run_dir if run_dir is not None else repo,  # no run directory: a read-only run
        "CACHE_DIR": cache_dir(env),
        "USER_DIR": user_dir,
        "PYTHON_PREFIX": pydirs[0],
        "PYTHON_BASE": pydirs[1] if len(pydirs) > 1 else pydirs[0],
    }
    args = [program, "-f", str(MACOS_PROFILE)]
    for name, value in params.items():
        args += ["-D", f"{name}={os.path.realpath(value)}"]
    return [*args, *argv]
