"""The loop against servers that check what they are sent as real ones do: a context window (llama.cpp's n_ctx, told
at GET /props, or not told), a server without the start-up check endpoint, models whose answers cannot be used; every
reply kept in runs/expN.llm.jsonl. Real temporary git repos, the stand-in trainer, the real SDKs."""

import json
from pathlib import Path

import pytest

from fakes.agent import TEST_KEY, Recorder, file_answer, hp_answer, make_config
from fakes.llm_servers import FakeLLMServer
from fakes.repo import agent_repo
from tui.llm import Usage
from tui.orchestrator import Orchestrator
from tui.results import ResultsFile
from tui.trial import make_row
from tui.watch import experiment_llm_calls


@pytest.fixture
def repo(tmp_path, monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", TEST_KEY)  # the anthropic SDK needs one, even for a local server
    return agent_repo(tmp_path / "repo")


def serve(kind="openai", **options):
    return FakeLLMServer(kind, **options).start()


def run_agent(repo, server, **overrides):
    rec = Recorder()
    orch = Orchestrator(make_config(repo, server, provider=server.kind, **overrides), [rec])
    return orch.run(), rec


def statuses(repo):
    return [(r.exp, r.status) for r in ResultsFile(Path(repo) / "results.tsv").load()]


def refused(server):
    return [r for r in server.chat_requests() if r.body and count_over(server, r.body)]


def count_over(server, body):
    from fakes.llm_servers import count_tokens
    return count_tokens(body) > server.n_ctx


def add_skips(repo, first, count, note_chars=100):
    """Rows of skipped experiments (long notes: a long history for the prompt)."""
    results = ResultsFile(Path(repo) / "results.tsv")
    for n in range(first, first + count):
        results.append(make_row(n, "skip", "(no experiment)", "", None, f"exp{n}: " + "the answer was unusable " * 5,
                                Usage(), dataset="testdata", tag="t1"))


# ---------------------------------------------------------------------------
# Prompts that fit
# ---------------------------------------------------------------------------


def test_a_long_history_is_trimmed_to_the_servers_context_and_the_log_says_so(repo):
    s = serve(n_ctx=3000)
    try:
        run_agent(repo, s, max_experiments=1)  # the baseline
        add_skips(repo, 1, 60)  # ~5,000 tokens of history: the whole prompt is far over 3,000
        s.push(s.text(hp_answer("lr 0.02", lr=0.02)))
        summary, rec = run_agent(repo, s, max_experiments=62, history_len=100, max_tokens=1024)
        assert statuses(repo)[-1] == (61, "keep") and summary.ok
        assert not refused(s)  # the server never had to refuse a prompt
        sent = s.chat_requests()[-1].body
        assert "earlier experiments not shown" in sent["messages"][-1]["content"]
        assert "exp60" in sent["messages"][-1]["content"]  # the newest rows stay, the oldest go
        logs = rec.logs("info")
        assert any("LLM context window: 3,000 tokens (the server's)" in m for m in logs)
        assert any("exp61: the prompt was fitted to the 3,000-token context" in m and "history 61 -> " in m
                   for m in logs)
    finally:
        s.stop()


def test_the_script_view_is_cut_when_even_no_history_does_not_fit(repo):
    s = serve(n_ctx=3000)
    try:
        # an answer of ~450 tokens: all the room the whole prompt would leave is ~370 (llama-server stops there)
        s.push(s.text(file_answer([("LEARNING_RATE = 0.01", "LEARNING_RATE = 0.02")], "lr 0.02",
                                  "A higher learning rate trains faster in a short budget. " * 25)))
        summary, rec = run_agent(repo, s, max_experiments=2, scope="file", max_tokens=1024)
        assert statuses(repo) == [(0, "keep"), (1, "keep")]
        sent = s.chat_requests()[-1].body
        assert not refused(s) and sent["max_tokens"] == 1024
        assert "are not shown: the model's context window is too small" in sent["messages"][-1]["content"]
        assert any("train.py shown up to line" in m for m in rec.logs("info"))
    finally:
        s.stop()


@pytest.mark.parametrize("overflow_500", [False, True])
def test_a_context_overflow_is_not_resent_unchanged(repo, overflow_500):
    # the server does not say its context (no /props): the default 8,192 is too much, the server refuses
    s = serve(n_ctx=2400, props=False, overflow_500=overflow_500)
    try:
        run_agent(repo, s, max_experiments=1)  # the baseline
        add_skips(repo, 1, 40)
        s.push(s.text(hp_answer("lr 0.02", lr=0.02)))
        summary, rec = run_agent(repo, s, max_experiments=42, history_len=100, max_tokens=1024)
        first, second = [r.body for r in s.chat_requests()[-2:]]
        assert count_over(s, first) and not count_over(s, second)
        assert len(json.dumps(second)) < len(json.dumps(first))  # smaller, never the same request again
        assert statuses(repo)[-1] == (41, "keep")
        assert any("asking once more with a smaller request" in m for m in rec.logs("warning"))
        assert not any(state == "waiting" for state, _ in rec.of("state"))  # not retried as if waiting helped
    finally:
        s.stop()


def test_a_context_too_small_for_any_prompt_stops_with_what_to_do(repo):
    s = serve(n_ctx=1500)
    try:
        summary, rec = run_agent(repo, s, max_experiments=3, scope="file", max_tokens=1024)
        assert not summary.ok and "1,500-token context cannot hold" in summary.reason
        assert "-c 16384" in summary.reason and "--scope hparams" in summary.reason
        assert s.chat_requests() == []  # nothing sent that could not fit
    finally:
        s.stop()


# ---------------------------------------------------------------------------
# Start-up checks, unusable answers, the record of every reply
# ---------------------------------------------------------------------------


def test_a_server_without_the_check_endpoint_still_works(repo):
    s = serve("anthropic", check=False)  # llama-server: POST /v1/messages yes, GET /v1/models/<id> 404
    try:
        s.push(s.text(hp_answer("lr 0.02", lr=0.02)))
        summary, rec = run_agent(repo, s, max_experiments=2)
        assert summary.ok and statuses(repo) == [(0, "keep"), (1, "keep")]
        assert any("has no such endpoint" in m and "the first real call decides" in m for m in rec.logs("warning"))
    finally:
        s.stop()


def test_five_unusable_answers_in_a_row_stop_the_loop_with_a_diagnosis(repo):
    s = serve(n_ctx=8192)

    def copy_back(body):  # what a base model without a chat template does: it continues the prompt
        return s.text(body["messages"][0]["content"][:3000])
    s.default_chat = copy_back
    s.push(s.text("Sure, " + "let me think. " * 900))  # runs to the output cap
    try:
        summary, rec = run_agent(repo, s, max_experiments=20, max_tokens=1024)
        assert not summary.ok and len(s.chat_requests()) == 5
        reason = summary.reason
        assert "5 answers in a row" in reason and "could not be used" in reason
        assert "copied the prompt" in reason and "cut at the output cap" in reason
        assert "instruction-tuned" in reason and "chat template" in reason and "--answer-format json" in reason
        assert statuses(repo) == [(0, "keep"), (1, "skip"), (2, "skip"), (3, "skip")]
        assert "max 20" not in reason  # the --max was not silently used up
    finally:
        s.stop()


def test_every_reply_is_kept_redacted_next_to_the_experiment(repo):
    s = serve("anthropic")
    try:
        s.push(s.text(f"I found a key {TEST_KEY} in the output. No fields here.", 900, 30),
               s.text(hp_answer("lr 0.02", lr=0.02), 1200, 80))
        summary, rec = run_agent(repo, s, max_experiments=2)
        assert statuses(repo) == [(0, "keep"), (1, "keep")]
        path = repo / "runs" / "exp1.llm.jsonl"
        text = path.read_text()
        assert TEST_KEY not in text and "[redacted]" in text
        calls = [json.loads(line) for line in text.splitlines()]
        assert [c["input_tokens"] for c in calls] == [900, 1200] and calls[1]["stop_reason"] == "end"
        assert calls[0]["max_tokens"] == calls[1]["max_tokens"] == 2048  # a server on this machine: 2048
        assert all(c["prompt_tokens_estimate"] > 0 and c["prompt_chars"] > 0 and c["seconds"] >= 0 for c in calls)
        assert "lr 0.02" in calls[1]["reply"]
        shown = experiment_llm_calls(repo / "runs", ResultsFile(repo / "results.tsv").load()[1])
        assert "call 1" in shown and "call 2" in shown and "[redacted]" in shown and TEST_KEY not in shown
    finally:
        s.stop()


# ---------------------------------------------------------------------------
# What the screens are told
# ---------------------------------------------------------------------------


def test_the_screen_hears_of_each_call_and_a_retry_keeps_the_experiment_number(repo):
    s = serve("anthropic")
    try:
        s.push(s.error(429, "rate limited", retry_after="0.1"), s.text(hp_answer("lr 0.02", lr=0.02)))
        summary, rec = run_agent(repo, s, max_experiments=2)
        assert statuses(repo) == [(0, "keep"), (1, "keep")]
        states = rec.of("state")
        after = states[[st for st, _ in states].index("waiting") + 1]
        assert after[0] == "thinking" and after[1].startswith("exp1: ") and "retrying the LLM call" in after[1]
        kinds = [e[0] for e in rec.events]
        first_call = next(i for i, e in enumerate(rec.events) if e[0] == "stats" and e[2].failed + e[2].calls)
        assert first_call < kinds.index("end", kinds.index("start", kinds.index("end")))  # before exp1 ends
        assert rec.events[first_call][2].failed == 1  # the refused call counts: no "LLM no calls yet"
    finally:
        s.stop()


def test_the_resume_line_counts_in_the_singular(repo):
    s = serve("anthropic")
    try:
        run_agent(repo, s, max_experiments=1)
        s.push(s.text(hp_answer("lr 0.02", lr=0.02)))
        summary, rec = run_agent(repo, s, max_experiments=2)
        assert any("resuming at exp1: 1 experiment so far (1 kept" in m for m in rec.logs("info"))
        assert "exp0..exp1: 2 experiments with a result" in summary.reason
    finally:
        s.stop()
