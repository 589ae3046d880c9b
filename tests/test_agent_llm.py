"""The three providers through their real SDKs against local servers, our retry policy, and cost accounting."""

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from fakes.llm_servers import FakeLLMServer
from tui.llm_base import context_numbers
from tui.llm import (Interrupted, LLMError, RetryPolicy, Usage, call_with_retry, estimate_cost, make_provider,
                     parse_retry_after, price_for, run_interruptibly)

ROOT = Path(__file__).resolve().parent.parent
MODELS = {"anthropic": "claude-sonnet-4-6", "openai": "gpt-4.1", "ollama": "qwen2.5-coder:7b"}
MSG = [{"role": "user", "content": "propose something"}]


@pytest.fixture(params=["anthropic", "openai", "ollama"])
def server(request):
    s = FakeLLMServer(request.param).start()
    yield s
    s.stop()


def provider_for(server, timeout=5.0):
    key = None if server.kind == "ollama" else "sk-test-key-123456789"
    return make_provider(server.kind, MODELS[server.kind], key, server.base_url, timeout=timeout, max_tokens=512)


def test_check_and_complete_speak_each_api(server):
    p = provider_for(server)
    p.check()
    server.push(server.text("DESCRIPTION: hi", input_tokens=321, output_tokens=54))
    reply = p.complete("system rules", MSG)
    assert (reply.text, reply.input_tokens, reply.output_tokens) == ("DESCRIPTION: hi", 321, 54)
    req = server.chat_requests()[-1].body
    assert server.prompts() == ["propose something"]
    if server.kind == "anthropic":
        assert req["system"] == "system rules" and req["max_tokens"] == 512
    else:
        assert req["messages"][0] == {"role": "system", "content": "system rules"}


def test_status_codes_map_to_retry_fatal_or_request(server):
    p = provider_for(server)
    cases = [(429, "retryable"), (503, "retryable"), (500, "retryable"), (401, "fatal"), (403, "fatal"),
             (404, "fatal"), (400, "request")]
    if server.kind == "anthropic":
        cases.append((529, "retryable"))
    for status, kind in cases:
        server.push(server.error(status, f"status {status}"))
        with pytest.raises(LLMError) as e:
            p.complete("s", MSG)
        assert (e.value.kind, e.value.status) == (kind, status), status


def test_billing_errors_are_fatal_even_as_429():
    s = FakeLLMServer("openai").start()
    try:
        s.push(s.error(429, "You exceeded your current quota", code="insufficient_quota"))
        with pytest.raises(LLMError) as e:
            provider_for(s).complete("s", MSG)
        assert e.value.kind == "fatal" and "billing" in str(e.value)
    finally:
        s.stop()


def test_retry_after_is_honoured_then_success():
    s = FakeLLMServer("anthropic").start()
    try:
        s.push(s.error(429, "rate limited", retry_after=1), s.text("ok"))
        p = provider_for(s)
        retries = []
        t0 = time.monotonic()
        reply = call_with_retry(lambda: p.complete("s", MSG), RetryPolicy(attempts=3, base=0.01, cap=0.02),
                                wait=lambda d: time.sleep(d) or True, on_retry=lambda *a: retries.append(a))
        assert reply.text == "ok"
        gap = s.requests[1].at - s.requests[0].at
        assert gap >= 1.0 and time.monotonic() - t0 < 5
        assert retries[0][1] == 1.0  # the server's Retry-After, not our tiny backoff
    finally:
        s.stop()


def test_overload_storm_gives_up_after_the_attempts():
    s = FakeLLMServer("anthropic").start()
    try:
        s.push(*[s.error(529, "Overloaded") for _ in range(4)])
        with pytest.raises(LLMError) as e:
            call_with_retry(lambda: provider_for(s).complete("s", MSG), RetryPolicy(attempts=4, base=0.001),
                            wait=lambda d: True)
        assert e.value.kind == "retryable" and len(s.chat_requests()) == 4
    finally:
        s.stop()


def test_timeouts_are_their_own_kind_and_refused_connections_are_retryable():
    s = FakeLLMServer("openai").start()
    try:
        s.push(s.error(200, "late", delay=1.5))
        with pytest.raises(LLMError) as e:
            provider_for(s, timeout=0.3).complete("s", MSG)
        assert e.value.kind == "timeout"  # never resent unchanged (test_agent_loop: a smaller request once)
    finally:
        s.stop()
    for kind in ("anthropic", "openai", "ollama"):
        p = make_provider(kind, MODELS[kind], "k" * 20, "http://127.0.0.1:9" + ("/v1" if kind == "openai" else ""),
                          timeout=2)
        with pytest.raises(LLMError) as e:
            p.complete("s", MSG)
        assert e.value.kind == "retryable", kind


def test_a_trickling_answer_is_cut_off_at_the_call_deadline_and_not_resent(server):
    # a byte every 50 ms: no single read ever waits the SDK's 1 s timeout, the whole answer would take far longer
    slow = server.trickling(server.text("DESCRIPTION: finally"), every=0.05)
    assert len(json.dumps(slow.body)) * 0.05 > 5
    server.push(slow, server.text("DESCRIPTION: prompt"))
    p = provider_for(server, timeout=1.0)
    retries = []
    t0 = time.monotonic()
    with pytest.raises(LLMError) as e:
        call_with_retry(lambda: run_interruptibly(lambda: p.complete("s", MSG), lambda: False, timeout=1.0),
                        RetryPolicy(attempts=2, base=0.01), wait=lambda d: True,
                        on_retry=lambda n, d, err: retries.append(err))
    assert time.monotonic() - t0 < 1.0 + 1.0
    assert e.value.kind == "timeout" and str(e.value) == "no complete answer within 1s"
    assert retries == [] and len(server.chat_requests()) == 1  # the identical request is not sent again


