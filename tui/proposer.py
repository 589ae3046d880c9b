"""The LLM side of the loop: the client and its key, the preflight check, one proposal per experiment (with one
corrective retry for an unusable answer), retries with backoff, and token/cost accounting.

Answers are structured where the provider offers it (--answer-format auto, the default, or json): a JSON object the
server constrains decoding to (tui.answers). With auto, a server that rejects the schema, or ignores it and answers
in free text, gets the free-text format for the rest of the session, once, with a log line saying so; the experiment
is asked again in text (a rejected call) or read as text (an ignored schema), so it is not lost.

Every call runs interruptibly: a stop, skip or abort command ends the wait for an answer at once (tui.controls).
The key is known here only to build the client and to redact it (and every secret-named variable's value) from
anything the loop writes or sends. Once the client is built the secrets leave the process environment and the process
is closed to its children's inspection (tui.credentials.withdraw_secrets, harden_process); every prompt is redacted
before it is sent (a crash tail or a row could carry what a hostile run printed).
"""

import os

from tui.answers import answer_spec, read_reply
from tui.config import AgentConfig
from tui.controls import Controls, FatalError, SkipExperiment, StopRequested
from tui.credentials import (CredentialError, Redactor, harden_process, is_local_url, keyring_get, known_env_secrets,
                             resolve_key, withdraw_secrets)
from tui.events import State
from tui.llm import (Interrupted, LLMError, RetryPolicy, Usage, call_with_retry, make_provider,
                     run_interruptibly)
from tui.llm_base import schema_rejected
from tui.prompt import AnswerError, PromptContext, apply_proposal, corrective_prompt, system_prompt, user_prompt

ECHO_CHARS = 16384  # how much of an unusable answer the corrective retry shows the model again


class SchemaRejected(Exception):
    """The server refused the request because of its answer schema (tools / response_format / format)."""


