"""What every provider module shares: the Provider interface, its reply and error types, and the mapping of HTTP
statuses and SDK exceptions to the three error kinds. The provider modules import this, never tui.llm, so the factory
in tui.llm can import them without a cycle.

Every provider maps its SDK's exceptions to LLMError with one of five kinds:
    retryable  429 / 529 / 5xx / 408 / connection errors (retried with backoff, Retry-After honoured)
    timeout    no answer within the timeout (never resent unchanged: tui.proposer asks once with a smaller request)
    context    the prompt does not fit the model's context window (the same: re-fitted smaller once, then skipped)
    fatal      authentication, permission, billing/quota, unknown model (the loop stops with a clear message)
    request    any other rejected request (this experiment is skipped, no retry)
"""

import json
import re
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

# ---------------------------------------------------------------------------
# Interface
# ---------------------------------------------------------------------------


@dataclass
class AnswerSpec:
    """A structured answer asked of the model: a JSON object following `schema` (a JSON Schema that OpenAI's strict
    mode accepts). Anthropic gets it as the input schema of a tool the model must call, OpenAI-compatible servers as
    response_format json_schema, Ollama as format."""
    name: str  # tool / schema name: letters, digits, _ and - only
    description: str
    schema: dict


@dataclass
class LLMReply:
    text: str  # the answer as text; for a structured answer, the JSON the model sent
    input_tokens: int = 0
    output_tokens: int = 0
    data: dict | None = None  # the structured answer, when one was asked for and the reply holds a JSON object
    stop_reason: str = ""  # "end" | "max_tokens" (cut at the output cap) | "tool" | the provider's word | "" unknown


class LLMError(Exception):
    def __init__(self, kind: str, message: str, status: int | None = None, retry_after: float | None = None):
        super().__init__(message)
        self.kind = kind  # "retryable" | "timeout" | "context" | "fatal" | "request"
        self.status = status
        self.retry_after = retry_after


class Provider:
    """What the orchestrator needs from an LLM. One subclass per provider module."""

    name = "provider"
    structured = False  # complete() honours an AnswerSpec

    def __init__(self, model: str):
        self.model = model

    def check(self) -> None:
        """A cheap call that proves the key and the endpoint work; raises LLMError."""
        raise NotImplementedError

    def complete(self, system: str, messages: list[dict], answer: AnswerSpec | None = None,
                 max_tokens: int | None = None) -> LLMReply:
        """messages: [{"role": "user"|"assistant", "content": str}, ...]; answer: ask for a structured answer
        (LLMReply.data); max_tokens: the output cap of this call (None: the provider's). Raises LLMError."""
        raise NotImplementedError

    def context_window(self) -> int | None:
        """The context window in tokens when the server says what it is (llama.cpp, Ollama), else None (the caller
        then uses its table or --context-tokens). Never raises."""
        return None

    def use_window(self, tokens: int) -> None:
        """The window the prompts are fitted to. Servers that take it per call (Ollama's num_ctx) are told it."""

    def describe(self) -> str:
        return f"{self.name} ({self.model})"


# ---------------------------------------------------------------------------
# Reading replies
# ---------------------------------------------------------------------------

# each provider's words for why the reply ended -> ours; anything else is kept as the provider said it
STOP_REASONS = {"end_turn": "end", "stop_sequence": "end", "stop": "end", "tool_use": "tool", "tool_calls": "tool",
                "function_call": "tool", "max_tokens": "max_tokens", "length": "max_tokens",
                "model_context_window_exceeded": "max_tokens"}


def stop_reason(raw) -> str:
    """The provider's word for why the answer ended (Anthropic stop_reason, OpenAI finish_reason, Ollama done_reason)
    in our vocabulary; "" when it said none."""
    return STOP_REASONS.get(raw, str(raw)) if raw else ""


def json_object(text: str) -> dict | None:
    """The JSON object a structured reply's text holds (a fence around it tolerated), or None."""
    text = (text or "").strip()
    if text.startswith("```"):
        text = text.split("\n", 1)[-1].rsplit("```", 1)[0]
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


# a rejected request that names the structured-output part: the server cannot do structured answers
SCHEMA_WORDS = ("response_format", "json_schema", "schema", "tool", "format")


def schema_rejected(e: "LLMError") -> bool:
    return e.kind == "request" and e.status in (400, 422) and any(w in str(e).lower() for w in SCHEMA_WORDS)


# ---------------------------------------------------------------------------
# Error classification
# ---------------------------------------------------------------------------

BILLING_WORDS = ("credit balance", "insufficient_quota", "insufficient quota", "billing", "payment required",
                 "insufficient_credits", "exceeded your current quota")


