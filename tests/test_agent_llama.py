"""Opt-in: the real loop through a real local model server (llama.cpp's llama-server, a GGUF model on loopback).

    AUTORESEARCH_TEST_LLAMA_SERVER=/path/to/llama-server AUTORESEARCH_TEST_GGUF=/path/to/model.gguf \\
        uv run pytest -m long tests/test_agent_llama.py -s

Skipped without both variables; marked long (not in the fast suite, not in .ci/run). README.md (agent section) says
how to build the server. The model answers through provider openai at http://127.0.0.1:PORT/v1, the context window
comes from the server's /props, and every call is kept in runs/expN.llm.jsonl; the test prints what each call took.
"""

import json
import os
import socket
import subprocess
import time
import urllib.request

import pytest

from fakes.agent import Recorder, make_config
from fakes.repo import agent_repo
from tui.orchestrator import Orchestrator
from tui.results import ResultsFile

LLAMA = os.environ.get("AUTORESEARCH_TEST_LLAMA_SERVER")
GGUF = os.environ.get("AUTORESEARCH_TEST_GGUF")
N_CTX = 8192
pytestmark = [pytest.mark.long,
              pytest.mark.skipif(not (LLAMA and GGUF), reason="set AUTORESEARCH_TEST_LLAMA_SERVER (a llama-server "
                                                               "binary) and AUTORESEARCH_TEST_GGUF (a model file)")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def llama_server(tmp_path):
    port = free_port()
    threads = os.environ.get("AUTORESEARCH_TEST_LLAMA_THREADS") or str(os.cpu_count() or 1)
    log = open(tmp_path / "llama-server.log", "wb")
    # the GGUF of a base model has no chat template: the server's built-in gemma one, not the model's Jinja. In this
    # process's session: a child of the agent's process in a session of its own is an orphan of a run to the agent
    # (tui.training_run.run_processes), killed when a run ends
    proc = subprocess.Popen([LLAMA, "--host", "127.0.0.1", "--port", str(port), "-m", GGUF, "-c", str(N_CTX),
                             "--no-jinja", "--chat-template", "gemma", "-t", threads],
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"llama-server did not start: {(tmp_path / 'llama-server.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_two_experiments_of_the_real_loop_through_llama_server(tmp_path, llama_server):
    repo = agent_repo(tmp_path / "repo")
    rec = Recorder()
    # structured answers: llama-server turns the response_format schema into a grammar, so even a small base model
    # can only answer in it
    cfg = make_config(repo, provider="openai", base_url=llama_server + "/v1", model="local", max_experiments=3,
                      llm_timeout=900.0, max_tokens=1024, llm_attempts=2, answer_format="json")
    t0 = time.monotonic()
    summary = Orchestrator(cfg, [rec]).run()
    rows = ResultsFile(repo / "results.tsv").load()
    assert [r.exp for r in rows] == [0, 1, 2], summary.reason  # two experiments ran
    assert any(f"LLM context window: {N_CTX:,} tokens (the server's)" in m for m in rec.logs("info"))
    calls = []
    for n in (1, 2):
        lines = (repo / "runs" / f"exp{n}.llm.jsonl").read_text().splitlines()
        calls += [json.loads(line) for line in lines]
    assert calls and all("error" not in c for c in calls), calls  # every request fitted and was answered
    assert all(c["input_tokens"] + c["output_tokens"] <= N_CTX and c["output_tokens"] <= c["max_tokens"]
               for c in calls)
    usable = sum(1 for r in rows[1:] if r.status != "skip")
    # each value's pattern is part of the grammar, so even Gemma 3 270M (a base model) can only write a literal of the
    # kind the block has, each name once, bounded (before: LEARNING_RATE = ",", DEPTH twice, "0.03.03.03..." to the
    # output cap; free text gave nothing usable). What the grammar cannot rule out is an answer restating today's
    # values: the one refusal allowed (2 of 18 experiments over 9 runs; the other 16 trained on the first call)
    restated = ("the edit changes nothing", "the edit changes only comments or whitespace")
    refused = [r.notes for r in rows[1:] if r.status == "skip"]
    assert usable >= 1 and all(any(why in note for why in restated) for note in refused), \
        [(r.status, r.notes) for r in rows[1:]]
    print(f"\nllama-server run: {len(rows) - 1} experiments ({usable} with a usable answer: "
          f"{[r.status for r in rows[1:]]}), {len(calls)} calls, {time.monotonic() - t0:.0f} s in all")
    for c in calls:
        print(f"  exp{c['exp']}: {c['seconds']:.1f} s, {c['input_tokens']} prompt + {c['output_tokens']} answer "
              f"tokens, stop {c['stop_reason']}, {c['output_tokens'] / max(c['seconds'], 1e-9):.1f} tokens/s")
