"""Attacks 12, 13 and 14 of issue 12 through the real loop: a scripted LLM returns the hostile edit (file scope), the
stand-in trainer runs it as a real subprocess in a real git repository, with and without the bubblewrap sandbox.

    12  a daemon that outlives its run: setsid double-fork, from a subprocess or from the trainer itself
    13  an output flood: 200 MiB or 600 MiB before the summary (over the output limit), and 48 MiB before it (under)
    14  a full disk: the run fills it; results.tsv and the log cannot be written
"""

import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import psutil
import pytest

from fakes.agent import TEST_KEY, Recorder, file_answer, hp_answer, make_config, needs_bwrap, wait_for
from fakes.repo import agent_repo, git
from tui.orchestrator import Orchestrator
from tui.results import ResultsFile
from tui.training_run import LOG_HEAD, LOG_TAIL, OUTPUT_LIMIT, BoundedLog, MiB

SANDBOXES = ["none", pytest.param("auto", marks=needs_bwrap)]
BACKEND_LINE = 'print("Backend: cpu (cpu)")'
BETTER = ("LEARNING_RATE = 0.01", "LEARNING_RATE = 0.02")  # with it, an edit that trains normally is a keep


@pytest.fixture
def repo(tmp_path):
    return agent_repo(tmp_path / "repo")


def statuses(repo, results=None):
    return [(r.exp, r.status) for r in ResultsFile(results or Path(repo) / "results.tsv").load()]


def notes(repo, exp):
    return next(r.notes for r in ResultsFile(Path(repo) / "results.tsv").load() if r.exp == exp)


def before_training(code: str, description: str, *more) -> str:
    """An answer that runs `code` right after the trainer's first line (and trains at lr 0.02)."""
    return file_answer([(BACKEND_LINE, f"{BACKEND_LINE}\n{code.strip()}"), BETTER, *more], description=description)


class Hooks(Recorder):
    """A Recorder that calls on_start(info) / on_end(result) on the loop's thread."""

    def __init__(self, on_start=None, on_end=None):
        super().__init__()
        self.on_start, self.on_end = on_start, on_end

    def on_experiment_start(self, info):
        super().on_experiment_start(info)
        if self.on_start:
            self.on_start(info)

    def on_experiment_end(self, result):
        super().on_experiment_end(result)
        if self.on_end:
            self.on_end(result)


# ---------------------------------------------------------------------------
# 12. A daemon that outlives its run
# ---------------------------------------------------------------------------

DAEMONS = {
    # setsid(1) runs a Python that forks and exits: the child, in a new session, is re-parented away from the trainer
    "setsid": 'import subprocess\nsubprocess.Popen(["setsid", sys.executable, "-c", '
              '"import os, time; os.fork() or time.sleep(600)", "{token}"])',
    # the same from inside the trainer: fork, setsid, fork again, the grandchild becomes the daemon
    "fork": 'if os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n'
            '        os.execv(sys.executable, [sys.executable, "-c", "import time; time.sleep(600)", "{token}"])\n'
            '    os._exit(0)',
}


def daemons(token):
    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        if token in (p.info["cmdline"] or []) and p.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(p)
    return found


@pytest.mark.parametrize("sandbox", SANDBOXES)
@pytest.mark.parametrize("how", sorted(DAEMONS))
def test_a_daemon_started_by_a_run_dies_with_the_run(repo, server, sandbox, how):
    token = f"autoresearch-daemon-{uuid.uuid4().hex}"
    # training lasts a second: under bubblewrap the daemon dies the moment the trainer exits, and the test must see it
    # alive first
    server.push(server.text(before_training(DAEMONS[how].format(token=token), "start a helper daemon",
                                            ("STEP_SLEEP = 0.0", "STEP_SLEEP = 0.2"))),
                server.text(file_answer([("DEPTH = 4", "DEPTH = 6")], description="deeper")))
    seen, after_exp1 = [], []

    def on_step(step):
        if rec.of("start")[-1].exp == 1 and not seen:
            wait_for(lambda: daemons(token), timeout=10)  # it really runs, detached from the trainer
            seen.extend(daemons(token))

    def on_end(result):
        if result.exp == 1:
            after_exp1.extend(daemons(token))

    rec = Hooks(on_end=on_end)
    rec.on_step_hook = on_step
    t0 = time.monotonic()
    summary = Orchestrator(make_config(repo, server, scope="file", sandbox=sandbox), [rec]).run()
    try:
        assert summary.ok and seen
        assert after_exp1 == []  # dead before the next experiment started
        assert statuses(repo) == [(0, "keep"), (1, "keep"), (2, "keep")]  # its summary was not lost either
        assert time.monotonic() - t0 < 20  # nor was the drain waiting on the pipe the daemon held
        assert daemons(token) == []
    finally:
        for p in daemons(token):
            p.kill()


