"""dashboard.py as a user runs it: a real subprocess, real signals, kill -9 and restart, key commands."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from fakes.agent import TEST_KEY, hp_answer, needs_bwrap, trainer_pid, wait_for
from fakes.llm_servers import FakeLLMServer
from fakes.repo import agent_repo, git, user_files_state
from tui.credentials import is_child_hidden
from tui.results import ResultsFile

ROOT = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
DASHBOARD = ROOT / "dashboard.py"
BRANCH = "autoresearch/t1"


def clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if not is_child_hidden(k)}
    env.update(PYTHONUNBUFFERED="1", **extra)
    return env


def cli(*args, env=None, cwd=None, input=None, timeout=60):
    return subprocess.run([sys.executable, str(DASHBOARD), *args], capture_output=True, text=True,
                          env=env or clean_env(), cwd=cwd or ROOT, input=input, timeout=timeout)


def agent_args(server, *extra):
    return ["--agent", "--headless", "--tag", "t1", "--model", "claude-sonnet-4-6", "--base-url", server.base_url,
            "--script", "train.py", "--timeout", "30", "--keep-rule", "single", "--noise-runs", "1", *extra]


def start_agent(repo, server, *extra):
    return subprocess.Popen([sys.executable, str(DASHBOARD), *agent_args(server, *extra)], cwd=repo,
                            env=clean_env(ANTHROPIC_API_KEY=TEST_KEY), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)



def training_step_seen(repo, exp):
    log = repo / "runs" / f"exp{exp}.log"
    return log.exists() and "step 00001" in log.read_text(errors="replace")


def alive(pid):
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def statuses(repo):
    return [(f"exp{r.exp}", r.status) for r in ResultsFile(repo / "results.tsv").load()]


def subjects(repo):
    return git(repo, "log", "--format=%s", BRANCH).splitlines()


@pytest.fixture
def repo(tmp_path):
    return agent_repo(tmp_path / "repo")


@pytest.fixture
def server():
    s = FakeLLMServer("anthropic").start()
    yield s
    s.stop()


# ---------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------


def test_help_documents_every_option():
    r = cli("--help")
    assert r.returncode == 0
    for flag in ("--agent", "--headless", "--watch", "--tag", "--max", "--provider", "--model", "--base-url", "--scope",
                 "--timeout", "--script", "--results", "--setup-key", "--check-key", "--clear-key", "SIGINT",
                 "ANTHROPIC_API_KEY", "exit"):
        assert flag in r.stdout, flag


@pytest.mark.parametrize("args,message", [
    (["--agent", "--headless", "--bogus"], "unrecognized arguments: --bogus"),
    (["--agent", "--headless", "--tag", "../evil"], "invalid"),
    (["--agent", "--headless", "--max", "many"], "not a whole number"),
    (["--agent", "--headless", "--max", "0"], "at least 1"),
    (["--agent", "--headless", "--scope", "everything"], "invalid choice"),
    (["--agent", "--headless", "--timeout", "-5"], "must be positive"),
    (["--headless"], "--headless needs --agent"),
    (["--agent", "--headless", "train.py"], "use --script FILE"),
])
def test_bad_arguments_are_usage_errors(args, message):
    r = cli(*args)
    assert r.returncode == 2 and "usage:" in r.stderr and message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("args", [[], ["--watch"], ["--agent"], ["train.py"]])
def test_screen_modes_without_a_terminal_point_to_headless(args):
    r = cli(*args)
    assert r.returncode == 2 and "--agent --headless" in r.stderr and "Traceback" not in r.stderr


# ---------------------------------------------------------------------------
# Headless runs
# ---------------------------------------------------------------------------


def test_headless_end_to_end(repo, server):
    server.push(server.text(hp_answer("raise LR", lr=0.02)), server.text(hp_answer("LR too high", lr=0.05)))
    r = cli(*agent_args(server, "--max", "3"), cwd=repo, env=clean_env(ANTHROPIC_API_KEY=TEST_KEY))
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert all(re.match(r"^(\[\d\d:\d\d:\d\d\] |           )", ln) for ln in lines)
    out = r.stdout
    for needle in ("=== exp1: raise LR", "exp1 KEEP: val_bpb 1.020000", "exp2 DISCARD: val_bpb 1.110000",
                   "summary: reached --max 3", "best val_bpb 1.020000 (exp1)", "cost $0.0120"):
        assert needle in out, needle
    assert statuses(repo) == [("exp0", "keep"), ("exp1", "keep"), ("exp2", "discard")]
    status = json.loads((repo / ".runner_status.json").read_text())
    assert status["alive"] is False and status["state"] == "stopped" and status["best_val_bpb"] == 1.02
    assert status["tag"] == "t1" and status["runs"] == 3


def test_headless_fatal_error_exits_1_with_one_line(repo, server):
    (repo / "docs" / "notes.md").write_text("dirty\n")
    r = cli(*agent_args(server, "--max", "2"), cwd=repo, env=clean_env(ANTHROPIC_API_KEY=TEST_KEY))
    assert r.returncode == 1 and "uncommitted changes in tracked files: docs/notes.md" in r.stderr
    assert "Traceback" not in r.stdout + r.stderr


def test_headless_without_a_key_says_how_to_set_one(repo, server, tmp_path):
    env = clean_env(PYTHON_KEYRING_BACKEND="fakes.test_keyring.FileKeyring", PYTHONPATH=str(TESTS),
                    AUTORESEARCH_TEST_KEYRING=str(tmp_path / "kr.json"))
    r = cli(*agent_args(server, "--max", "2"), cwd=repo, env=env)
    assert r.returncode == 1 and "--setup-key --provider anthropic" in r.stderr


def test_sigint_mid_training_reverts_and_exits_cleanly(repo, server):
    before = user_files_state(repo)
    server.push(server.text(hp_answer("slow run", mode="slow")))
    p = start_agent(repo, server, "--max", "5")
    try:
        wait_for(lambda: training_step_seen(repo, 1))
        trainer = trainer_pid(repo)
        p.send_signal(signal.SIGINT)
        out, _ = p.communicate(timeout=20)
    finally:
        p.kill()
    assert p.returncode == 130, out
    assert "SIGINT: killing the current training run" in out and "summary: stopped on request" in out
    assert not alive(trainer)
    assert statuses(repo) == [("exp0", "keep")]
    assert subjects(repo) == ["initial"]
    assert git(repo, "status", "--porcelain", "--untracked-files=no").strip() == ""
    assert user_files_state(repo) == before
    assert json.loads((repo / ".runner_status.json").read_text())["alive"] is False


def test_second_signal_forces_exit(repo, server):
    # a trainer that ignores SIGTERM makes the clean stop wait kill_grace (5 s); the second signal cuts that short
    server.push(server.text(hp_answer("stubborn run", mode="stubborn")))
    p = start_agent(repo, server, "--max", "5")
    try:
        wait_for(lambda: training_step_seen(repo, 1))
        trainer = trainer_pid(repo)
        t0 = time.monotonic()
        p.send_signal(signal.SIGINT)
        time.sleep(1.0)
        assert alive(trainer) and p.poll() is None  # still waiting for the stubborn trainer
        p.send_signal(signal.SIGINT)
        out, _ = p.communicate(timeout=20)
        elapsed = time.monotonic() - t0
    finally:
        p.kill()
    assert p.returncode == 130 and elapsed < 4.0, out
    assert "forced exit" in out and "Traceback" not in out
    wait_for(lambda: not alive(trainer), timeout=3)
    assert subjects(repo) == ["initial"]  # the forced exit still reverted the experiment commit


@pytest.mark.parametrize("sandbox", ["none", pytest.param("auto", marks=needs_bwrap)])
def test_kill_9_mid_training_then_restart_resumes_consistently(repo, server, sandbox):
    before = user_files_state(repo)
    server.push(server.text(hp_answer("slow run", mode="slow")))
    p = start_agent(repo, server, "--max", "3", "--sandbox", sandbox)
    try:
        wait_for(lambda: training_step_seen(repo, 1))
        orphan = trainer_pid(repo)
        p.kill()  # SIGKILL: no cleanup at all
        p.wait(timeout=10)
    finally:
        p.kill()
    if sandbox == "none":
        assert alive(orphan)  # the trainer survived its agent: the restart must end it
    else:
        wait_for(lambda: not alive(orphan), timeout=5)  # bubblewrap's --die-with-parent: it died with its agent
    assert subjects(repo)[0] == "exp1: slow run" and statuses(repo) == [("exp0", "keep")]

    server.push(server.text(hp_answer("raise LR", lr=0.02)), server.text(hp_answer("LR too high", lr=0.05)))
    r = subprocess.run([sys.executable, str(DASHBOARD), *agent_args(server, "--max", "3", "--sandbox", sandbox)],
                       cwd=repo, env=clean_env(ANTHROPIC_API_KEY=TEST_KEY), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "warning: exp1 was interrupted" in r.stdout
    assert "warning: killed the training run" in r.stdout or sandbox != "none"
    assert not alive(orphan)
    assert statuses(repo) == [("exp0", "keep"), ("exp1", "keep"), ("exp2", "discard")]
    assert subjects(repo) == ["exp1: raise LR", "initial"]
    assert git(repo, "status", "--porcelain", "--untracked-files=no").strip() == ""
    assert user_files_state(repo) == before


def test_second_agent_in_the_same_repo_is_refused(repo, server):
    server.push(server.text(hp_answer("slow run", mode="slow")))
    p = start_agent(repo, server, "--max", "5")
    try:
        wait_for(lambda: training_step_seen(repo, 1))
        r = cli(*agent_args(server, "--max", "5", "--tag", "t2"), cwd=repo, env=clean_env(ANTHROPIC_API_KEY=TEST_KEY))
        assert r.returncode == 1 and f"another agent is already running in this repository (pid {p.pid}" in r.stderr
        status = json.loads((repo / ".runner_status.json").read_text())
        assert status["pid"] == p.pid and status["alive"], "the refused agent must not overwrite the status file"
    finally:
        p.send_signal(signal.SIGINT)
        p.communicate(timeout=20)


# ---------------------------------------------------------------------------
# Key commands
# ---------------------------------------------------------------------------


def test_key_commands_with_a_real_keyring_backend(tmp_path):
    env = clean_env(PYTHON_KEYRING_BACKEND="fakes.test_keyring.FileKeyring", PYTHONPATH=str(TESTS),
                    AUTORESEARCH_TEST_KEYRING=str(tmp_path / "kr.json"))
    key = "sk-ant-api03-VERYSECRET-9876wxyz"
    r = cli("--check-key", env=env)
    assert r.returncode == 1 and "no key found" in r.stdout and "--setup-key" in r.stdout
    r = cli("--setup-key", "--provider", "anthropic", env=env, input=key + "\n")
    assert r.returncode == 0 and "****wxyz" in r.stdout and key not in r.stdout + r.stderr
    assert json.loads((tmp_path / "kr.json").read_text()) == {"autoresearch/anthropic": key}
    r = cli("--check-key", env=env)
    assert r.returncode == 0 and "key from keyring: ****wxyz" in r.stdout and key not in r.stdout
    r = cli("--check-key", env={**env, "ANTHROPIC_API_KEY": "sk-ant-env-key-1111"})
    assert "key from env ANTHROPIC_API_KEY: ****1111" in r.stdout
    r = cli("--check-key", "--provider", "openai", env=env)
    assert r.returncode == 1 and "OPENAI_API_KEY" in r.stdout
    r = cli("--clear-key", env=env)
    assert r.returncode == 0 and "removed the stored key" in r.stdout
    assert cli("--clear-key", env=env).stdout.strip().endswith("no stored key to remove")
    assert cli("--check-key", env=env).returncode == 1
    r = cli("--setup-key", "--check-key", env=env)
    assert r.returncode == 2 and "not allowed with" in r.stderr
