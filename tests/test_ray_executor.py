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

from fakes.agent import Recorder, gone, hp_answer, hp_block, make_config, run_headless_agent, wait_for
from fakes.repo import FAKE_PREPARE, FAKE_TRAIN, USER_UNTRACKED, agent_repo, git
from tui.orchestrator import Orchestrator
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
    from tui.ray_executor import connect
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
                server.text(hp_answer("depth 6", lr=0.02, depth=6), 1000, 200))
    rec = Recorder()
    cfg = make_config(repo, server, max_experiments=4, timeout=60.0, executor="ray", ray_address=cluster.address,
                      ray_resources={"slot": 1})
    summary = Orchestrator(cfg, [rec]).run()
    assert summary.ok, rec.logs("error")

    assert [(r["exp"], r["status"], r["val_bpb"]) for r in rows(repo)] == [
        ("exp0", "keep", "1.030000"), ("exp1", "keep", "1.020000"), ("exp2", "discard", "1.110000"),
        ("exp3", "keep", "1.000000")]
    assert git(repo, "log", "--format=%s", "autoresearch/t1").splitlines()[0].startswith("exp3: depth 6")
    nodes = log_nodes(repo)
    assert sorted(nodes) == ["exp0", "exp1", "exp2", "exp3"]
    assert {n[:12] for n in nodes.values()} == {cluster.node_id("head")[:12], cluster.node_id("node2")[:12]}
    assert any(s.step is not None for s in rec.of("step")), "progress lines were streamed back"
    assert any("sealed" in line.lower() for line in rec.of("output"))

    # the node had the commit's tracked files, nothing else: no untracked file, no .git, no results or runs
    listed = {json.dumps(sorted(json.loads(line.split("files: ", 1)[1])))
              for log in (repo / "runs").glob("exp*.log") for line in log.read_text().splitlines()
              if line.startswith("files: ")}
    assert listed == {json.dumps([".gitignore", "backends", "docs", "prepare.py", "train.py"])}
    assert (repo / USER_UNTRACKED).exists()
    # the dataset was prepared once for the cluster's (shared) cache, though both nodes ran
    assert (cluster.cache / "prepared.log").read_text() == "testdata\n"