@needs_bwrap
def test_a_daemon_dies_with_its_agent_even_on_kill_9(repo, server):
    """The agent as a user runs it, killed with SIGKILL mid-run: nothing of the run may be left. (Without a sandbox
    the daemon would survive: nothing of the agent is left to kill it.)"""
    from test_agent_cli import DASHBOARD, agent_args, clean_env
    token = f"autoresearch-daemon-{uuid.uuid4().hex}"
    server.push(server.text(before_training(DAEMONS["setsid"].format(token=token), "start a helper daemon",
                                            ("STEP_SLEEP = 0.0", "STEP_SLEEP = 0.5"))))
    p = subprocess.Popen([sys.executable, str(DASHBOARD), *agent_args(server, "--max", "2", "--scope", "file")],
                         cwd=repo, env=clean_env(ANTHROPIC_API_KEY=TEST_KEY), stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: daemons(token), timeout=60)
        p.kill()
        p.wait(timeout=10)
        wait_for(lambda: not daemons(token), timeout=10)
    finally:
        p.kill()
        for d in daemons(token):
            d.kill()


# ---------------------------------------------------------------------------
# 13. An output flood
# ---------------------------------------------------------------------------


def flood(mib: int, line_bytes: int) -> str:
    return (f'_block = (b"x" * {line_bytes - 1} + b"\\n") * {65536 // line_bytes}\n'
            f'for _ in range({mib * MiB} // len(_block)):\n'
            f'    sys.stdout.buffer.write(_block)\n'
            f'sys.stdout.buffer.flush()')


class MemoryWatch(Hooks):
    """The agent's (this process's) RSS while experiment `exp` runs: .growth = the peak minus the RSS at its start."""

    def __init__(self, exp):
        super().__init__(self._start, self._end)
        self.exp, self.growth, self._stop = exp, None, threading.Event()

    def _start(self, info):
        if info.exp == self.exp:
            me = psutil.Process()
            base = me.memory_info().rss

            def sample():
                peak = base
                while not self._stop.wait(0.02):
                    peak = max(peak, me.memory_info().rss)
                self.growth = peak - base

            self._thread = threading.Thread(target=sample, daemon=True)
            self._thread.start()

    def _end(self, result):
        if result.exp == self.exp:
            self._stop.set()
            self._thread.join()


def run_flood(repo, server, code, sandbox):
    server.push(server.text(before_training(code, "print a lot")))
    rec = MemoryWatch(exp=1)
    t0 = time.monotonic()
    summary = Orchestrator(make_config(repo, server, max_experiments=2, scope="file", sandbox=sandbox), [rec]).run()
    elapsed = time.monotonic() - t0
    print(f"flood: the agent grew by {rec.growth / MiB:.0f} MiB; 2 experiments in {elapsed:.1f}s")
    return summary, rec, elapsed


