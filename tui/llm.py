"""The provider factory, our retry/backoff policy, the whole-call deadline and token/cost accounting.

The provider interface and the error kinds live in tui.llm_base (re-exported here for callers); the SDKs' own retries
are switched off (max_retries=0) so this module is the one place that decides.
"""

import random
import threading
import time
from dataclasses import dataclass

from tui.llm_base import LLMError, LLMReply, Provider, parse_retry_after  # noqa: F401  (re-exported for callers)
from tui.provider_anthropic import AnthropicProvider
from tui.provider_ollama import OllamaProvider
from tui.provider_openai import OpenAIProvider

# ---------------------------------------------------------------------------
# Defaults and prices
# ---------------------------------------------------------------------------

DEFAULT_MODELS = {
    "anthropic": "claude-sonnet-4-6",
    "openai": "gpt-4.1",
    "openrouter": "anthropic/claude-sonnet-4.6",
    "ollama": "qwen2.5-coder:32b",
}
PROVIDERS = tuple(DEFAULT_MODELS)  # what --provider accepts; every list of providers derives from this
OPENROUTER_URL = "https://openrouter.ai/api/v1"

# USD per million tokens (input, output), list prices as published by the vendors. Unknown models get no cost
# (shown as unknown), never a guess.
PRICES = {
    "claude-opus-4-6": (5.0, 25.0),
    "claude-opus-4-5": (5.0, 25.0),
    "claude-opus-4-1": (15.0, 75.0),
    "claude-opus-4": (15.0, 75.0),
    "claude-sonnet-4-6": (3.0, 15.0),
    "claude-sonnet-4-5": (3.0, 15.0),
    "claude-sonnet-4": (3.0, 15.0),
    "claude-haiku-4-5": (1.0, 5.0),
    "gpt-4.1": (2.0, 8.0),
    "gpt-4.1-mini": (0.4, 1.6),
    "gpt-4.1-nano": (0.1, 0.4),
    "gpt-4o": (2.5, 10.0),
    "gpt-4o-mini": (0.15, 0.6),
    "gpt-5": (1.25, 10.0),
    "gpt-5-mini": (0.25, 2.0),
    "gpt-5-nano": (0.05, 0.4),
}

# ---------------------------------------------------------------------------
# Factory
# ---------------------------------------------------------------------------


def make_provider(provider: str, model: str | None, api_key: str | None, base_url: str | None = None,
                  timeout: float = 300.0, max_tokens: int = 4096) -> Provider:
    model = model or DEFAULT_MODELS[provider]
    if provider == "anthropic":
        return AnthropicProvider(model, api_key, base_url, timeout, max_tokens)
    if provider in ("openai", "openrouter"):
        url = base_url or (OPENROUTER_URL if provider == "openrouter" else None)
        return OpenAIProvider(model, api_key, url, timeout, max_tokens, name=provider)
    if provider == "ollama":
        return OllamaProvider(model, base_url, timeout, max_tokens, api_key=api_key)
    raise ValueError(f"unknown provider {provider!r}")


# ---------------------------------------------------------------------------
# Retry policy
# ---------------------------------------------------------------------------


@dataclass
class RetryPolicy:
    attempts: int = 6  # calls per request before giving up
    base: float = 2.0  # first backoff, doubled each attempt
    cap: float = 120.0  # longest computed backoff
    retry_after_cap: float = 600.0  # longest wait we accept from a Retry-After header

    def delay(self, attempt: int, err: LLMError) -> float:
        if err.retry_after is not None:
            return min(err.retry_after, self.retry_after_cap)
        return min(self.cap, self.base * (2 ** attempt)) * random.uniform(0.8, 1.2)


class Interrupted(Exception):
    """A stop/abort/skip command arrived while waiting for the LLM."""


