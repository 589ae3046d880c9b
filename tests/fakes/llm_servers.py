"""Real HTTP servers on 127.0.0.1 that speak the Anthropic Messages API, the OpenAI chat-completions API and the
Ollama API, answering from a script (a queue of replies: text, errors with status codes, headers and bodies).

    server = FakeLLMServer("anthropic").start()
    server.push(server.text("DESCRIPTION: ..."), server.error(429, "slow down", retry_after=1))
    ... point the SDK at server.base_url ...
    server.prompts()  # the user prompts the server received, in order
    server.push(server.trickling(server.text("..."), every=0.05))  # the body one byte every 50 ms

    FakeLLMServer("openai", n_ctx=2048)  # like llama-server -c 2048: GET /props tells it, longer prompts are refused
    FakeLLMServer("anthropic", check=False)  # no GET /v1/models/<id> (llama-server's Messages API)
"""

import json
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

KINDS = ("anthropic", "openai", "ollama")
CHARS_PER_TOKEN = 3.1  # what llama-server counted with Gemma 3's tokenizer for train.py
TEMPLATE_TOKENS = 4  # per message: <start_of_turn>role ... <end_of_turn>


def count_tokens(body: dict) -> int:
    """The prompt tokens of a chat request, as a llama.cpp server with a Gemma-like tokenizer counts them."""
    texts = [body.get("system") or ""] if isinstance(body.get("system"), str) else []
    messages = body.get("messages") or []
    texts += [m.get("content") if isinstance(m.get("content"), str) else
              "".join(part.get("text", "") for part in m.get("content") or []) for m in messages]
    return sum(math.ceil(len(t) / CHARS_PER_TOKEN) for t in texts) + TEMPLATE_TOKENS * (len(messages) + 1)


@dataclass
class Reply:
    status: int = 200
    body: object = None  # dict -> JSON; str -> sent as is
    headers: dict = field(default_factory=dict)
    delay: float = 0.0  # seconds to wait before answering (timeouts)
    trickle: float = 0.0  # seconds between the body's bytes: every read gets data, the answer takes ages


@dataclass
class Request:
    method: str
    path: str
    headers: dict
    body: object
    at: float


def _error_type(status: int) -> str:
    return {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
            404: "not_found_error", 429: "rate_limit_error", 529: "overloaded_error"}.get(status, "api_error")


