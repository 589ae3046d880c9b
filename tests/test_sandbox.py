"""The training sandbox (tui/sandbox.py) from inside: a probe script runs through the real executor, in a real
repository, and reports what it could reach. Plus what can be checked of the macOS profile on Linux (the command
built, the profile's syntax and parameters), detection without (or with a broken) bubblewrap, and the overhead."""

import json
import os
import pwd
import re
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from fakes.agent import Recorder, make_config, needs_bwrap
from fakes.repo import agent_repo, git
from tui.executor import LocalExecutor, RunSpec, run_env
from tui.orchestrator import Orchestrator
from tui.sandbox import MACOS_PROFILE, SandboxError, bwrap_command, detect, python_dirs, sandbox_exec_command

USER_HOME = pwd.getpwuid(os.getuid()).pw_dir  # the user's home directory, whatever $HOME says

# Tries everything a hostile edit would try, and prints one JSON line of what worked.
PROBE = r'''
import errno, json, os, socket, sys, sysconfig

def attempt(fn):
    try:
        out = fn()
        return "ok" if out is None else out
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))

def write(path):
    with open(path, "w") as f:
        f.write("x")

def listing(path):
    return sorted(os.listdir(path))

def connect():
    s = socket.create_connection(("127.0.0.1", int(os.environ["PROBE_PORT"])), timeout=2)
    s.close()

def cap_eff():
    for line in open("/proc/self/status"):
        if line.startswith("CapEff:"):
            return line.split()[1]

home, run_dir, cache = os.environ["PROBE_HOME"], os.environ["AUTORESEARCH_RUN_DIR"], os.environ["AUTORESEARCH_CACHE_DIR"]
report = {
    "secret": attempt(lambda: open(os.path.join(home, ".ssh", "id_ed25519")).read()),
    "netrc": attempt(lambda: open(os.path.join(home, ".netrc")).read()),
    "user_home": attempt(lambda: listing(os.environ["PROBE_USER_HOME"])),
    "home": attempt(lambda: listing(home)),
    "cache_read": attempt(lambda: open(os.path.join(cache, "data.txt")).read()),
    "cache_write": attempt(lambda: write(os.path.join(cache, "poison.txt"))),
    "repo_write": attempt(lambda: write("prepare.py")),
    "runs_write": attempt(lambda: write(os.path.join("runs", "results-forged.tsv"))),
    "run_dir_write": attempt(lambda: write(os.path.join(run_dir, "scratch.bin"))),
    "tmp_marker": attempt(lambda: open(os.environ["PROBE_TMP_MARKER"]).read()),
    "tmpdir": os.environ.get("TMPDIR"),
    "bus": attempt(lambda: listing("/run")),
    "dbus_env": [k for k in os.environ if k.startswith(("DBUS", "XDG_RUNTIME"))],
    "network": attempt(connect),
    "pid": os.getpid(),
    "agent_visible": attempt(lambda: os.kill(int(os.environ["PROBE_AGENT_PID"]), 0)),
    "cap_eff": cap_eff(),
    # only where it must fail: unsandboxed, as root, this would really write a kernel setting
    "sysctl_write": attempt(lambda: write("/proc/sys/vm/drop_caches")) if os.environ.get("PROBE_SYSCTL") else None,
    # a .pth runs at every start of Python (the agent's too); only where it must fail, like the line above
    "site_write": attempt(lambda: write(os.path.join(sysconfig.get_paths()["purelib"], "probe-planted.pth")))
    if os.environ.get("PROBE_SYSCTL") else None,
}
print("PROBE " + json.dumps(report))
'''


@pytest.fixture
def world(tmp_path, monkeypatch):
    """A repository with the probe as train.py; a home directory with secrets, holding the data cache (as a symlink to
    elsewhere, as a user with a big data disk would have it); a marker file in the real /tmp; a listening socket."""
    repo = agent_repo(tmp_path / "repo", PROBE)
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "id_ed25519").write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    (home / ".netrc").write_text("machine huggingface.co password hf_SECRET\n")
    (home / ".cache").mkdir()
    data = tmp_path / "bigdisk" / "autoresearch"
    data.mkdir(parents=True)
    (data / "data.txt").write_text("shards")
    (home / ".cache" / "autoresearch").symlink_to(data)
    marker = Path("/tmp") / f"autoresearch-probe-{uuid.uuid4().hex}"
    marker.write_text("the agent's /tmp")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("DBUS_SESSION_BUS_ADDRESS", "unix:path=/run/user/0/bus")
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/0")
    yield repo, home, marker, listener.getsockname()[1]
    listener.close()
    marker.unlink()