def call_with_retry(fn, policy: RetryPolicy, wait, on_retry=None, retry=("retryable",)):
    """Call fn() until it succeeds, an LLMError of a kind not in `retry` is raised, or attempts run out (last error
    re-raised).

    wait(seconds) -> bool sleeps interruptibly and returns False when the caller wants to give up (then Interrupted).
    on_retry(attempt, delay, err) is told about each retry.
    """
    for attempt in range(policy.attempts):
        try:
            return fn()
        except LLMError as err:
            if err.kind not in retry or attempt == policy.attempts - 1:
                raise
            delay = policy.delay(attempt, err)
            if on_retry:
                on_retry(attempt + 1, delay, err)
            if not wait(delay):
                raise Interrupted() from None
    raise AssertionError("unreachable")


def run_interruptibly(fn, cancelled, poll: float = 0.05, timeout: float | None = None):
    """Run a blocking call in a daemon thread so a stop/abort command does not wait for a slow HTTP response.

    cancelled() -> bool is polled; when it turns true the call is abandoned (its result is dropped) and Interrupted
    is raised. timeout is the whole call's budget in seconds: the SDKs' own timeout is per read, so a server sending
    a byte now and then keeps a call alive indefinitely. Past it the call is abandoned the same way and an LLMError
    of kind "timeout" is raised (the caller decides what a smaller request would be: tui.proposer).
    """
    box: dict = {}
    done = threading.Event()

    def target():
        try:
            box["value"] = fn()
        except BaseException as e:  # handed to the caller's thread
            box["error"] = e
        finally:
            done.set()

    threading.Thread(target=target, name="llm-call", daemon=True).start()
    deadline = None if timeout is None else time.monotonic() + timeout
    while not done.wait(poll):
        if cancelled():
            raise Interrupted()
        if deadline is not None and time.monotonic() >= deadline:
            raise LLMError("timeout", f"no complete answer within {timeout:g}s")
    if "error" in box:
        raise box["error"]
    return box["value"]


# ---------------------------------------------------------------------------
# Token and cost accounting
# ---------------------------------------------------------------------------


def model_key(model: str) -> str:
    name = model.split("/")[-1].lower()  # openrouter: "anthropic/claude-sonnet-4.6"
    name = name.replace(".", "-")
    for suffix in ("-latest",):
        name = name.removesuffix(suffix)
    return name


def family_lookup(table: dict, model: str):
    """table[model] by its name as model_key spells it (table keys too: "gpt-4.1" and "gpt-4-1" are one model); a dated
    snapshot ("claude-sonnet-4-5-20250929", "gpt-4.1-2025-04-14") or a variant gets its family's entry (the longest
    key it starts with); None when no family matches."""
    key = model_key(model)
    keys = {model_key(k): k for k in table}
    if key in keys:
        return table[keys[key]]
    best = max((k for k in keys if key.startswith(k + "-")), key=len, default=None)
    return table[keys[best]] if best else None


def price_for(model: str) -> tuple[float, float] | None:
    return family_lookup(PRICES, model)


def estimate_cost(model: str, input_tokens: int, output_tokens: int, free: bool = False) -> float | None:
    if free:
        return 0.0
    price = price_for(model)
    if price is None:
        return None
    return (input_tokens * price[0] + output_tokens * price[1]) / 1e6


@dataclass
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float | None = 0.0  # None once any call had an unknown price
    calls: int = 0  # calls answered
    failed: int = 0  # calls that got no answer (an error, a timeout, a command)

    @property
    def tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    def add(self, reply: LLMReply, model: str, free: bool = False) -> None:
        self.calls += 1
        self.input_tokens += reply.input_tokens
        self.output_tokens += reply.output_tokens
        cost = estimate_cost(model, reply.input_tokens, reply.output_tokens, free)
        self.cost_usd = None if (cost is None or self.cost_usd is None) else self.cost_usd + cost


def format_cost(cost: float | None) -> str:
    return "unknown" if cost is None else f"${cost:.4f}"