class FakeLLMServer:
    """n_ctx: a llama.cpp server's context (GET /props says it unless props=False; a longer prompt is refused with
    llama-server's own HTTP 400, a prompt and answer longer than it are cut there, usage counts the prompt);
    overflow_500: refuse with llama.cpp's older HTTP 500 "Context size has been exceeded" (no numbers) instead;
    check=False: no start-up check endpoint (404)."""

    def __init__(self, kind: str, models=("qwen2.5-coder:7b",), n_ctx: int | None = None, props: bool = True,
                 overflow_500: bool = False, check: bool = True):
        assert kind in KINDS
        self.kind = kind
        self.n_ctx, self.props, self.overflow_500, self.check = n_ctx, props, overflow_500, check
        self.chat_replies: deque = deque()
        self.check_replies: deque = deque()
        self.requests: list = []
        self.default_chat = None  # callable(request_body) -> Reply when the queue is empty
        self.models = list(models)
        self._httpd = None
        self._stopped = threading.Event()  # ends trickles, so no handler outlives the test

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> "FakeLLMServer":
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _body(self):
                n = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(n) if n else b""
                try:
                    return json.loads(raw) if raw else None
                except ValueError:
                    return raw.decode(errors="replace")

            def _handle(self, method):
                req = Request(method, self.path, {k.lower(): v for k, v in self.headers.items()}, self._body(),
                              time.monotonic())
                server.requests.append(req)
                reply = server._route(req)
                if reply.delay:
                    time.sleep(reply.delay)
                data = reply.body if isinstance(reply.body, (bytes, str)) else json.dumps(reply.body)
                data = data.encode() if isinstance(data, str) else data
                try:
                    self.send_response(reply.status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for k, v in reply.headers.items():
                        self.send_header(k, str(v))
                    self.end_headers()
                    if reply.trickle:
                        self._trickle(data, reply.trickle)
                    else:
                        self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def _trickle(self, data, every):
                for i in range(len(data)):
                    if server._stopped.wait(every):
                        self.close_connection = True  # the client sees the connection end, not a stall
                        return
                    self.wfile.write(data[i:i + 1])

            def do_GET(self):
                self._handle("GET")

            def do_POST(self):
                self._handle("POST")

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        self._stopped.set()
        if self._httpd:
            self._httpd.shutdown()
            self._httpd.server_close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    @property
    def base_url(self) -> str:
        """What to pass as --base-url for this kind."""
        return self.url + "/v1" if self.kind == "openai" else self.url

    # -- scripting -------------------------------------------------------------

    def push(self, *replies) -> None:
        self.chat_replies.extend(replies)

    def push_check(self, *replies) -> None:
        self.check_replies.extend(replies)

    def text(self, text: str, input_tokens: int = 1000, output_tokens: int = 200) -> Reply:
        if self.kind == "anthropic":
            body = {"id": "msg_fake", "type": "message", "role": "assistant", "model": "fake",
                    "content": [{"type": "text", "text": text}], "stop_reason": "end_turn", "stop_sequence": None,
                    "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens}}
        elif self.kind == "openai":
            body = {"id": "chatcmpl-fake", "object": "chat.completion", "created": 0, "model": "fake",
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                 "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": input_tokens, "completion_tokens": output_tokens,
                              "total_tokens": input_tokens + output_tokens}}
        else:
            body = {"model": "fake", "created_at": "2025-01-01T00:00:00Z",
                    "message": {"role": "assistant", "content": text}, "done": True, "done_reason": "stop",
                    "prompt_eval_count": input_tokens, "eval_count": output_tokens}
        return Reply(200, body)

    def trickling(self, reply: Reply, every: float = 0.05) -> Reply:
        return replace(reply, trickle=every)

    def error(self, status: int, message: str = "error", retry_after=None, code: str | None = None,
              delay: float = 0.0) -> Reply:
        headers = {"Retry-After": retry_after} if retry_after is not None else {}
        if self.kind == "anthropic":
            body = {"type": "error", "error": {"type": code or _error_type(status), "message": message}}
        elif self.kind == "openai":
            body = {"error": {"message": message, "type": code or _error_type(status), "code": code}}
        else:
            body = {"error": message}
        return Reply(status, body, headers, delay)

    # -- inspection ------------------------------------------------------------

    def chat_requests(self) -> list:
        return [r for r in self.requests if r.method == "POST"]

    def prompts(self) -> list:
        """The last user message of each chat request."""
        out = []
        for r in self.chat_requests():
            msgs = [m for m in r.body.get("messages", []) if m.get("role") == "user"]
            content = msgs[-1]["content"] if msgs else ""
            if isinstance(content, list):
                content = "".join(part.get("text", "") for part in content)
            out.append(content)
        return out

    # -- routing ---------------------------------------------------------------

    def _route(self, req: Request) -> Reply:
        path = req.path.split("?")[0]
        if req.method == "GET":
            if self.check_replies:
                return self.check_replies.popleft()
            if path == "/props" and self.n_ctx and self.props:
                return Reply(200, {"default_generation_settings": {"n_ctx": self.n_ctx}, "total_slots": 1,
                                   "model_path": "fake.gguf", "build_info": "fake"})
            if not self.check:
                return Reply(404, {"error": {"code": 404, "message": "File Not Found", "type": "not_found_error"}})
            if self.kind == "anthropic" and path.startswith("/v1/models/"):
                return Reply(200, {"type": "model", "id": path.rsplit("/", 1)[-1], "display_name": "Fake",
                                   "created_at": "2025-01-01T00:00:00Z"})
            if self.kind == "openai" and path == "/v1/models":
                return Reply(200, {"object": "list", "data": [{"id": "fake-model", "object": "model", "created": 0,
                                                                "owned_by": "test"}]})
            if self.kind == "ollama" and path == "/api/tags":
                return Reply(200, {"models": [{"name": m, "model": m, "modified_at": "2025-01-01T00:00:00Z",
                                               "size": 1, "digest": "0" * 12, "details": {}} for m in self.models]})
            return self.error(404, f"no route GET {path}")
        if self.kind == "ollama" and path == "/api/show":  # what `ollama show` prints: the trained context, and
            # num_ctx only when the Modelfile sets one
            return Reply(200, {"modelfile": "", "parameters": f"num_ctx {self.n_ctx}" if self.n_ctx else "",
                               "template": "{{ .Prompt }}", "details": {"format": "gguf", "family": "qwen2"},
                               "model_info": {"general.architecture": "qwen2", "qwen2.context_length": 32768},
                               "capabilities": ["completion"]})
        expected = {"anthropic": "/v1/messages", "openai": "/v1/chat/completions", "ollama": "/api/chat"}[self.kind]
        if path != expected:
            return self.error(404, f"no route POST {path}")
        if self.n_ctx and self.kind != "ollama":  # Ollama cuts a long prompt without a word: num_ctx must be sent
            tokens = count_tokens(req.body)
            if tokens > self.n_ctx:
                if self.overflow_500:
                    return self.error(500, "Context size has been exceeded.")
                return Reply(400, {"error": {"code": 400, "message": f"request ({tokens} tokens) exceeds the available "
                                             f"context size ({self.n_ctx} tokens), try increasing it",
                                             "type": "exceed_context_size_error", "n_prompt_tokens": tokens,
                                             "n_ctx": self.n_ctx}})
        if self.chat_replies:
            reply = self.chat_replies.popleft()
        elif self.default_chat is not None:
            reply = self.default_chat(req.body)
        else:
            return self.error(500, "the test scripted no more replies")
        return self._count(reply, req.body) if self.n_ctx and self.kind != "ollama" and reply.status == 200 else reply

    def _count(self, reply: Reply, body: dict) -> Reply:
        """usage as the server counts it, and the answer cut where generation stops: at the request's max_tokens or
        where the context ends (llama-server stops at n_ctx with finish_reason "length")."""
        tokens = count_tokens(body)
        room = min(self.n_ctx - tokens, body.get("max_tokens") or self.n_ctx)
        data = json.loads(json.dumps(reply.body))
        if self.kind == "openai":
            part, usage, stop = data["choices"][0], "completion_tokens", ("finish_reason", "length")
            text = part["message"]["content"]
            data["usage"]["prompt_tokens"] = tokens
        else:
            part, usage, stop = data["content"][0], "output_tokens", ("stop_reason", "max_tokens")
            text = part["text"]
            data["usage"]["input_tokens"] = tokens
        out = math.ceil(len(text) / CHARS_PER_TOKEN)
        if out > room:
            text, out = text[:int(room * CHARS_PER_TOKEN)], room
            (data["choices"][0] if self.kind == "openai" else data)[stop[0]] = stop[1]
        if self.kind == "openai":
            part["message"]["content"] = text
        else:
            part["text"] = text
        data["usage"][usage] = out
        return replace(reply, body=data)