class Proposer:
    def __init__(self, cfg: AgentConfig, controls: Controls, status, log, provider=None):
        self.cfg = cfg
        self.controls = controls
        self.status = status  # status.state, status.message, status.set(state, message)
        self.log = log  # log(message, level)
        self.provider = provider  # tests and embedders may pass a ready Provider
        self.policy = RetryPolicy(cfg.llm_attempts, cfg.backoff_base, cfg.backoff_cap, cfg.retry_after_cap)
        self.usage = Usage()  # whole session
        self.secrets: list = []
        self.redact = Redactor()
        self.free = False
        self.credential_source = ""
        self.last_prompt = ""  # the latest user prompt sent (for the dashboard's detail view)
        self.text_only = cfg.answer_format == "text"  # set for the rest of the session when a server fails the schema

    def describe(self) -> str:
        return self.provider.describe() if self.provider else self.cfg.provider

    def connect(self) -> None:
        """Build the client (key from the environment or the OS store) and prove it works."""
        cfg = self.cfg
        env_secrets = known_env_secrets()
        if self.provider is None:
            try:
                cred = resolve_key(cfg.provider, cfg.base_url)
            except CredentialError as e:
                raise FatalError(str(e)) from None
            self.credential_source = cred.source
            # a key in the environment wins, but a stored one a hostile run could read is redacted all the same
            self.secrets = [cred.key] if cred.key else []
            if cred.source.startswith("env"):
                try:
                    self.secrets.append(keyring_get(cfg.provider))
                except CredentialError:  # no keyring package: nothing stored either
                    pass
            try:
                self.provider = make_provider(cfg.provider, cfg.model, cred.key, cfg.base_url, cfg.llm_timeout,
                                              cfg.max_tokens)
            except Exception as e:
                raise FatalError(f"cannot set up the {cfg.provider} client: {e}") from None
        self.secrets = list(dict.fromkeys(s for s in self.secrets + env_secrets if s))
        self.redact = Redactor(self.secrets)
        host = cfg.base_url or (os.environ.get("OLLAMA_HOST") or "127.0.0.1:11434" if cfg.provider == "ollama" else "")
        if host and "://" not in host:
            host = "http://" + host
        withdraw_secrets(self.secrets)
        harden_process()
        self.free = cfg.provider in ("ollama", "openai") and is_local_url(host)
        self.status.set(State.INITIALIZING, f"checking the LLM: {self.describe()}")
        try:
            self._with_retry(self.provider.check)
        except Interrupted:
            raise StopRequested() from None
        except LLMError as e:
            raise FatalError(self._fatal_message(e, during="check")) from None
        src = f" (key from {self.credential_source})" if self.credential_source else ""
        self.log(f"LLM: {self.describe()}{src}", "info")

    def propose(self, ctx: PromptContext, usage: Usage):
        """(Proposal, new script text). Raises SkipExperiment, FatalError, or Interrupted (a command arrived)."""
        self.last_prompt = self.redact(user_prompt(ctx))
        messages = [{"role": "user", "content": self.last_prompt}]
        for attempt in range(2):
            reply, structured = self._answer(ctx, messages)
            usage.add(reply, self.provider.model, self.free)
            self.usage.add(reply, self.provider.model, self.free)
            try:
                if structured and reply.data is None and reply.stop_reason != "max_tokens" and not self._strict():
                    self._text_from_now_on(f"exp{ctx.exp}: the LLM server ignored the answer schema and answered in "
                                           f"free text")
                    structured = False
                proposal = read_reply(reply, ctx.scope, structured)
                return proposal, apply_proposal(ctx.source, proposal, ctx.scope, ctx.script_name)
            except AnswerError as e:
                if attempt == 1:
                    raise SkipExperiment(f"unusable answer after a corrective retry: {e}") from None
                self.log(f"exp{ctx.exp}: the answer could not be used ({e}); asking once more", "warning")
                # a runaway reply is not sent back whole
                echoed = self.redact(reply.text.strip()[:ECHO_CHARS]) or "(empty answer)"
                messages = messages + [{"role": "assistant", "content": echoed},
                                       {"role": "user", "content": corrective_prompt(str(e), ctx.scope,
                                                                                     self._structured())}]
        raise AssertionError("unreachable")

    def _structured(self) -> bool:
        return not self.text_only and getattr(self.provider, "structured", False)

    def _strict(self) -> bool:
        """--answer-format json: structured or nothing, no fallback to text."""
        return self.cfg.answer_format == "json"

    def _text_from_now_on(self, why: str) -> None:
        if self.text_only:  # another slot's call found out first: said once
            return
        self.text_only = True
        self.log(f"{why}: using the free-text answer format for the rest of the session (--answer-format text "
                 f"skips the attempt)", "warning")

    def _answer(self, ctx: PromptContext, messages: list):
        """(reply, structured): one call in the session's answer format. A server that rejects the schema is asked
        the same again in free text."""
        spec = answer_spec(ctx.scope, ctx.source, ctx.script_name) if self._structured() else None
        try:
            return self._ask(system_prompt(ctx.scope, ctx.script_name, ctx.time_budget, spec is not None), messages,
                             spec), spec is not None
        except SchemaRejected as e:
            self._text_from_now_on(f"exp{ctx.exp}: the LLM server rejected the answer schema ({e})")
            return self._ask(system_prompt(ctx.scope, ctx.script_name, ctx.time_budget), messages), False

    def _ask(self, system: str, messages: list, answer=None):
        try:
            return self._with_retry(lambda: self.provider.complete(system, messages, answer))
        except LLMError as e:
            if answer is not None and schema_rejected(e):
                if not self._strict():
                    raise SchemaRejected(str(e)) from None
                raise FatalError(f"the LLM server rejected the answer schema that --answer-format json asks for "
                                 f"({e}): use --answer-format auto or text") from None
            if e.kind == "fatal":
                raise FatalError(self._fatal_message(e, during="experiment")) from None
            if e.kind == "request":
                raise SkipExperiment(f"LLM request rejected: {e}") from None
            raise SkipExperiment(f"LLM unavailable after {self.policy.attempts} attempts: {e}", outage=True) from None

    def _with_retry(self, fn):
        state = self.status.state

        def attempt():
            return run_interruptibly(fn, lambda: self.controls.cancel_reason() is not None,
                                     timeout=self.cfg.llm_timeout)

        def on_retry(n, delay, err):
            self.status.set(State.WAITING, f"LLM {err}: retry {n}/{self.policy.attempts - 1} in {delay:.1f}s")

        def wait(delay):
            ok = self.controls.wait(delay)
            self.status.set(state, self.status.message if self.status.state == state else "retrying the LLM call")
            return ok

        return call_with_retry(attempt, self.policy, wait, on_retry)

    def _fatal_message(self, e: LLMError, during: str) -> str:
        p, what = self.cfg.provider, self.describe()
        if e.status in (401, 403) or "authentication" in str(e).lower():
            return (f"LLM authentication failed for {what}: {e}. Check the key with: uv run dashboard.py --check-key "
                    f"--provider {p}; store a new one with --setup-key --provider {p}")
        if e.status == 404:
            return f"LLM {what}: {e}. Check --model (and --base-url)"
        if e.kind == "retryable":
            return f"cannot reach the LLM {what} ({during}): {e}"
        return f"LLM {what} refused the request ({during}): {e}"
