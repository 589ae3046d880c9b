"""run_suite.py as a user runs it: two tiny datasets converted from a local Hugging Face-style server, the headless
agent with a fake LLM server and the stand-in trainer on each, interrupted with SIGINT mid-training, then resumed."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

import datagen
from fakes.agent import TEST_KEY, hp_answer, trainer_pid, wait_for
from fakes.llm_servers import FakeLLMServer
from fakes.repo import agent_repo, git
from test_datasets import Hub, parquet_bytes
from tui.credentials import is_child_hidden
from tui.results import ResultsFile

ROOT = Path(__file__).resolve().parent.parent
SUITE = ROOT / "run_suite.py"
DATASETS = "tinystories,cosmopedia-v2"


def suite_env(cache, endpoint):
    env = {k: v for k, v in os.environ.items() if not is_child_hidden(k) and not k.startswith(("AUTORESEARCH_", "HF_"))}
    env.update(ANTHROPIC_API_KEY=TEST_KEY, PYTHONUNBUFFERED="1", AUTORESEARCH_CACHE_DIR=str(cache),
               AUTORESEARCH_SHARD_ROWS="100", AUTORESEARCH_PROFILE="cpu", AUTORESEARCH_CPU_PEAK_FLOPS="1e11",
               AUTORESEARCH_FAKE_PRINT_ENV="1", HF_ENDPOINT=endpoint)
    return env



def statuses(repo, ds):
    """(exp, status, dataset, tag) per experiment: the last row of each (an experiment may run several times)."""
    last = {}
    for r in ResultsFile(repo / "results" / ds / "results.tsv").load():
        last[r.exp] = (f"exp{r.exp}", r.status, r.dataset, r.tag)
    return list(last.values())


@pytest.fixture
def world(tmp_path):
    """A repo with the stand-in trainer, a fake LLM server, and a Hub serving two datasets in two formats."""
    repo = agent_repo(tmp_path / "repo")
    server = FakeLLMServer("anthropic").start()
    with Hub() as hub:
        import convert_dataset
        stories = datagen.make_documents(230, seed=1, max_words=40)
        hub.publish("roneneldan/TinyStories", "TinyStoriesV2-GPT4-train.txt",
                    "\n<|endoftext|>\n".join(stories).encode(), convert_dataset.REGISTRY["tinystories"].revision)
        hub.publish("HuggingFaceTB/smollm-corpus", "cosmopedia-v2/train-00000-of-00104.parquet",
                    parquet_bytes({"text": datagen.make_documents(230, seed=2, max_words=40)}),
                    convert_dataset.REGISTRY["cosmopedia-v2"].revision)
        yield repo, server, suite_env(tmp_path / "cache", hub.endpoint)
    server.stop()


def suite(repo, env, *args, timeout=120):
    return subprocess.run([sys.executable, str(SUITE), "--repo", str(repo), *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


def agent_args(server):
    # the single-run keep rule: one row per experiment (the suite passes any --keep-rule through)
    return ["--script", "train.py", "--model", "claude-sonnet-4-6", "--base-url", server.base_url, "--timeout", "60",
            "--keep-rule", "single"]


def test_suite_prepares_runs_is_interrupted_and_resumes(world):
    repo, server, env = world
    base = git(repo, "rev-parse", "HEAD").strip()

    r = suite(repo, env, "--datasets", DATASETS, "--tag", "s1", "--num-shards", "1", "--prepare-only")
    assert r.returncode == 0, r.stdout + r.stderr
    manifest = json.loads((repo / "results" / "suite-s1.json").read_text())
    assert set(manifest["datasets"]) == {"tinystories", "cosmopedia-v2"}
    assert all(e["fingerprint"].startswith("text:") and e["train_shards"] == 1 for e in manifest["datasets"].values())
    assert git(repo, "branch", "--list", "autoresearch/*").strip() == ""          # preparing touches no branch

    # tinystories runs to --max; cosmopedia-v2's first experiment is slow and gets interrupted
    server.push(server.text(hp_answer("raise LR", lr=0.02)), server.text(hp_answer("LR too high", lr=0.05)),
                server.text(hp_answer("slow run", mode="slow")))
    p = subprocess.Popen([sys.executable, str(SUITE), "--repo", str(repo), "--datasets", DATASETS, "--max", "3",
                          "--tag", "s1", *agent_args(server)], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    log = repo / "results" / "cosmopedia-v2" / "runs" / "exp1.log"
    try:
        wait_for(lambda: log.exists() and "step 00001" in log.read_text(errors="replace"), timeout=60)
        trainer = trainer_pid(repo)
        p.send_signal(signal.SIGINT)
        out, _ = p.communicate(timeout=30)
    finally:
        p.kill()
    assert p.returncode == 130, out
    assert "passed to the running child" in out and "--skip-completed" in out and "Traceback" not in out
    assert not psutil.pid_exists(trainer) or psutil.Process(trainer).status() == psutil.STATUS_ZOMBIE
    assert statuses(repo, "tinystories") == [("exp0", "keep", "tinystories", "s1-tinystories"),
                                             ("exp1", "keep", "tinystories", "s1-tinystories"),
                                             ("exp2", "discard", "tinystories", "s1-tinystories")]
    assert statuses(repo, "cosmopedia-v2") == [("exp0", "keep", "cosmopedia-v2", "s1-cosmopedia-v2")]
    assert git(repo, "log", "--format=%s", "autoresearch/s1-cosmopedia-v2").splitlines() == ["initial"]  # reverted
    assert git(repo, "rev-parse", "--abbrev-ref", "HEAD").strip() == "main"    # back where the suite started

    r = suite(repo, env, "--tag", "s1", *agent_args(server))
    assert r.returncode == 1 and "already has results" in r.stderr and "--skip-completed" in r.stderr
    assert r.stderr.count("\n") == 1

    r = suite(repo, env, "--tag", "s1", "--status")
    assert r.returncode == 0
    lines = r.stdout.splitlines()
    assert any(ln.split()[:2] == ["tinystories", "1+val"] and "3/3" in ln and ln.rstrip().endswith("done")
               for ln in lines), r.stdout
    assert any(ln.split()[0] == "cosmopedia-v2" and "1/3" in ln and "stopped" in ln for ln in lines), r.stdout

    # resume: datasets, --max and the agent options come from the suite's record; the finished dataset is skipped
    server.push(server.text(hp_answer("deeper", depth=6)), server.text(hp_answer("shallower", depth=2)))
    r = suite(repo, env, "--tag", "s1", "--skip-completed")
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"--base-url {server.base_url}" in r.stdout
    assert "tinystories: complete (3/3), skipped" in r.stdout
    assert [s[:2] for s in statuses(repo, "cosmopedia-v2")] == [("exp0", "keep"), ("exp1", "keep"),
                                                                ("exp2", "discard")]
    # both branches grew from the suite's start commit, independently of each other
    for ds, subjects in (("tinystories", ["exp1: raise LR", "initial"]),
                         ("cosmopedia-v2", ["exp1: deeper", "initial"])):
        branch = f"autoresearch/s1-{ds}"
        assert git(repo, "merge-base", branch, "main").strip() == base
        assert git(repo, "log", "--format=%s", branch).splitlines() == subjects
    trainer_envs = [json.loads(ln.removeprefix("fake_train env: ")) for log in (repo / "results").glob("*/runs/*.log")
                    for ln in log.read_text().splitlines() if ln.startswith("fake_train env: ")]
    assert {e.get("AUTORESEARCH_DATASET") for e in trainer_envs} == {"tinystories", "cosmopedia-v2"}
    assert (repo / "results" / "tinystories" / "runs" / "exp2.log").exists()      # each dataset keeps its own logs
    assert git(repo, "status", "--porcelain", "--untracked-files=no").strip() == ""


def test_a_dataset_that_changed_under_a_suite_is_refused(world):
    repo, _, env = world
    r = suite(repo, env, "--datasets", "tinystories", "--tag", "s2", "--num-shards", "1", "--prepare-only")
    assert r.returncode == 0, r.stdout + r.stderr
    source = Path(env["AUTORESEARCH_CACHE_DIR"]) / "tinystories" / "source.json"
    m = json.loads(source.read_text())
    m["text_sha256"] = "0" * 64              # as if it had been converted again from other data
    source.write_text(json.dumps(m))
    r = suite(repo, env, "--datasets", "tinystories", "--tag", "s2", "--prepare-only")
    assert r.returncode == 1 and "changed since suite 's2' started" in r.stderr and "new --tag" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("args,message", [
    (["--datasets", "nosuch"], "neither in the registry"),
    (["--datasets", "tinystories,tinystories"], "listed twice"),
    (["--max", "0"], "at least 1"),
    (["--tag", "../x"], "invalid tag"),
    (["--status", "--prepare-only"], "choose one"),
    (["--provider", "nosuch"], "invalid choice: 'nosuch'"),      # agent options are checked before anything runs
    (["--results", "x.tsv"], "--results is set by the suite"),
])
def test_bad_arguments_are_one_line(world, args, message):
    repo, _, env = world
    r = suite(repo, env, *args)
    assert r.returncode in (1, 2) and message in r.stderr and "Traceback" not in r.stderr, r.stderr
