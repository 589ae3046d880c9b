"""--executor ray end to end: a real Ray cluster on loopback (a head and a second node, each a `ray start --block`
process group of its own, with one custom "slot" resource standing in for a device), the real orchestrator loop, the
stand-in trainer and the scripted LLM server. The cluster is shared by the tests of this module (starting one takes
most of a minute on a loaded 2-core machine); the test that kills the second node runs last."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from fakes.agent import Recorder, gone, hp_answer, make_config, run_headless_agent, wait_for
from fakes.repo import FAKE_PREPARE, FAKE_TRAIN, USER_UNTRACKED, agent_repo, git
from tui.orchestrator import Orchestrator
from tui.ray_executor import CANCEL_WAIT, MISSING, connect
from tui.results import ResultsFile

ray = pytest.importorskip("ray")
RAY = Path(sys.executable).with_name("ray")
# prepare.py run without --evaluate (the node preparing its dataset) leaves a line in the node's cache
COUNTING_PREPARE = FAKE_PREPARE + '''
if __name__ == "__main__" and sys.argv[1:2] != ["--evaluate"]:
    cache = os.environ["AUTORESEARCH_CACHE_DIR"]
    with open(os.path.join(cache, "prepared.log"), "a") as f:
        f.write(os.environ.get("AUTORESEARCH_DATASET", "?") + "\\n")
'''
# the stand-in trainer, also listing the files of its working directory (the node's copy of the repository)
LISTING_TRAIN = FAKE_TRAIN.read_text().replace('print("Backend: cpu (cpu)")',
                                               'print("files: " + json.dumps(sorted(os.listdir("."))))\n'
                                               'print("Backend: cpu (cpu)")')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """`ray start --block` processes, each in its own session; every process whose command line names this cluster's
    directory is ended at stop()."""

    def __init__(self, root: Path):
        self.root, self.port, self.nodes = root, free_port(), {}
        # loopback addresses other than 127.0.0.1, which Ray replaces by the machine's own address: the head is
        # 127.0.0.2, the second node 127.0.0.3 (on Linux all of 127.0.0.0/8 is this machine)
        self.address = f"127.0.0.2:{self.port}"
        self.cache = root / "cache"
        self.cache.mkdir(parents=True)

    def start(self, name: str, ip: str, head: bool = False) -> None:
        tmp = self.root / name
        (tmp / "tmp").mkdir(parents=True)
        # the node's own temporary directory (its runs' copies live there) and data cache (shared by the two nodes:
        # one machine); failures are detected in seconds, so a lost node is noticed quickly
        env = dict(os.environ, TMPDIR=str(tmp / "tmp"), AUTORESEARCH_CACHE_DIR=str(self.cache),
                   RAY_health_check_period_ms="500", RAY_health_check_failure_threshold="4")
        where = ["--head", "--port", str(self.port), "--include-dashboard=false"] if head else [
            "--address", self.address]
        cmd = [str(RAY), "start", *where, "--node-ip-address", ip, "--num-cpus", "1",
               "--resources", json.dumps({"slot": 1}), "--temp-dir", str(tmp / "ray"), "--disable-usage-stats",
               "--block"]
        self.nodes[name] = subprocess.Popen(cmd, env=env, start_new_session=True, stdin=subprocess.DEVNULL,
                                            stdout=open(tmp / "ray-start.log", "wb"), stderr=subprocess.STDOUT)

    def node_id(self, name: str) -> str:
        """The Ray node id of node `name` (found by its object store socket, which lives in its temp dir)."""
        for n in ray.nodes():
            if n["Alive"] and str(self.root / name) in n.get("ObjectStoreSocketName", ""):
                return n["NodeID"]
        raise AssertionError(f"node {name} is not in the cluster")

    def kill(self, name: str) -> None:
        """kill -9 of the node's Ray services (its raylet and agents: the process group of its `ray start`), as when
        the machine is lost; its workers and their runs have to die of it."""
        os.killpg(self.nodes[name].pid, signal.SIGKILL)
        self.nodes[name].wait()

    def processes(self, name: str = "") -> list:
        mark = str(self.root / name)
        found = []
        for p in psutil.process_iter(["cmdline", "cwd"]):
            try:
                if mark in " ".join(p.info["cmdline"] or []) or (p.info["cwd"] or "").startswith(mark):
                    found.append(p)
            except psutil.Error:
                continue
        return [p for p in found if p.pid != os.getpid()]

    def stop(self) -> None:
        for proc in self.nodes.values():
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        for p in self.processes():  # workers (their own process groups) and whatever they left
            try:
                p.kill()
            except psutil.Error:
                pass


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("ray"))
    try:
        c.start("head", "127.0.0.2", head=True)
        wait_for(lambda: _listening(c.port), timeout=120)
        c.start("node2", "127.0.0.3")
        connect(c.address)  # this test process is the driver, as the agent is
        wait_for(lambda: len([n for n in ray.nodes() if n["Alive"]]) == 2, timeout=120)
        yield c
    finally:
        ray.shutdown()
        c.stop()
        wait_for(lambda: not c.processes(), timeout=30)


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.2", port), 0.2).close()
        return True
    except OSError:
        return False


def ray_repo(path, train=LISTING_TRAIN):
    repo = agent_repo(path, train)
    (repo / "prepare.py").write_text(COUNTING_PREPARE)
    git(repo, "commit", "-qam", "prepare.py that counts preparations")
    return repo


def rows(repo):
    return [r.format() for r in ResultsFile(Path(repo) / "results.tsv").load()]


def log_nodes(repo) -> dict:
    """expN(-runR).log -> the node id the log says it ran on."""
    out = {}
    for log in sorted((Path(repo) / "runs").glob("exp*.log")):
        for line in log.read_text().splitlines():
            if " ran on Ray node " in line:
                out[log.stem] = line.split(" ran on Ray node ")[1].split()[0]
    return out


@pytest.mark.slow
def test_experiments_run_on_both_nodes_with_the_commit_tracked_files_only(tmp_path, server, cluster):
    repo = ray_repo(tmp_path / "repo")
    (repo / "notes-untracked.txt").write_text("an untracked file of the user\n")
    server.push(server.text(hp_answer("raise LR to 0.02", lr=0.02), 1000, 200),
                server.text(hp_answer("raise LR to 0.05", lr=0.05), 1000, 200),
                server.text(hp_answer("depth 6", lr=0.02, depth=6), 1000, 200),
                server.text(hp_answer("rewrite prepare.py", lr=0.02, depth=6, mode="tamper"), 1000, 200))
    rec = Recorder()
    # no sandbox here (the other tests run in bubblewrap): what the node itself checks must hold without one
    cfg = make_config(repo, server, max_experiments=5, timeout=60.0, executor="ray", ray_address=cluster.address,
                      ray_resources={"slot": 1}, sandbox="none")
    summary = Orchestrator(cfg, [rec]).run()
    assert summary.ok, rec.logs("error")

    assert [(r["exp"], r["status"], r["val_bpb"]) for r in rows(repo)] == [
        ("exp0", "keep", "1.030000"), ("exp1", "keep", "1.020000"), ("exp2", "discard", "1.110000"),
        ("exp3", "keep", "1.000000"), ("exp4", "crash", "0.000000")]
    assert "the run changed its code on the node (prepare.py)" in rows(repo)[4]["notes"]
    assert git(repo, "log", "--format=%s", "autoresearch/t1").splitlines()[0].startswith("exp3: depth 6")
    nodes = log_nodes(repo)
    assert sorted(nodes) == ["exp0", "exp1", "exp2", "exp3", "exp4"]
    assert {n[:12] for n in nodes.values()} == {cluster.node_id("head")[:12], cluster.node_id("node2")[:12]}
    assert any(s.step is not None for s in rec.of("step")), "progress lines were streamed back"
    assert any("sealed" in line.lower() for line in rec.of("output"))
    assert any("on Ray node" in line and "NOT sandboxed" in line for line in rec.of("output"))

    # the node had the commit's tracked files, nothing else: no untracked file, no .git, no results or runs
    listed = {json.dumps(sorted(json.loads(line.split("files: ", 1)[1])))
              for log in (repo / "runs").glob("exp*.log") for line in log.read_text().splitlines()
              if line.startswith("files: ")}
    assert listed == {json.dumps([".gitignore", "backends", "docs", "prepare.py", "train.py"])}
    assert (repo / USER_UNTRACKED).exists()
    # the dataset was prepared once for the cluster's (shared) cache, though both nodes ran
    assert (cluster.cache / "prepared.log").read_text() == "testdata\n"


SLOW_TRAIN = LISTING_TRAIN.replace("STEPS = 5\n", "STEPS = 40\n").replace("STEP_SLEEP = 0.0\n", "STEP_SLEEP = 0.25\n")


@pytest.mark.slow
def test_skip_stops_the_run_on_its_node_and_records_a_skip(tmp_path, server, cluster):
    """s during a run on the cluster: the node stops the run as a local run stops (its processes die), the outcome
    says skipped, and the loop records the skip, well before Ray would cancel the task by force."""
    repo = ray_repo(tmp_path / "repo", SLOW_TRAIN)
    rec, runs = Recorder(), []
    cfg = make_config(repo, server, max_experiments=1, timeout=60.0, executor="ray", ray_address=cluster.address,
                      ray_resources={"slot": 1})
    orch = Orchestrator(cfg, [rec])

    def skip(step):
        if not runs:
            runs.extend(p for p in cluster.processes() if "train.py" in " ".join(p.cmdline()))
            skipped.append(time.monotonic())
            orch.skip_current()
    rec.on_step_hook, skipped = skip, []
    summary = orch.run()
    assert summary.ok, rec.logs("error")
    assert time.monotonic() - skipped[0] < CANCEL_WAIT, "stopped by the node, not by Ray's forced cancel"
    assert runs and all(gone(p) for p in runs)
    assert [(r["exp"], r["status"]) for r in rows(repo)] == [("exp0", "skip")]


def _hold_slot(started: str, release: str) -> None:
    """A Ray task that keeps a node's slot busy until the file `release` exists."""
    Path(started).touch()
    while not Path(release).exists():
        time.sleep(0.1)


