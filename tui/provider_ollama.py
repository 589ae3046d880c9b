"""Ollama's native API (/api/chat, /api/tags) through the `ollama` SDK. Host from --base-url or OLLAMA_HOST.
A structured answer is asked for with format=<JSON schema> (Ollama constrains decoding to it); the answer is the
message content parsed as JSON."""

from tui.llm_base import AnswerSpec, LLMError, LLMReply, Provider, classify_status, json_object, normalise_stop


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

    def _call(self, fn):
        try:
            return fn()
        except self._sdk.ResponseError as e:
            raise classify_status(e.status_code, str(e.error)) from None
        except self._httpx.TimeoutException:
            raise LLMError("retryable", "request timed out") from None
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

    def complete(self, system: str, messages: list[dict], answer: AnswerSpec | None = None) -> LLMReply:
        schema = {"format": answer.schema} if answer is not None else {}
        r = self._call(lambda: self._client.chat(model=self.model,
                                                 messages=[{"role": "system", "content": system}, *messages],
                                                 options={"num_predict": self.max_tokens}, **schema))
        text = r.message.content or ""
        return LLMReply(text, r.prompt_eval_count or 0, r.eval_count or 0,
                        data=json_object(text) if answer is not None else None,
                        stop_reason=normalise_stop(r.done_reason))
