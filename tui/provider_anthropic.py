"""Anthropic Messages API through the official `anthropic` SDK. A structured answer is a tool the model is made to
call (tool_choice names it); the answer is that tool_use block's input."""

import json
import os

from tui.llm_base import AnswerSpec, LLMError, LLMReply, Provider, llama_cpp_window, stop_reason, translate_sdk_error


def _error_message(e) -> str:
    body = getattr(e, "body", None)
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return str(body["error"].get("message") or body["error"].get("type") or e)
    return str(getattr(e, "message", None) or e)


class AnthropicProvider(Provider):
    name = "anthropic"
    structured = True

    def __init__(self, model: str, api_key: str | None, base_url: str | None = None, timeout: float = 300.0,
                 max_tokens: int = 4096):
        super().__init__(model)
        import anthropic
        self._sdk = anthropic
        # our retry policy does the retrying, so the SDK's own is off
        self._client = anthropic.Anthropic(api_key=api_key, base_url=base_url, timeout=timeout, max_retries=0)
        self.max_tokens = max_tokens
        self.base_url = base_url or os.environ.get("ANTHROPIC_BASE_URL") or None  # the SDK reads it too

    def _translate(self, e: Exception) -> LLMError:
        return translate_sdk_error(self._sdk, e, _error_message)

    def check(self) -> None:
        # retrieving the model is free and proves both the key and the model name
        try:
            self._client.models.retrieve(self.model)
        except self._sdk.AnthropicError as e:
            raise self._translate(e) from None

    def complete(self, system: str, messages: list[dict], answer: AnswerSpec | None = None,
                 max_tokens: int | None = None) -> LLMReply:
        tools = {}
        if answer is not None:
            tools = {"tools": [{"name": answer.name, "description": answer.description,
                                "input_schema": answer.schema}],
                     "tool_choice": {"type": "tool", "name": answer.name}}
        try:
            r = self._client.messages.create(model=self.model, max_tokens=max_tokens or self.max_tokens,
                                             system=system, messages=messages, **tools)
        except self._sdk.AnthropicError as e:
            raise self._translate(e) from None
        text = "".join(getattr(b, "text", "") for b in r.content if getattr(b, "type", "") == "text")
        call = next((b for b in r.content if getattr(b, "type", "") == "tool_use"), None)
        data = call.input if call is not None and isinstance(call.input, dict) else None
        if data is not None:
            text = json.dumps(data, ensure_ascii=False)
        usage = getattr(r, "usage", None)
        return LLMReply(text, getattr(usage, "input_tokens", 0) or 0, getattr(usage, "output_tokens", 0) or 0,
                        data=data, stop_reason=stop_reason(r.stop_reason))

    def context_window(self) -> int | None:
        # a custom base URL may be a llama.cpp server (it speaks the Messages API too); Anthropic's own: the table
        return llama_cpp_window(self.base_url)
