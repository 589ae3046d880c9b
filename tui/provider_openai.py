"""Any OpenAI-compatible chat-completions endpoint through the `openai` SDK: OpenAI, OpenRouter, vLLM,
llama.cpp server, LM Studio, Ollama's /v1. A structured answer is asked for with response_format json_schema in
strict mode (the servers constrain decoding to it); the answer is the message content parsed as JSON."""

from tui.llm_base import AnswerSpec, LLMError, LLMReply, Provider, json_object, llama_cpp_window, stop_reason, translate_sdk_error

LOCAL_PLACEHOLDER_KEY = "not-needed"  # local servers ignore the key, but the SDK insists on one


def _error_message(e) -> str:
    body = getattr(e, "body", None)
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict):
            return " ".join(str(x) for x in (err.get("message"), err.get("code")) if x) or str(e)
        return str(err)
    return str(getattr(e, "message", None) or e)


class OpenAIProvider(Provider):
    name = "openai"
    structured = True

    def __init__(self, model: str, api_key: str | None, base_url: str | None = None, timeout: float = 300.0,
                 max_tokens: int = 4096, name: str = "openai"):
        super().__init__(model)
        import openai
        self._sdk = openai
        self.name = name
        self.base_url = base_url
        headers = {"X-Title": "autoresearch"} if base_url and "openrouter.ai" in base_url else None
        self._client = openai.OpenAI(api_key=api_key or LOCAL_PLACEHOLDER_KEY, base_url=base_url, timeout=timeout,
                                     max_retries=0, default_headers=headers)
        self.max_tokens = max_tokens

    def _translate(self, e: Exception) -> LLMError:
        return translate_sdk_error(self._sdk, e, _error_message)

    def check(self) -> None:
        try:
            self._client.models.list()
        except self._sdk.OpenAIError as e:
            raise self._translate(e) from None

    def complete(self, system: str, messages: list[dict], answer: AnswerSpec | None = None,
                 max_tokens: int | None = None) -> LLMReply:
        cap = max_tokens or self.max_tokens
        # api.openai.com's newer models only take max_completion_tokens; compatible servers know max_tokens
        extra = {"max_completion_tokens": cap} if self.base_url is None else {"max_tokens": cap}
        if answer is not None:
            extra["response_format"] = {"type": "json_schema", "json_schema": {
                "name": answer.name, "description": answer.description, "strict": True, "schema": answer.schema}}
        try:
            r = self._client.chat.completions.create(
                model=self.model, messages=[{"role": "system", "content": system}, *messages], **extra)
        except self._sdk.OpenAIError as e:
            raise self._translate(e) from None
        if not r.choices:
            raise LLMError("retryable", "empty response (no choices)")
        text = r.choices[0].message.content or ""
        usage = r.usage
        return LLMReply(text, getattr(usage, "prompt_tokens", 0) or 0, getattr(usage, "completion_tokens", 0) or 0,
                        data=json_object(text) if answer is not None else None,
                        stop_reason=stop_reason(r.choices[0].finish_reason))

    def context_window(self) -> int | None:
        # llama.cpp tells (GET /props); OpenAI, OpenRouter, vLLM and LM Studio do not here: the table or the option
        return llama_cpp_window(self.base_url) if self.base_url and "openrouter.ai" not in self.base_url else None