@pytest.mark.parametrize("sandbox", SANDBOXES)
@pytest.mark.parametrize("mib", [200, 600])
def test_a_flood_over_the_output_limit_is_a_crash_with_bounded_memory_and_log(repo, server, sandbox, mib):
    summary, rec, elapsed = run_flood(repo, server, flood(mib, 1024), sandbox)
    assert summary.ok and statuses(repo) == [(0, "keep"), (1, "crash")]
    limit = OUTPUT_LIMIT // MiB
    assert f"MiB, over the {limit} MiB output limit (killed)" in notes(repo, 1)
    log = repo / "runs" / "exp1.log"
    assert log.stat().st_size < LOG_HEAD + LOG_TAIL + MiB
    assert b"bytes of output dropped here" in log.read_bytes()
    assert rec.growth < 300 * MiB, f"the agent grew by {rec.growth / MiB:.0f} MiB"
    assert elapsed < 60  # killed at the limit, not after printing it all (which takes minutes)
    assert len(rec.of("output")) < 2 * LOG_HEAD // 1024 + 500  # the screen got a bounded share of the lines


def test_the_log_keeps_the_head_and_the_tail_and_says_what_it_dropped(tmp_path):
    lines = b"".join(b"line %08d\n" % i for i in range(1_000_000))  # 14 MB
    log = BoundedLog(tmp_path / "exp1.log")
    for i in range(0, len(lines), 65536):
        log.write(lines[i:i + 65536])
        assert (tmp_path / "exp1.log").stat().st_size <= LOG_HEAD + 2 * LOG_TAIL + 65536 + 200  # bounded while live
    log.close()
    data = (tmp_path / "exp1.log").read_bytes()
    head, rest = data[:LOG_HEAD], data[LOG_HEAD:]
    note, tail = rest.split(b"]\n", 1)
    assert head == lines[:LOG_HEAD] and lines.endswith(tail) and LOG_TAIL <= len(tail) < LOG_TAIL + 65536
    assert f"{len(lines) - LOG_HEAD - len(tail):,} bytes of output dropped here".encode() in note
    assert log.problem() is None


@pytest.mark.parametrize("sandbox", SANDBOXES)
def test_a_flood_under_the_limit_keeps_its_summary(repo, server, sandbox):
    summary, rec, elapsed = run_flood(repo, server, flood(48, 80), sandbox)  # 630,000 short lines
    assert summary.ok and statuses(repo) == [(0, "keep"), (1, "keep")]
    row = ResultsFile(repo / "results.tsv").load()[1]
    assert row.val_bpb == pytest.approx(1.02) and row.steps == 5
    data = (repo / "runs" / "exp1.log").read_bytes()
    assert len(data) < LOG_HEAD + LOG_TAIL + MiB and b"bytes of output dropped here" in data
    # the log ends where the output did (then the engine's own line on the sealed evaluation)
    assert data.rstrip().rsplit(b"\n", 2)[0].endswith(b"chip:             Fake CPU")
    assert data.rstrip().endswith(b"(prepare.py --evaluate)")
    assert any(line.startswith("chip:") for line in rec.of("output"))  # the held lines reached the screen
    assert rec.growth < 300 * MiB, f"the agent grew by {rec.growth / MiB:.0f} MiB"
    assert elapsed < 90  # generous: a loaded 2-core machine


# ---------------------------------------------------------------------------
# 14. A full disk
# ---------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A 20 MB tmpfs mounted at tmp_path/disk (needs root)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(disk)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {r.stderr.strip()}")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


FILL = '''
with open(os.path.join(os.environ.get("AUTORESEARCH_RUN_DIR", "runs"), "fill.bin"), "wb") as _f:
    while True:
        _f.write(b"\\0" * (1 << 20))
'''


@pytest.mark.parametrize("sandbox", SANDBOXES)
def test_a_run_that_fills_the_disk_is_a_crash_and_the_loop_goes_on(small_disk, server, sandbox):
    repo = agent_repo(small_disk / "repo")
    server.push(server.text(before_training(FILL, "cache everything on disk")),
                server.text(file_answer([BETTER], description="lr 0.02")))
    summary = Orchestrator(make_config(repo, server, scope="file", sandbox=sandbox), [Recorder()]).run()
    assert summary.ok, summary.reason
    assert statuses(repo) == [(0, "keep"), (1, "crash"), (2, "keep")]
    assert "disk full" in notes(repo, 1)
    # what the run wrote is gone (.pycache is the sealed evaluators' own bytecode cache) ...
    assert not [p for p in (repo / "runs" / "work").iterdir() if p.name != ".pycache"]
    assert shutil.disk_usage(small_disk).free > 15 * 10**6  # ... and so the space is back


