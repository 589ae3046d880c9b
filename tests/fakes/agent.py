"""Helpers for driving the orchestrator in tests: scripted answers, an event recorder, a fast config."""

import json
import os
import subprocess
import sys
import time
import threading
from pathlib import Path

import psutil
import pytest

from tui.config import AgentConfig
from tui.credentials import is_child_hidden
from tui.events import AgentListener
from tui.sandbox import detect

HARDWARE = {"chip_name": "Fake CPU", "kind": "cpu", "memory_gb": 16.0, "gpu_cores": None, "peak_flops": 1e11}
TEST_KEY = "sk-ant-api03-TESTSECRET-0123456789abcdef"
STORED_KEY = "sk-ant-api03-STOREDKEY-fedcba9876543210"  # in the keyring of the file_keyring fixture
# tests of what the bubblewrap sandbox prevents (CI installs it: .ci/run)
needs_bwrap = pytest.mark.skipif(detect().kind != "bwrap", reason=f"no bubblewrap sandbox here: {detect().problem}")


def hp_block(lr=0.01, depth=4, mode="ok", steps=5, step_sleep=0.0, extra="") -> str:
    """The stand-in trainer's block; `extra` lines are appended (e.g. a no-op "NULL_EDIT = 3" for null changes)."""
    return (f"LEARNING_RATE = {lr}\nDEPTH = {depth}\nMODE = \"{mode}\"  # ok | crash | hang | slow | stubborn | nan | "
            f"nanbpb | tamper | unicode | noisy\nSTEPS = {steps}\nSTEP_SLEEP = {step_sleep}\n"
            + (extra.rstrip("\n") + "\n" if extra else ""))


def hp_answer(description="raise the learning rate", reasoning="Higher LR trains faster in a short budget.",
              fenced=True, **block) -> str:
    code = hp_block(**block)
    if fenced:
        code = f"```python\n{code}```"
    return f"DESCRIPTION: {description}\nREASONING: {reasoning}\nCODE:\n{code}\n"


def file_answer(edits, description="edit the script", reasoning="Because.") -> str:
    blocks = "".join(f"<<<<<<< SEARCH\n{s}\n=======\n{r}\n>>>>>>> REPLACE\n" for s, r in edits)
    return f"DESCRIPTION: {description}\nREASONING: {reasoning}\n{blocks}"


def make_config(repo, server=None, provider="anthropic", **overrides) -> AgentConfig:
    kwargs = dict(repo=repo, tag="t1", max_experiments=3, provider=provider, script="train.py", timeout=20.0,
                  time_budget=1.0, hardware=dict(HARDWARE), backoff_base=0.01, backoff_cap=0.05, outage_pause=0.0,
                  kill_grace=1.0, llm_timeout=10.0, llm_attempts=3, dataset="testdata",
                  keep_rule="single", noise_runs=1,  # the loop-mechanics tests use the seed's one-run rule
                  answer_format="text")  # ... and script free-text answers (structured ones: test_agent_answers.py)
    if server is not None:
        kwargs["base_url"] = server.base_url
        kwargs["model"] = {"anthropic": "claude-sonnet-4-6", "openai": "gpt-4.1",
                           "ollama": "qwen2.5-coder:7b"}[server.kind]
    kwargs.update(overrides)
    return AgentConfig(**kwargs)


def process_tree(pid) -> list:
    """psutil.Process of pid and of all its descendants: host processes, so a test can see (and check later that
    they died) the processes of a run, also inside a sandbox's PID namespace where the run's own pids mean nothing."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def trainer_pid(repo) -> int:
    """The host pid of the trainer (train.py, not a sandbox wrapper) of the agent running in `repo` (waited for),
    found from the lock's training_pid: inside a sandbox's PID namespace the trainer's own pid means nothing."""
    def find():
        try:  # rewritten in place by the agent: it may be caught empty
            leader = json.loads((Path(repo) / ".agent.lock").read_text()).get("training_pid")
        except ValueError:
            return None
        found = [p.pid for p in process_tree(leader) if p.name() != "bwrap"] if leader else []
        return found[0] if found else None
    wait_for(find)
    return find()


def gone(proc: psutil.Process) -> bool:
    """The process has exited (a zombie counts: it runs nothing). Compares the start time, so a reused pid is gone."""
    try:
        return not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return True


def run_headless_agent(repo, server, *extra, python=sys.executable, **env):
    """dashboard.py --agent --headless (file scope, one-run keep rule) as a real process: what a run can read of its
    parent is what it really is. `env` is added to this environment without its secrets and provider settings."""
    full_env = {k: v for k, v in os.environ.items() if not is_child_hidden(k)}
    full_env.update(PYTHONUNBUFFERED="1", **env)
    args = ["--agent", "--headless", "--tag", "t1", "--model", "claude-sonnet-4-6", "--base-url", server.base_url,
            "--script", "train.py", "--timeout", "30", "--keep-rule", "single", "--noise-runs", "1", "--scope", "file",
            "--sandbox", "none", *extra]  # no sandbox: the mitigations must hold without one
    dashboard = Path(__file__).resolve().parent.parent.parent / "dashboard.py"
    return subprocess.run([str(python), str(dashboard), *args], cwd=repo, env=full_env, capture_output=True,
                          text=True, timeout=240)


class Recorder(AgentListener):
    """Keeps every event; `hooks` run on the orchestrator thread (e.g. to send a command at the first step). Each
    progress line also records the training process tree: .processes (psutil.Process by pid), .commands (their
    command lines)."""

    def __init__(self):
        self.events = []
        self.lock = threading.Lock()
        self.on_step_hook = None
        self.processes, self.commands = {}, {}
        self._pid = None

    def _add(self, *event):
        with self.lock:
            self.events.append(event)

    def on_state(self, state, message):
        self._add("state", state.value, message)

    def on_experiment_start(self, info):
        self._add("start", info)

    def on_training_process(self, pid):
        self._add("pid", pid)
        self._pid = pid

    def on_output(self, line):
        self._add("output", line)

    def on_step(self, step):
        self._add("step", step)
        for p in process_tree(self._pid) if self._pid else []:
            if p.pid not in self.processes:
                try:
                    self.commands[p.pid] = " ".join(p.cmdline())
                except psutil.Error:
                    continue
                self.processes[p.pid] = p
        if self.on_step_hook:
            self.on_step_hook(step)

    def on_experiment_end(self, result):
        self._add("end", result)

    def on_stats(self, summary, usage, extra):
        self._add("stats", summary, usage, extra)

    def on_log(self, level, message):
        self._add("log", level, message)

    def of(self, kind):
        return [e[1:] if len(e) > 2 else e[1] for e in self.events if e[0] == kind]

    def states(self):
        return [e[1] for e in self.events if e[0] == "state"]

    def logs(self, level=None):
        return [e[2] for e in self.events if e[0] == "log" and (level is None or e[1] == level)]

    def text(self) -> str:
        return "\n".join(" ".join(str(x) for x in e[1:]) for e in self.events)


def wait_for(predicate, timeout=90.0):
    """Poll predicate every 50 ms until it is true; fail the test after timeout seconds (generous: an agent starting
    on a loaded 2-core machine spends most of a minute importing torch and the SDKs)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.05)
    raise AssertionError("timed out waiting")