def parse_retry_after(headers) -> float | None:
    """Retry-After in seconds (or an HTTP date), or retry-after-ms; None when absent or unreadable."""
    if not headers:
        return None
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError, OverflowError):
        return None


# how the servers say a prompt is over the context window: llama.cpp (HTTP 400 "request (8423 tokens) exceeds the
# available context size (8192 tokens)", HTTP 500 "Context size has been exceeded"), OpenAI and vLLM
# (context_length_exceeded, "maximum context length is ..."), Anthropic ("prompt is too long: 210000 tokens > 200000
# maximum", "input length and `max_tokens` exceed context limit: 199000 + 4096 > 200000")
CONTEXT_WORDS = ("exceeds the available context size", "context size has been exceeded", "context_length_exceeded",
                 "maximum context length", "prompt is too long", "exceed context limit")


def classify_status(status: int, message: str, retry_after: float | None = None) -> LLMError:
    low = message.lower()
    if status in (400, 413, 500) and any(w in low for w in CONTEXT_WORDS):
        return LLMError("context", f"the prompt does not fit the model's context (HTTP {status}): {message}", status)
    if status == 402 or any(w in low for w in BILLING_WORDS):
        return LLMError("fatal", f"billing/quota problem (HTTP {status}): {message}", status)
    if status == 401:
        return LLMError("fatal", f"authentication failed (HTTP 401): {message}", status)
    if status == 403:
        return LLMError("fatal", f"permission denied (HTTP 403): {message}", status)
    if status == 404:
        return LLMError("fatal", f"model or endpoint not found (HTTP 404): {message}", status)
    if status in (408, 409, 425, 429) or status >= 500:
        return LLMError("retryable", f"HTTP {status}: {message}", status, retry_after)
    return LLMError("request", f"request rejected (HTTP {status}): {message}", status)


def translate_sdk_error(sdk, e: Exception, error_message) -> LLMError:
    """Map an exception of the anthropic or openai SDK (they share one generated exception hierarchy) to LLMError;
    error_message(e) extracts the provider's own error text."""
    if isinstance(e, sdk.APITimeoutError):
        return LLMError("timeout", "request timed out")
    if isinstance(e, sdk.APIConnectionError):
        return LLMError("retryable", f"connection error: {e}")
    if isinstance(e, sdk.APIStatusError):
        headers = getattr(e.response, "headers", None)
        return classify_status(e.status_code, error_message(e), parse_retry_after(headers))
    return LLMError("request", f"{type(e).__name__}: {e}")


# ---------------------------------------------------------------------------
# What a llama.cpp server says about itself
# ---------------------------------------------------------------------------

PROBE_TIMEOUT = 5.0  # seconds: /props answers at once, even while the server is busy with a prompt


def server_root(base_url: str) -> str:
    """The server's root URL: llama.cpp serves /props at the root, not under the API's /v1."""
    root = base_url.rstrip("/")
    return root[:-3] if root.endswith("/v1") else root


def llama_cpp_window(base_url: str | None) -> int | None:
    """n_ctx of a llama.cpp server (GET <root>/props -> default_generation_settings.n_ctx, the context of one slot),
    or None when base_url is no llama.cpp server (any error, any other answer)."""
    if not base_url:
        return None
    try:
        with urllib.request.urlopen(server_root(base_url) + "/props", timeout=PROBE_TIMEOUT) as r:
            props = json.loads(r.read(1 << 20))
        n_ctx = props["default_generation_settings"]["n_ctx"]
    except (OSError, ValueError, KeyError, TypeError, urllib.error.URLError):
        return None
    return n_ctx if isinstance(n_ctx, int) and n_ctx > 0 else None


CONTEXT_NUMBERS_RE = re.compile(r"request \((\d+) tokens\) exceeds the available context size \((\d+) tokens\)"
                                r"|(\d+) tokens > (\d+) maximum|(\d+) \+ \d+ > (\d+)"
                                r"|maximum context length is (\d+) tokens.*?(?:requested|resulted in) (\d+) tokens",
                                re.IGNORECASE | re.DOTALL)


def context_numbers(message: str) -> tuple[int | None, int | None]:
    """(prompt tokens, window tokens) that a context-overflow message states, or Nones."""
    m = CONTEXT_NUMBERS_RE.search(message or "")
    if not m:
        return None, None
    g = m.groups()
    if g[0]:
        return int(g[0]), int(g[1])
    if g[2]:
        return int(g[2]), int(g[3])
    if g[4]:
        return int(g[4]), int(g[5])
    return int(g[7]), int(g[6])
