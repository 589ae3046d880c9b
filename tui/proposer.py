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

import json
import time
from collections import Counter

from tui.answers import answer_spec, read_reply
from tui.atomic import append_atomic
from tui.config import AgentConfig
from tui.context import (MIN_ANSWER_TOKENS, ContextTooSmall, Request, TokenCounter, choose_window, fit,
                         request_chars)
from tui.controls import Controls, FatalError, SkipExperiment, StopRequested
from tui.credentials import (CredentialError, Redactor, harden_process, is_local_url, keyring_get, known_env_secrets,
                             llm_host, resolve_key, withdraw_secrets)
from tui.events import State
from tui.llm import Interrupted, LLMError, RetryPolicy, Usage, call_with_retry, make_provider, run_interruptibly
from tui.llm_base import context_numbers, schema_rejected
from tui.prompt import AnswerError, PromptContext, answer_excerpt, apply_proposal, corrective_prompt, system_prompt

SHRINK_AFTER_TIMEOUT = 0.5  # the smaller request after a timeout: this share of the prompt, and of max_tokens
SHRINK_AFTER_OVERFLOW = 0.5  # ... after a context overflow whose message gives no numbers: this share of the prompt
COPIED_LINES = 2  # this many of the system prompt's own lines in an answer: the model copied the prompt back

# what the diagnosis suggests for each shape of unusable answer, most specific first
ADVICE = {
    "context": "a larger context (llama.cpp: -c 16384; Ollama or an unknown server: --context-tokens N), or --scope "
               "hparams (a much shorter prompt)",
    "timeout": "a longer --llm-timeout, a smaller --max-tokens, a smaller or faster model, or --scope hparams",
    "truncated": "--answer-format json (structured answers end where the schema ends) or an instruction-tuned model "
                 "(a base model does not stop)",
    "copied": "an instruction-tuned (chat) model rather than a base model, and the server's chat template "
              "(llama.cpp: --jinja, or --chat-template NAME for a GGUF without one)",
    "fields": "--answer-format json, an instruction-tuned model, or --scope hparams (the simpler answer)",
    "other": "--answer-format json or --scope hparams",
}
SHAPES = {"context": "context exceeded", "timeout": "timed out", "truncated": "cut at the output cap",
          "copied": "copied the prompt", "fields": "had none of the answer's fields", "other": "unusable"}


class SchemaRejected(Exception):
    """The server refused the request because of its answer schema (tools / response_format / format)."""