@pytest.mark.slow
def test_a_node_lost_mid_experiment_reruns_it_elsewhere_recorded_once(tmp_path, server, cluster):
    """Runs last: it kills the cluster's second node. The head's slot is held by another task, so the baseline starts
    on node2; at its first step node2's Ray services get kill -9; its worker and the run's processes die of it, the
    run is submitted again and, once the head's slot is free, runs there to the end: one row."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    repo = ray_repo(tmp_path / "repo", SLOW_TRAIN)
    started, release = tmp_path / "held", tmp_path / "release"
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the task's code travels with it
    head, node2 = cluster.node_id("head"), cluster.node_id("node2")
    hold = ray.remote(num_cpus=0, resources={"slot": 1}, max_retries=0)(_hold_slot).options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(head, soft=False)).remote(str(started), str(release))
    wait_for(started.exists, timeout=60)

    rec, victims = Recorder(), []

    def kill_node2(step):
        if not victims and f"runs on Ray node {node2[:12]}" in "\n".join(rec.of("output")):
            victims.extend(cluster.processes("node2"))
            assert any("train.py" in " ".join(p.cmdline()) for p in victims), "the run is on node2"
            cluster.kill("node2")
            release.touch()
    rec.on_step_hook = kill_node2
    cfg = make_config(repo, server, max_experiments=1, timeout=60.0, executor="ray", ray_address=cluster.address,
                      ray_resources={"slot": 1})
    summary = Orchestrator(cfg, [rec]).run()
    ray.get(hold)
    assert summary.ok, rec.logs("error")
    assert victims, "node2 was not killed"
    wait_for(lambda: all(gone(p) for p in victims), timeout=30)  # the worker and the run died with their node

    assert [(r["exp"], r["status"], r["val_bpb"]) for r in rows(repo)] == [("exp0", "keep", "1.030000")]
    log = (repo / "runs" / "exp0.log").read_text()
    assert f"Ray node {node2[:12]}" in log and "was lost mid-run" in log
    assert log_nodes(repo) == {"exp0": head[:12]}
    assert any("was lost mid-run" in line and "attempt 2 of 3" in line for line in rec.of("output"))


def test_executor_ray_without_ray_installed_says_what_to_install(tmp_path, server):
    """dashboard.py --agent --executor ray in a Python where `import ray` fails (sitecustomize blocks it, as a
    missing package would): exit 1 with the one line to act on, before anything runs."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text("import sys\nsys.modules['ray'] = None  # import ray: ImportError\n")
    repo = agent_repo(tmp_path / "repo")
    p = run_headless_agent(repo, server, "--executor", "ray", PYTHONPATH=str(site))
    assert p.returncode == 1, p.stdout + p.stderr
    lines = [line for line in (p.stdout + p.stderr).splitlines() if MISSING in line]
    assert lines and "Traceback" not in p.stdout + p.stderr
    assert "uv sync --extra ray" in MISSING
    assert not (repo / "results.tsv").exists() and not server.requests
