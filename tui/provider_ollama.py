"""Ollama's native API (/api/chat, /api/tags, /api/show) through the `ollama` SDK. Host from --base-url or
OLLAMA_HOST.

A structured answer is asked for with format=<JSON schema> (Ollama constrains decoding to it); the answer is the
message content parsed as JSON. Ollama cuts a prompt longer than its context (num_ctx) without a word, so every call
says num_ctx: the window the prompt was fitted to (use_window; until then the server's own).
"""

from tui.llm_base import AnswerSpec, LLMError, LLMReply, Provider, classify_status, json_object, stop_reason

OLLAMA_WINDOW_CAP = 16384  # a model that could take 128k gets this unless --context-tokens says more: memory grows
# with num_ctx, and 16k holds the file-scope prompt with room for the answer


class OllamaProvider(Provider):
    name = "ollama"
    structured = True

    def __init__(self, model: str, host: str | None = None, timeout: float = 300.0, max_tokens: int = 4096,
                 api_key: str | None = None):
        super().__init__(model)
        import httpx
        import ollama
        self._sdk, self._httpx = ollama, httpx
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
        self._client = ollama.Client(host=host, timeout=timeout, headers=headers)
        self.host = host
        self.max_tokens = max_tokens
        self.num_ctx: int | None = None  # sent with every call once known

    def _call(self, fn):
        try:
            return fn()
        except self._sdk.ResponseError as e:
            raise classify_status(e.status_code, str(e.error)) from None
        except self._httpx.TimeoutException:
            raise LLMError("timeout", "request timed out") from None
        except (ConnectionError, self._httpx.TransportError) as e:
            raise LLMError("retryable", f"connection error: {e}") from None

    def check(self) -> None:
        listing = self._call(self._client.list)
        names = {m.model for m in listing.models if m.model}
        wanted = {self.model, f"{self.model}:latest"}
        if not (names & wanted):
            have = ", ".join(sorted(names)) or "no models"
            raise LLMError("fatal", f"model {self.model!r} is not available on this Ollama server "
                                    f"(have: {have}); run: ollama pull {self.model}, or pass --model")

    def complete(self, system: str, messages: list[dict], answer: AnswerSpec | None = None,
                 max_tokens: int | None = None) -> LLMReply:
        options = {"num_predict": max_tokens or self.max_tokens}
        if self.num_ctx:
            options["num_ctx"] = self.num_ctx
        schema = {"format": answer.schema} if answer is not None else {}
        r = self._call(lambda: self._client.chat(model=self.model,
                                                 messages=[{"role": "system", "content": system}, *messages],
                                                 options=options, **schema))
        text = r.message.content or ""
        return LLMReply(text, r.prompt_eval_count or 0, r.eval_count or 0,
                        data=json_object(text) if answer is not None else None,
                        stop_reason=stop_reason(getattr(r, "done_reason", "")))

    def use_window(self, tokens: int) -> None:
        self.num_ctx = tokens

    def context_window(self) -> int | None:
        """num_ctx when the model's Modelfile sets one, else the model's trained context (model_info
        "<arch>.context_length") capped at OLLAMA_WINDOW_CAP; the window is then sent as num_ctx with every call."""
        try:
            info = self._call(lambda: self._client.show(self.model))
        except LLMError:
            return None
        for line in (info.parameters or "").splitlines():
            words = line.split()
            if len(words) == 2 and words[0] == "num_ctx" and words[1].isdigit():
                return int(words[1])
        trained = [v for k, v in (info.modelinfo or {}).items() if k.endswith(".context_length") and isinstance(v, int)]
        return min(trained[0], OLLAMA_WINDOW_CAP) if trained else None