def probe(world, sandbox):
    repo, home, marker, port = world
    run_dir = repo / "runs" / "work" / "exp0"
    env = run_env(AUTORESEARCH_RUN_DIR=run_dir, AUTORESEARCH_CACHE_DIR=home / ".cache" / "autoresearch",
                  PROBE_HOME=home, PROBE_USER_HOME=USER_HOME, PROBE_TMP_MARKER=marker,
                  PROBE_PORT=port, PROBE_AGENT_PID=os.getpid(), PROBE_SYSCTL="1" if sandbox != "none" else None)
    spec = RunSpec(commit="-", script="train.py", seed=None, budget=1.0, dataset="d", deadline=30.0,
                   log_path=repo / "runs" / "exp0.log", run_dir=run_dir, env=env)
    outcome = LocalExecutor(repo, 1.0, sandbox).submit(spec).wait()
    line = next((ln for ln in outcome.tail if ln.startswith("PROBE ")), None)
    assert line, outcome.tail
    return json.loads(line[len("PROBE "):])


@needs_bwrap
def test_a_run_in_bubblewrap_reaches_only_its_own_directory_and_the_data(world):
    r = probe(world, "auto")
    assert r["secret"] == r["netrc"] == "ENOENT"  # $HOME is an empty tmpfs ...
    assert r["home"] == [".cache"]  # ... except the data cache, put back at its path
    # the user's real home directory is hidden too, but for the Python installation that may live there (pyenv here)
    python_there = {Path(d).relative_to(USER_HOME).parts[0] for d in python_dirs(sys.executable, {})
                    if d.startswith(USER_HOME + "/")}
    assert set(r["user_home"]) <= python_there
    assert r["cache_read"] == "shards" and r["cache_write"] == "EROFS"
    assert r["repo_write"] == r["runs_write"] == "EROFS" and r["run_dir_write"] == "ok"
    assert r["tmpdir"].endswith("runs/work/exp0/tmp")
    assert r["tmp_marker"] == "ENOENT"  # a private /tmp
    assert r["bus"] == [] and r["dbus_env"] == []  # no /run/user/<uid>, /run/dbus; no bus address either
    assert r["network"] in ("ENETUNREACH", "ECONNREFUSED", "EHOSTUNREACH")
    assert r["pid"] <= 3 and r["agent_visible"] == "ESRCH"  # its own PID namespace
    assert r["cap_eff"] == "0000000000000000" and r["sysctl_write"] in ("EROFS", "EACCES")  # even as root
    assert r["site_write"] == "EROFS"  # which is why the agent does not scan site-packages around sandboxed runs


@needs_bwrap
def test_site_packages_are_scanned_around_runs_only_when_they_are_not_sandboxed(tmp_path, server):
    """The integrity snapshot of ~16,000 installed files, taken before and compared after every run, costs a
    noticeable share of an experiment's overhead; a bubblewrap run cannot write there (the probe above), so it is
    skipped then, and the startup log says so."""
    for choice, scanned in (("auto", False), ("none", True)):
        repo = agent_repo(tmp_path / choice)
        rec = Recorder()
        assert Orchestrator(make_config(repo, server, max_experiments=1, sandbox=choice), [rec]).run().ok
        line = next(m for m in rec.logs("info") if m.startswith("integrity snapshot"))
        assert ("code files in" in line) == scanned
        assert ("read-only to the sandboxed runs: not scanned" in line) == (not scanned)


def test_without_a_sandbox_the_probe_reaches_everything(world):
    """The same probe unsandboxed: it does see the secrets (so the test above is not vacuous)."""
    r = probe(world, "none")
    assert r["secret"].startswith("-----BEGIN") and r["cache_write"] == "ok" and r["network"] == "ok"
    assert r["dbus_env"] == []  # the allow-listed environment holds no bus address, sandbox or not
    (world[0] / "prepare.py").unlink()  # the probe overwrote it: restore for tidiness
    git(world[0], "checkout", "prepare.py")