class Proposer:
    """One proposal per experiment: the prompt fitted to the model's context (tui.context), one corrective retry for
    an unusable answer, every call recorded in runs/expN.llm.jsonl, and a diagnosis when answers stay unusable."""

    def __init__(self, cfg: AgentConfig, controls: Controls, status, log, provider=None, on_call=None):
        self.cfg = cfg
        self.controls = controls
        self.status = status  # status.state, status.message, status.set(state, message)
        self.log = log  # log(message, level)
        self.provider = provider  # tests and embedders may pass a ready Provider
        self.on_call = on_call  # called after every LLM call (the screen's LLM figures)
        self.policy = RetryPolicy(cfg.llm_attempts, cfg.backoff_base, cfg.backoff_cap, cfg.retry_after_cap)
        self.usage = Usage()  # whole session
        self.secrets: list = []
        self.redact = Redactor()
        self.free = False
        self.credential_source = ""
        self.last_prompt = ""  # the latest user prompt sent (for the dashboard's detail view)
        self.text_only = cfg.answer_format == "text"  # set for the rest of the session when a server fails the schema
        self.count = TokenCounter()
        self.window = 0  # the context window prompts are fitted to (connect)
        self.unusable: list = []  # (shape, detail) of each unusable answer in a row

    def describe(self) -> str:
        return self.provider.describe() if self.provider else self.cfg.provider

    def connect(self) -> None:
        """Build the client (key from the environment or the OS store), prove it works, learn its context window.
        With a custom base URL a check endpoint the server does not have (404) is only a warning: llama.cpp serves
        POST /v1/messages but not GET /v1/models/<id>; the first real call decides."""
        cfg = self.cfg
        env_secrets = known_env_secrets()
        host = llm_host(cfg.provider, cfg.base_url)
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
        withdraw_secrets(self.secrets)
        harden_process()
        self.free = cfg.provider in ("ollama", "openai") and is_local_url(host)
        self.status.set(State.INITIALIZING, f"checking the LLM: {self.describe()}")
        try:
            self._with_retry(self.provider.check, "LLM check", retry=("retryable", "timeout"))
        except Interrupted:
            raise StopRequested() from None
        except LLMError as e:
            if not (e.status == 404 and host and cfg.provider != "ollama"):
                raise FatalError(self._fatal_message(e, during="check")) from None
            self.log(f"LLM check: {host} has no such endpoint ({e}); going on, the first real call decides",
                     "warning")
        src = f" (key from {self.credential_source})" if self.credential_source else ""
        self.log(f"LLM: {self.describe()}{src}", "info")
        self.learn_window()

    def learn_window(self) -> None:
        """The context window prompts are fitted to: the server's, --context-tokens, or the table's (tui.context)."""
        cfg = self.cfg
        self.window, source = choose_window(self.provider.context_window(), self.provider.model, cfg.context_tokens)
        self.provider.use_window(self.window)
        self.log(f"LLM context window: {self.window:,} tokens ({source}); answers up to {cfg.max_tokens:,} tokens; "
                 f"{cfg.llm_timeout:g}s per call")

    # -- one proposal -----------------------------------------------------------------------------------------------

    def propose(self, ctx: PromptContext, usage: Usage):
        """(Proposal, new script text). Raises SkipExperiment, FatalError, or Interrupted (a command arrived)."""
        tail: list = []
        for attempt in range(2):
            spec = answer_spec(ctx.scope, ctx.source, ctx.script_name) if self._structured() else None
            system = system_prompt(ctx.scope, ctx.script_name, ctx.time_budget, spec is not None)
            try:
                reply, request, spec = self._answer(ctx, system, tail, spec, usage)
            except ContextTooSmall as e:
                raise FatalError(f"LLM {self.describe()}: {e}: {ADVICE['context']}") from None
            try:
                structured = spec is not None
                if structured and reply.data is None and reply.stop_reason != "max_tokens" and not self._strict():
                    self._text_from_now_on(f"exp{ctx.exp}: the LLM server ignored the answer schema and answered in "
                                           f"free text")
                    structured = False
                proposal = read_reply(reply, ctx.scope, structured)
                new_source = apply_proposal(ctx.source, proposal, ctx.scope, ctx.script_name)
            except AnswerError as e:
                self._unusable(self._shape(reply, request, system), str(e))
                if self._diagnosis_due():
                    raise SkipExperiment(f"unusable answer ({e}); {len(self.unusable)} in a row") from None
                if attempt == 1:
                    raise SkipExperiment(f"unusable answer after a corrective retry: {e}") from None
                self.log(f"exp{ctx.exp}: the answer could not be used ({e}); asking once more", "warning")
                # the error and an excerpt, not the whole (maybe runaway) answer again
                tail = [{"role": "assistant", "content": self.redact(answer_excerpt(reply.text))},
                        {"role": "user", "content": corrective_prompt(str(e), ctx.scope, self._structured())}]
                continue
            if proposal.labelled_by_engine:
                self.log(f"exp{ctx.exp}: the answer's {' and '.join(proposal.labelled_by_engine)} copied the answer "
                         f"format; described from the change instead: {proposal.description}", "warning")
            self.unusable.clear()
            return proposal, new_source
        raise AssertionError("unreachable")

    def _answer(self, ctx: PromptContext, system: str, tail: list, spec, usage: Usage):
        """(reply, request, spec): one answer in the session's format. A server that rejects the answer schema is
        asked the same again in free text (spec None from then on); with --answer-format json that stops the loop."""
        request = self._fit(ctx, system, tail)
        try:
            return self._ask(ctx.exp, request, lambda cap, mt: self._fit(ctx, system, tail, cap, mt), usage,
                             spec), request, spec
        except SchemaRejected as e:
            self._text_from_now_on(f"exp{ctx.exp}: the LLM server rejected the answer schema ({e})")
        system = system_prompt(ctx.scope, ctx.script_name, ctx.time_budget)
        request = self._fit(ctx, system, tail)
        return self._ask(ctx.exp, request, lambda cap, mt: self._fit(ctx, system, tail, cap, mt), usage), \
            request, None

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

    def _fit(self, ctx: PromptContext, system: str, tail: list, cap: int | None = None,
             max_tokens: int | None = None) -> Request:
        request = fit(ctx, system, self.window, max_tokens or self.cfg.max_tokens, self.count, tail, cap)
        request.messages[0]["content"] = self.redact(request.messages[0]["content"])
        self.last_prompt = request.messages[0]["content"]
        if request.trimmed:
            self.log(f"exp{ctx.exp}: the prompt was fitted to the {self.window:,}-token context (about "
                     f"{request.tokens:,} tokens): {request.trimmed}", "info")
        return request

    def _ask(self, exp: int, request: Request, smaller, usage: Usage, answer=None):
        """One answer for the request. A timeout or a context overflow is never resent unchanged: the same request
        would take as long again (a slow server is slow for this size; the abandoned call may still occupy its only
        slot) or be refused again. So the request is fitted once more, smaller - after an overflow to the window
        and token ratio the error states (else to SHRINK_AFTER_OVERFLOW of the prompt), after a timeout to
        SHRINK_AFTER_TIMEOUT of the prompt and of max_tokens, since a CPU server's time grows with both - and when
        that fails too, or nothing can be left out, the experiment is skipped with what happened."""
        try:
            return self._call(exp, request, usage, answer)
        except LLMError as e:
            if e.kind not in ("timeout", "context"):
                raise self._skip_or_fatal(e, answer) from None
            first = e
        self._unusable(first.kind, str(first))
        if first.kind == "context":
            tokens, window = context_numbers(str(first))
            if tokens:
                self.count.learn(request.chars, tokens)
            # the window the server has: what it says, else less than the refused prompt (a safe upper bound)
            window = window or request.tokens
            if window < self.window:
                self.window = window
                self.provider.use_window(window)
                self.log(f"LLM context window: {window:,} tokens from now on (the server refused a longer prompt)")
            cap = None if tokens else int(request.tokens * SHRINK_AFTER_OVERFLOW)
            max_tokens = request.max_tokens
        else:
            cap = int(request.tokens * SHRINK_AFTER_TIMEOUT)
            max_tokens = max(MIN_ANSWER_TOKENS, int(request.max_tokens * SHRINK_AFTER_TIMEOUT))
        try:
            retry = smaller(cap, max_tokens)
        except ContextTooSmall:
            retry = None
        if self._diagnosis_due():
            raise SkipExperiment(self._failed(first, request, f"{len(self.unusable)} unusable answers in a row"))
        if retry is None or (retry.chars >= request.chars and retry.max_tokens >= request.max_tokens):
            raise SkipExperiment(self._failed(first, request, "the request cannot be made smaller"))
        self.log(f"exp{exp}: {first}; asking once more with a smaller request (about {request.tokens:,} -> "
                 f"{retry.tokens:,} prompt tokens, max_tokens {request.max_tokens} -> {retry.max_tokens})", "warning")
        try:
            return self._call(exp, retry, usage, answer)
        except LLMError as e:
            if e.kind not in ("timeout", "context"):
                raise self._skip_or_fatal(e, answer) from None
            self._unusable(e.kind, str(e))
            raise SkipExperiment(self._failed(e, retry, "a smaller request too")) from None

    def _failed(self, e: LLMError, request: Request, why: str) -> str:
        what = "no answer in time" if e.kind == "timeout" else "the prompt does not fit the model's context"
        return (f"{what} ({e}; about {request.tokens:,} prompt tokens, max_tokens {request.max_tokens}; {why}): try "
                f"{ADVICE[e.kind]}")

    def _skip_or_fatal(self, e: LLMError, answer=None) -> Exception:
        if answer is not None and schema_rejected(e):
            if not self._strict():
                return SchemaRejected(str(e))
            return FatalError(f"the LLM server rejected the answer schema that --answer-format json asks for ({e}): "
                              f"use --answer-format auto or text")
        if e.kind == "fatal":
            return FatalError(self._fatal_message(e, during="experiment"))
        if e.kind == "request":
            return SkipExperiment(f"LLM request rejected: {e}")
        return SkipExperiment(f"LLM unavailable after {self.policy.attempts} attempts: {e}", outage=True)

    def _call(self, exp: int, request: Request, usage: Usage, answer=None):
        """One request through the retry policy; every attempt is recorded in runs/expN.llm.jsonl."""
        def record(reply, error, seconds):
            self._record(exp, request, reply, error, seconds)
            if reply is not None:
                usage.add(reply, self.provider.model, self.free)
                self.usage.add(reply, self.provider.model, self.free)
                if reply.input_tokens:
                    self.count.learn(request_chars(request.system, request.messages), reply.input_tokens)
            else:
                usage.failed += 1
                self.usage.failed += 1
            if self.on_call is not None:
                self.on_call()

        return self._with_retry(lambda: self.provider.complete(request.system, request.messages, answer,
                                                               request.max_tokens),
                                f"exp{exp}", on_result=record)

    def _with_retry(self, fn, label: str, retry=("retryable",), on_result=None):
        state, before = self.status.state, self.status.message

        def attempt():
            t0 = time.monotonic()
            try:
                result = run_interruptibly(fn, lambda: self.controls.cancel_reason() is not None,
                                           timeout=self.cfg.llm_timeout)
            except (LLMError, Interrupted) as e:
                if on_result:
                    on_result(None, e, time.monotonic() - t0)
                raise
            if on_result:
                on_result(result, None, time.monotonic() - t0)
            return result

        def on_retry(n, delay, err):
            self.status.set(State.WAITING, f"{label}: LLM {err}: retry {n}/{self.policy.attempts - 1} in {delay:.1f}s")

        def wait(delay):
            ok = self.controls.wait(delay)
            self.status.set(state, f"{before} (retrying the LLM call)" if before else f"{label}: retrying the LLM call")
            return ok

        return call_with_retry(attempt, self.policy, wait, on_retry, retry=retry)

    # -- what is kept and what is concluded -------------------------------------------------------------------------

    def _record(self, exp: int, request: Request, reply, error, seconds: float) -> None:
        """One line of runs/expN.llm.jsonl, redacted: what was sent (its size), what came back, how long it took."""
        line = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "exp": exp, "prompt_tokens_estimate": request.tokens,
                "prompt_chars": request.chars, "max_tokens": request.max_tokens, "trimmed": request.trimmed,
                "seconds": round(seconds, 2)}
        if reply is not None:
            line.update(reply=reply.text, input_tokens=reply.input_tokens, output_tokens=reply.output_tokens,
                        stop_reason=reply.stop_reason)
        else:
            line.update(error=str(error) if isinstance(error, LLMError) else "interrupted by a command",
                        error_kind=getattr(error, "kind", "interrupted"))
        text = self.redact(json.dumps(line, ensure_ascii=False))
        try:
            append_atomic(self.cfg.runs_dir / f"exp{exp}.llm.jsonl", text + "\n")
        except OSError as e:
            self.log(f"exp{exp}: could not keep the LLM reply ({e})", "warning")

    def _shape(self, reply, request: Request, system: str) -> str:
        """What an unusable answer looks like: cut at the output cap, the prompt copied back, no fields, other."""
        text = reply.text or ""
        if reply.stop_reason == "max_tokens" or (reply.output_tokens and reply.output_tokens >= request.max_tokens):
            return "truncated"
        own = [ln.strip() for ln in system.splitlines() if len(ln.strip()) >= 30]
        if sum(1 for ln in own if ln in text) >= COPIED_LINES:
            return "copied"
        if not any(word in text.upper() for word in ("DESCRIPTION", "REASONING", "SEARCH", "CODE")):
            return "fields"
        return "other"

    def _unusable(self, shape: str, detail: str) -> None:
        self.unusable.append((shape, detail))

    def _diagnosis_due(self) -> bool:
        return bool(self.cfg.max_unusable_answers) and len(self.unusable) >= self.cfg.max_unusable_answers

    def diagnosis(self) -> str | None:
        """Why the loop should stop, once max_unusable_answers answers in a row could not be used; else None."""
        if not self._diagnosis_due():
            return None
        shapes = Counter(shape for shape, _ in self.unusable)
        looked = ", ".join(f"{n} {SHAPES[s]}" for s, n in shapes.most_common())
        advice = "; ".join(dict.fromkeys(ADVICE[s] for s, _ in shapes.most_common()))
        last = self.unusable[-1][1]
        return (f"{len(self.unusable)} answers in a row from {self.describe()} could not be used ({looked}; the last: "
                f"{last[:200]}): this model cannot do the job as set up. Try {advice}. Every reply is in "
                f"{self.cfg.runs_dir}/expN.llm.jsonl")

    def _fatal_message(self, e: LLMError, during: str) -> str:
        p, what = self.cfg.provider, self.describe()
        if e.status in (401, 403) or "authentication" in str(e).lower():
            return (f"LLM authentication failed for {what}: {e}. Check the key with: uv run dashboard.py --check-key "
                    f"--provider {p}; store a new one with --setup-key --provider {p}")
        if e.status == 404:
            return f"LLM {what}: {e}. Check --model (and --base-url)"
        if e.kind in ("retryable", "timeout"):
            return f"cannot reach the LLM {what} ({during}): {e}"
        return f"LLM {what} refused the request ({during}): {e}"