def test_results_on_a_full_disk_wait_for_space(small_disk, repo, server):
    """results.tsv lives on a small disk (a symlink in the repo points to it) whose last free page is taken while
    exp1 trains; the row needs a new page (the file ends just short of a page boundary), so the append fails with
    ENOSPC. The filler goes once the agent says it waits: the row is recorded then, and the loop goes on."""
    server.push(server.text(hp_answer("lr 0.02", lr=0.02)), server.text(hp_answer("deeper", lr=0.02, depth=6)))
    assert Orchestrator(make_config(repo, server, max_experiments=1), [Recorder()]).run().ok  # exp0 only
    results, moved, filler = repo / "results.tsv", small_disk / "results.tsv", small_disk / "filler.bin"
    shutil.move(results, moved)
    results.symlink_to(moved)
    header = moved.read_text().split("\n", 1)[0].split("\t")
    pad = {"tag": "other", "exp": "0", "status": "discard", "commit": "-", "description": ""}
    line = lambda desc: "\t".join({**pad, "description": desc}.get(c, "") for c in header) + "\n"  # noqa: E731
    room = (4096 - 20 - moved.stat().st_size - len(line(""))) % 4096  # another tag's row: none of this run's
    with open(moved, "a") as f:
        f.write(line("x" * room))
    assert moved.stat().st_size % 4096 == 4096 - 20

    def on_step(step):
        if rec.of("start")[-1].exp == 1 and not filler.exists():
            fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
            for chunk in (1 << 20, 4096):
                try:
                    while True:
                        os.write(fd, b"\0" * chunk)
                except OSError:
                    pass
            os.close(fd)
            threading.Thread(target=give_back, daemon=True).start()

    def give_back():
        wait_for(lambda: any("the disk is full" in m for m in rec.logs("warning")), timeout=60)
        filler.unlink()

    rec = Recorder()
    rec.on_step_hook = on_step
    summary = Orchestrator(make_config(repo, server), [rec]).run()
    assert summary.ok, summary.reason
    assert filler.exists() is False and results.is_symlink()
    assert [r for r in statuses(repo) if r[0] > 0] == [(1, "keep"), (2, "keep")]
    assert any("space is back, exp1 recorded" in m for m in rec.logs())


def test_a_results_file_swapped_for_an_endless_device_is_restored(repo, server):
    """A run that puts /dev/zero in the place of results.tsv (without a sandbox it can): the check after the run
    reads no more of it than the agent's own copy (a plain read never ends and fills the memory), then restores it."""
    kill_results = ('import os\nos.unlink("results.tsv"); os.symlink("/dev/zero", "results.tsv")\n')
    server.push(server.text(before_training(kill_results, "swap the results")),
                server.text(file_answer([BETTER], description="lr 0.02")))
    rec = MemoryWatch(exp=1)
    summary = Orchestrator(make_config(repo, server, scope="file", sandbox="none"), [rec]).run()
    assert summary.ok, summary.reason
    assert not (repo / "results.tsv").is_symlink()
    assert [e for e, _ in statuses(repo)] == [0, 1, 2]
    assert rec.growth < 300 * MiB, f"the agent grew by {rec.growth / MiB:.0f} MiB"


def test_a_log_that_cannot_be_written_is_a_crash_and_the_loop_goes_on(repo, server):
    (repo / "runs").mkdir()
    (repo / "runs" / "exp1.log").symlink_to("/dev/full")  # every write: ENOSPC
    server.push(server.text(hp_answer("lr 0.02", lr=0.02)), server.text(hp_answer("deeper", lr=0.02, depth=6)))
    summary = Orchestrator(make_config(repo, server), [Recorder()]).run()
    assert summary.ok, summary.reason
    assert statuses(repo) == [(0, "keep"), (1, "crash"), (2, "keep")]
    assert "disk full while writing the log" in notes(repo, 1)
    assert git(repo, "log", "--format=%s", "autoresearch/t1").splitlines() == ["exp2: deeper", "initial"]