def test_bwrap_command_puts_back_only_what_the_run_needs(tmp_path):
    home = tmp_path / "home"
    repo = home / "src" / "autoresearch"
    run_dir = repo / "runs" / "work" / "exp3-run1"
    venv = repo / ".venv"
    for d in (run_dir, venv / "bin", home / ".ssh"):
        d.mkdir(parents=True)
    (venv / "pyvenv.cfg").write_text(f"home = {Path(sys.executable).resolve().parent}\n")
    (venv / "bin" / "python").symlink_to(Path(sys.executable).resolve())
    env = {"HOME": str(home), "PATH": "/usr/bin"}
    cmd = bwrap_command("/usr/bin/bwrap", [str(venv / "bin" / "python"), "-u", "train.py"], repo, run_dir, env)
    text = " ".join(cmd)
    assert cmd[-4:] == ["--", str(venv / "bin" / "python"), "-u", "train.py"]
    assert "--tmpfs /tmp" in text and "--tmpfs /run" in text and f"--tmpfs {USER_HOME}" in text
    assert f"--tmpfs {home}" not in text  # under /tmp here: hidden with it
    assert f"--ro-bind-try {repo} {repo}" in text  # under the hidden home: put back, read-only
    assert f"--ro-bind-try {home}/.cache/autoresearch {home}/.cache/autoresearch" in text
    assert f"--bind {run_dir} {run_dir}" in text and text.index(f"--bind {run_dir}") > text.index(f"{repo} {repo}")
    assert str(home / ".ssh") not in text and "--bind" not in text.replace(f"--bind {run_dir}", "")
    assert f"--ro-bind-try {venv}" not in text  # inside the repository: already visible
    for flag in ("--unshare-net", "--unshare-pid", "--die-with-parent", "--new-session", "--cap-drop"):
        assert flag in cmd
    assert cmd[cmd.index("--chdir") + 1] == str(repo)


# ---------------------------------------------------------------------------
# macOS: what can be checked here
# ---------------------------------------------------------------------------


def sexp_forms(text: str) -> list:
    """Parse SBPL text (S-expressions, ; comments, "strings", #"regexes") into nested lists; fails when unbalanced."""
    tokens = re.findall(r';[^\n]*|#?"(?:[^"\\]|\\.)*"|[()]|[^\s()";]+', text)
    stack = [[]]
    for tok in tokens:
        if tok.startswith(";"):
            continue
        if tok == "(":
            stack.append([])
        elif tok == ")":
            assert len(stack) > 1, "unbalanced: ) without ("
            form = stack.pop()
            stack[-1].append(form)
        else:
            stack[-1].append(tok)
    assert len(stack) == 1, "unbalanced: ( without )"
    leftover = re.sub(r';[^\n]*|#?"(?:[^"\\]|\\.)*"|[()]|[^\s()";]+|\s', "", text)
    assert leftover == "", f"unparsed text: {leftover[:40]!r}"
    return stack[0]


def walk(form):
    yield form
    if isinstance(form, list):
        for f in form:
            yield from walk(f)


def test_macos_profile_parses_and_gets_every_parameter_it_uses(tmp_path):
    forms = sexp_forms(MACOS_PROFILE.read_text())
    assert forms[0] == ["version", "1"] and forms[1] == ["allow", "default"]
    used = {f[1].strip('"') for f in walk(forms) if isinstance(f, list) and f[:1] == ["param"]}
    rules = [(f[0], f[1]) for f in forms if isinstance(f, list) and f[0] in ("allow", "deny")]
    # the order that makes last-match-wins do what the comments say
    assert rules.index(("deny", "file-write*")) < rules.index(("allow", "file-write*"))
    assert rules.index(("deny", "network*")) >= 0 and rules[-2:] == [("deny", "file-read*"), ("deny", "mach-lookup")]

    repo, run_dir = tmp_path / "repo", tmp_path / "repo" / "runs" / "work" / "exp1"
    run_dir.mkdir(parents=True)
    link = tmp_path / "link"
    link.symlink_to(repo)
    cmd = sandbox_exec_command("/usr/bin/sandbox-exec", [sys.executable, "-u", "train.py"], link, run_dir,
                               {"HOME": str(tmp_path), "AUTORESEARCH_CACHE_DIR": str(tmp_path / "cache")},
                               user_dir=str(tmp_path / "folders"))
    assert cmd[:3] == ["/usr/bin/sandbox-exec", "-f", str(MACOS_PROFILE)]
    assert cmd[-3:] == [sys.executable, "-u", "train.py"]
    params = dict(cmd[i + 1].split("=", 1) for i in range(len(cmd) - 3) if cmd[i] == "-D")
    assert set(params) == used
    assert params["REPO"] == str(repo.resolve()) and params["RUN_DIR"] == str(run_dir.resolve())  # resolved paths
    assert params["HOME"] == str(tmp_path) and params["CACHE_DIR"] == str(tmp_path / "cache")
    assert all(os.path.isabs(v) for v in params.values())


