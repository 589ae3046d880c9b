"""Real HTTP servers on 127.0.0.1 that speak the Anthropic Messages API, the OpenAI chat-completions API and the
Ollama API, answering from a script (a queue of replies: text, errors with status codes, headers and bodies).

    server = FakeLLMServer("anthropic").start()
    server.push(server.text("DESCRIPTION: ..."), server.error(429, "slow down", retry_after=1))
    server.push(server.structured({"description": ...}))  # a tool_use block / JSON content, as each API sends it
    server.push(server.text("DESCRIPTION: ...", stop="max_tokens"))  # cut at the output cap
    ... point the SDK at server.base_url ...
    server.prompts()  # the user prompts the server received, in order
    server.push(server.trickling(server.text("..."), every=0.05))  # the body one byte every 50 ms
    server.reject_schema = True  # a server without structured output: 400 for any request that asks for it
    FakeLLMServer("openai", n_ctx=2048)  # like llama-server -c 2048: GET /props tells it, longer prompts are refused
    FakeLLMServer("anthropic", check=False)  # no GET /v1/models/<id> (llama-server's Messages API)

A chat request is checked the way the real service checks it before any scripted reply is sent: Anthropic's tools
(name, an object input_schema) and tool_choice (naming one of them); OpenAI's response_format (json_schema with a name
and a schema; in strict mode every object has additionalProperties false and requires all its properties); Ollama's
format ("json" or a schema object). A request that fails gets the HTTP 400 the service would send.
"""

import json
import math
import re
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

KINDS = ("anthropic", "openai", "ollama")
CHAT_PATHS = {"anthropic": "/v1/messages", "openai": "/v1/chat/completions", "ollama": "/api/chat"}
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


NAME_RE = re.compile(r"[a-zA-Z0-9_-]{1,64}")
# what a server without structured output answers a request that asks for it (llama.cpp, vLLM, old Ollama)
REJECTIONS = {"anthropic": "tools: Extra inputs are not permitted",
              "openai": "response_format: type json_schema is not supported by this server",
              "ollama": "invalid format: structured outputs are not supported"}
STOPS = {"anthropic": {"end": "end_turn", "max_tokens": "max_tokens", "tool": "tool_use"},
         "openai": {"end": "stop", "max_tokens": "length", "tool": "stop"},
         "ollama": {"end": "stop", "max_tokens": "length", "tool": "stop"}}


def _strict_problem(schema, where=()) -> str | None:
    """What OpenAI's strict mode refuses in a schema: an object without additionalProperties false, or one whose
    required list leaves out a property."""
    if not isinstance(schema, dict):
        return f"In context={where}, schema must be an object"
    if schema.get("type") == "object" or "properties" in schema:
        if schema.get("additionalProperties") is not False:
            return f"In context={where}, 'additionalProperties' is required to be supplied and to be false."
        props = schema.get("properties") or {}
        missing = [k for k in props if k not in (schema.get("required") or [])]
        if missing:
            return (f"In context={where}, 'required' is required to be supplied and to be an array including every "
                    f"key in properties. Missing '{missing[0]}'.")
        for key, sub in props.items():
            problem = _strict_problem(sub, where + ("properties", key))
            if problem:
                return problem
    if "items" in schema:
        return _strict_problem(schema["items"], where + ("items",))
    for i, sub in enumerate(schema.get("anyOf") or []):
        problem = _strict_problem(sub, where + ("anyOf", i))
        if problem:
            return problem
    return None


def anthropic_problem(body: dict) -> str | None:
    tools = body.get("tools")
    if not isinstance(body.get("max_tokens"), int):
        return "max_tokens: Field required"
    names = []
    if tools is not None:
        if not isinstance(tools, list):
            return "tools: Input should be a valid list"
        for i, tool in enumerate(tools):
            if not isinstance(tool, dict) or not NAME_RE.fullmatch(str(tool.get("name", ""))):
                return f"tools.{i}.name: String should match pattern '^[a-zA-Z0-9_-]{{1,64}}$'"
            schema = tool.get("input_schema")
            if not isinstance(schema, dict):
                return f"tools.{i}.custom.input_schema: Field required"
            if schema.get("type") != "object":
                return f"tools.{i}.custom.input_schema.type: Input should be 'object'"
            names.append(tool["name"])
    choice = body.get("tool_choice")
    if choice is not None:
        if not tools:
            return "tool_choice: tool_choice may only be specified while providing tools"
        if not isinstance(choice, dict) or choice.get("type") not in ("auto", "any", "tool", "none"):
            return "tool_choice.type: Input should be 'auto', 'any', 'tool' or 'none'"
        if choice["type"] == "tool" and choice.get("name") not in names:
            return f"tool_choice: Tool '{choice.get('name')}' not found in tools"
    return None