def test_stop_and_skip_cut_a_trickling_call_short(server):
    server.push(server.trickling(server.text("DESCRIPTION: finally"), every=0.05))
    p = provider_for(server, timeout=1.0)
    pressed = threading.Event()
    threading.Timer(0.5, pressed.set).start()  # what the orchestrator's cancelled() reports after s or q
    t0 = time.monotonic()
    with pytest.raises(Interrupted):
        run_interruptibly(lambda: p.complete("s", MSG), pressed.is_set, timeout=30.0)
    assert time.monotonic() - t0 < 0.5 + 0.5


def test_ollama_check_reports_a_missing_model():
    s = FakeLLMServer("ollama", models=["llama3:8b", "mistral:latest"]).start()
    try:
        with pytest.raises(LLMError) as e:
            make_provider("ollama", "qwen2.5-coder:7b", None, s.url).check()
        assert e.value.kind == "fatal" and "ollama pull qwen2.5-coder:7b" in str(e.value)
        assert "llama3:8b" in str(e.value)
        make_provider("ollama", "mistral", None, s.url).check()  # ":latest"-less names match too
    finally:
        s.stop()


def test_retry_after_formats():
    assert parse_retry_after({"retry-after": "7"}) == 7.0
    assert parse_retry_after({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    http_date = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
    assert 25 <= parse_retry_after({"retry-after": http_date}) <= 31
    assert parse_retry_after({"retry-after": "soon"}) is None and parse_retry_after({}) is None


def test_costs_known_unknown_and_free():
    assert estimate_cost("claude-sonnet-4-6", 1_000_000, 100_000) == pytest.approx(3.0 + 1.5)
    assert price_for("anthropic/claude-sonnet-4.6") == price_for("claude-sonnet-4-6")
    assert price_for("gpt-4.1-2025-04-14") == price_for("gpt-4.1")
    assert estimate_cost("my-local-finetune", 1000, 1000) is None
    assert estimate_cost("my-local-finetune", 1000, 1000, free=True) == 0.0
    u = Usage()
    from tui.llm import LLMReply
    u.add(LLMReply("x", 1000, 100), "claude-sonnet-4-6")
    assert u.cost_usd == pytest.approx(0.0045) and u.tokens == 1100
    u.add(LLMReply("x", 10, 10), "mystery-model")
    assert u.cost_usd is None and u.tokens == 1120  # unknown once any price is unknown: never invented


def test_provider_modules_load_without_the_factory_that_loads_them():
    code = ("import sys, tui.provider_anthropic, tui.provider_openai, tui.provider_ollama; "
            "assert 'tui.llm' not in sys.modules, 'a provider imports tui.llm, which imports the providers'")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


# ---------------------------------------------------------------------------
# The context window, overflows and why an answer ended
# ---------------------------------------------------------------------------


def test_the_context_window_is_what_the_server_says():
    for kind in ("openai", "anthropic"):  # llama-server speaks both; GET /props at the root, not under /v1
        s = FakeLLMServer(kind, n_ctx=4096).start()
        quiet = FakeLLMServer(kind).start()  # no /props: a server that does not say
        try:
            assert provider_for(s).context_window() == 4096, kind
            assert provider_for(quiet).context_window() is None, kind
        finally:
            s.stop()
            quiet.stop()
    s = FakeLLMServer("ollama", n_ctx=6000).start()
    plain = FakeLLMServer("ollama").start()
    try:
        assert provider_for(s).context_window() == 6000  # the Modelfile's num_ctx
        p = provider_for(plain)
        assert p.context_window() == 16384  # the trained 32768, capped (memory grows with num_ctx)
        p.use_window(12000)
        plain.push(plain.text("DESCRIPTION: x"))
        p.complete("s", MSG)
        assert plain.chat_requests()[-1].body["options"]["num_ctx"] == 12000  # else Ollama cuts the prompt silently
    finally:
        s.stop()
        plain.stop()


def test_a_prompt_over_the_context_is_its_own_error_kind_with_the_numbers():
    s = FakeLLMServer("openai", n_ctx=100).start()
    old = FakeLLMServer("openai", n_ctx=100, overflow_500=True).start()
    try:
        long = [{"role": "user", "content": "x" * 1000}]
        with pytest.raises(LLMError) as e:
            provider_for(s).complete("s", long)
        assert e.value.kind == "context" and e.value.status == 400
        assert context_numbers(str(e.value)) == (336, 100)  # llama-server: "request (336 tokens) exceeds ... (100"
        with pytest.raises(LLMError) as e:
            provider_for(old).complete("s", long)
        assert e.value.kind == "context" and e.value.status == 500  # not retried as if waiting could help
        assert context_numbers("prompt is too long: 210000 tokens > 200000 maximum") == (210000, 200000)
        assert context_numbers("This model's maximum context length is 8192 tokens. However, you requested 9000 "
                               "tokens (5000 in the messages, 4000 in the completion).") == (9000, 8192)
    finally:
        s.stop()
        old.stop()


def test_why_the_answer_ended_is_reported(server):
    p = provider_for(server)
    server.push(server.text("DESCRIPTION: x"))
    assert p.complete("s", MSG).stop_reason == "end"
    cut = server.text("DESCRIPTION: x")
    if server.kind == "anthropic":
        cut.body["stop_reason"] = "max_tokens"
    elif server.kind == "openai":
        cut.body["choices"][0]["finish_reason"] = "length"
    else:
        cut.body["done_reason"] = "length"
    server.push(cut)
    assert p.complete("s", MSG, max_tokens=77).stop_reason == "max_tokens"
    sent = server.chat_requests()[-1].body
    assert (sent.get("max_tokens") or sent.get("options", {}).get("num_predict")) == 77  # this call's cap
