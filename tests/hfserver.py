"""A real HTTP server on 127.0.0.1 laid out like the Hugging Face file endpoint, with injectable faults.

    GET /datasets/<repo>/resolve/<revision>/<path>   -> file bytes (Range requests answered with 206)

faults[path] is a list consumed one request at a time: "500", "404", "drop" (send half the body of a full-length
response, then close the connection), "truncate" (a complete response whose body is cut short: Content-Length
matches the short body, so only verification can notice), "ignore-range" (answer 200 with the whole file).
"""

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeHub:
    def __init__(self):
        self.files = {}      # (repo, revision, path) -> bytes
        self.faults = {}     # path -> [fault, ...]
        self.requests = []   # (path, range header or None, status)
        self.lock = threading.Lock()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_HEAD(self):
                self.do_GET(head=True)

            def do_GET(self, head=False):
                parts = self.path.split("?")[0].split("/")
                # ['', 'datasets', owner, name, 'resolve', revision, *path]
                if len(parts) < 7 or parts[1] != "datasets" or parts[4] != "resolve":
                    return self._send(404, b"not found")
                repo, revision, path = f"{parts[2]}/{parts[3]}", parts[5], "/".join(parts[6:])
                with hub.lock:
                    queue = hub.faults.get(path) or []
                    fault = queue.pop(0) if (queue and not head) else None   # HEAD probes never consume faults
                    data = hub.files.get((repo, revision, path))
                if head:
                    return self._send(200 if data is not None else 404, b"",
                                      length=len(data) if data is not None else 0)
                rng = self.headers.get("Range")
                if fault == "500":
                    hub._log(path, rng, 500)
                    return self._send(500, b"internal error")
                if data is None or fault == "404":
                    hub._log(path, rng, 404)
                    return self._send(404, b"Entry not found")
                start, status = 0, 200
                if rng and fault != "ignore-range":
                    start = int(rng.split("=")[1].split("-")[0])
                    if start >= len(data):
                        hub._log(path, rng, 416)
                        return self._send(416, b"", {"Content-Range": f"bytes */{len(data)}"})
                    status = 206
                body = data[start:]
                headers = {}
                if status == 206:
                    headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
                hub._log(path, rng, status)
                if fault == "truncate":
                    body = body[: len(body) // 2]
                    headers.pop("Content-Range", None)
                    status = 200
                if fault == "drop":
                    self.send_response(status)
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self._send(status, b"" if head else body, headers, length=len(body))

            def _send(self, status, body, headers=None, length=None):
                self.send_response(status)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body) if length is None else length))
                self.end_headers()
                if body:
                    self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def _log(self, path, rng, status):
        with self.lock:
            self.requests.append((path, rng, status))

    @property
    def endpoint(self):
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def add(self, repo, path, data, revision="main"):
        self.files[(repo, revision, path)] = data

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