def openai_problem(body: dict) -> str | None:
    fmt = body.get("response_format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
        return "Invalid value for 'response_format.type': expected 'text', 'json_object' or 'json_schema'"
    if fmt["type"] != "json_schema":
        return None
    spec = fmt.get("json_schema")
    if not isinstance(spec, dict) or "name" not in spec:
        return "Missing required parameter: 'response_format.json_schema.name'."
    if not NAME_RE.fullmatch(str(spec["name"])):
        return "Invalid 'response_format.json_schema.name': string does not match pattern '^[a-zA-Z0-9_-]+$'"
    schema = spec.get("schema")
    if not isinstance(schema, dict):
        return "Missing required parameter: 'response_format.json_schema.schema'."
    if spec.get("strict"):
        if schema.get("type") != "object":
            return f"Invalid schema for response_format '{spec['name']}': schema must be a JSON Schema of 'type: " \
                   f"\"object\"', got 'type: \"{schema.get('type')}\"'."
        problem = _strict_problem(schema)
        if problem:
            return f"Invalid schema for response_format '{spec['name']}': {problem}"
    return None


def ollama_problem(body: dict) -> str | None:
    fmt = body.get("format")
    if fmt in (None, "", "json") or (isinstance(fmt, dict) and fmt.get("type")):
        return None
    return 'invalid format: expected "json" or a JSON schema'


PROBLEMS = {"anthropic": anthropic_problem, "openai": openai_problem, "ollama": ollama_problem}


def asks_for_schema(kind: str, body: dict) -> bool:
    key = {"anthropic": "tools", "openai": "response_format", "ollama": "format"}[kind]
    return bool(body.get(key))


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
        self.reject_schema = False  # True: a server without structured output (400 when a request asks for it)
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

    def text(self, text: str, input_tokens: int = 1000, output_tokens: int = 200, stop: str = "end") -> Reply:
        """A free-text answer; stop="max_tokens": the reply ended at the output cap."""
        content = [{"type": "text", "text": text}]
        return self._message(content, text, input_tokens, output_tokens, stop)

    def structured(self, data: dict, input_tokens: int = 1000, output_tokens: int = 200, stop: str = "tool",
                   name: str = "propose_experiment") -> Reply:
        """A structured answer as each API sends it: Anthropic a tool_use block with `data` as its input, the others
        the JSON as the message content. stop="max_tokens": cut at the output cap (the JSON text half sent)."""
        text = json.dumps(data)
        if stop == "max_tokens":
            text = text[:len(text) // 2]
        content = [{"type": "tool_use", "id": "toolu_fake", "name": name, "input": data}]
        return self._message(content, text, input_tokens, output_tokens, stop)

    def _message(self, content: list, text: str, input_tokens: int, output_tokens: int, stop: str) -> Reply:
        reason = STOPS[self.kind][stop]
        if self.kind == "anthropic":
            body = {"id": "msg_fake", "type": "message", "role": "assistant", "model": "fake",
                    "content": content, "stop_reason": reason, "stop_sequence": None,
                    "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens}}
        elif self.kind == "openai":
            body = {"id": "chatcmpl-fake", "object": "chat.completion", "created": 0, "model": "fake",
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                 "finish_reason": reason}],
                    "usage": {"prompt_tokens": input_tokens, "completion_tokens": output_tokens,
                              "total_tokens": input_tokens + output_tokens}}
        else:
            body = {"model": "fake", "created_at": "2025-01-01T00:00:00Z",
                    "message": {"role": "assistant", "content": text}, "done": True, "done_reason": reason,
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
        chat = CHAT_PATHS[self.kind]
        return [r for r in self.requests if r.method == "POST" and r.path.split("?")[0] == chat]

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
        expected = CHAT_PATHS[self.kind]
        if path != expected:
            return self.error(404, f"no route POST {path}")
        body = req.body if isinstance(req.body, dict) else {}
        if self.reject_schema and asks_for_schema(self.kind, body):
            return self.error(400, REJECTIONS[self.kind])
        problem = PROBLEMS[self.kind](body)
        if problem:
            return self.error(400, problem)
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