# ---------------------------------------------------------------------------
# Detection, and what the agent says at startup
# ---------------------------------------------------------------------------


def path_without_bwrap(tmp_path, fake_bwrap: str | None = None) -> str:
    """A PATH with git and true, and optionally a fake bwrap script; never the real bwrap."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("git", "true"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    if fake_bwrap is not None:
        (bin_dir / "bwrap").write_text(fake_bwrap)
        (bin_dir / "bwrap").chmod(0o755)
    return str(bin_dir)


def test_detect_choices(tmp_path, monkeypatch):
    assert detect("none").kind == "none" and detect("none").problem == ""
    with pytest.raises(SandboxError, match="unknown sandbox 'docker'"):
        detect("docker")
    with pytest.raises(SandboxError, match="not available on linux"):
        detect("sandbox-exec")
    monkeypatch.setenv("PATH", path_without_bwrap(tmp_path))
    assert detect("auto").problem == "bubblewrap (bwrap) is not installed"
    with pytest.raises(SandboxError, match=r"--sandbox bwrap: bubblewrap \(bwrap\) is not installed; install it "
                                           r"\(sudo apt install bubblewrap\)"):
        detect("bwrap")


def test_a_bwrap_that_fails_its_self_test_is_not_used(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", path_without_bwrap(tmp_path, "#!/bin/sh\necho 'bwrap: No permissions to creating new "
                                                            "namespace, likely because the kernel does not allow "
                                                            "non-privileged user namespaces' >&2\nexit 1\n"))
    sb = detect("auto")
    assert sb.kind == "none" and "fails its self-test (bwrap: No permissions" in sb.problem
    assert "unprivileged user namespaces" in sb.problem


@pytest.mark.parametrize("choice", ["auto", "bwrap"])
def test_without_bwrap_the_agent_says_so_loudly_or_refuses(tmp_path, monkeypatch, server, choice):
    repo = agent_repo(tmp_path / "repo")
    monkeypatch.setenv("PATH", path_without_bwrap(tmp_path))
    rec = Recorder()
    summary = Orchestrator(make_config(repo, server, max_experiments=1, sandbox=choice), [rec]).run()
    if choice == "auto":  # runs anyway, with everything else that contains a run still applied
        assert summary.ok and [e.status for e in rec.of("end")] == ["keep"]
        warning = next(m for m in rec.logs("warning") if "sandboxed" in m)
        assert "NOT sandboxed: bubblewrap (bwrap) is not installed" in warning
        assert "home directory (API keys, SSH keys, tokens)" in warning and "sudo apt install bubblewrap" in warning
    else:  # refused before touching the repository
        assert not summary.ok and "--sandbox bwrap: bubblewrap (bwrap) is not installed" in summary.reason
        assert git(repo, "branch", "--list", "autoresearch/*").strip() == ""


@needs_bwrap
def test_bwrap_overhead_per_run_is_small(tmp_path):
    """What the sandbox adds to one run's start (measured: about 30 ms here)."""
    argv = [sys.executable, "-c", "pass"]
    wrapped = detect("bwrap").wrap(argv, tmp_path, None, dict(os.environ))

    def timed(cmd):
        t0 = time.perf_counter()
        for _ in range(5):
            subprocess.run(cmd, check=True, cwd=tmp_path)
        return (time.perf_counter() - t0) / 5

    timed(wrapped)  # warm the page cache
    overhead = timed(wrapped) - timed(argv)
    print(f"bwrap overhead per run: {overhead * 1000:.0f} ms")
    assert overhead < 0.5


def test_the_sandbox_option_reaches_the_config():
    import dashboard
    parser = dashboard.build_parser()
    assert dashboard.agent_config(parser.parse_args(["--agent"])).sandbox == "auto"  # AgentConfig's default
    assert dashboard.agent_config(parser.parse_args(["--agent", "--sandbox", "bwrap"])).sandbox == "bwrap"
    with pytest.raises(SystemExit):
        parser.parse_args(["--agent", "--sandbox", "docker"])
    with pytest.raises(SystemExit):  # an agent option
        dashboard.main(["--sandbox", "none"])
