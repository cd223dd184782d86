"""A small threaded JSON HTTP server that the fake SaaS endpoints build on."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import ThreadingHTTPServer
from typing import Any, Self

from devhost.handler import ResponseInOneWrite

Reply = tuple[int, Any, dict[str, str]]
Route = Callable[[str, dict[str, str], bytes], Reply]
"""(path, request headers, body) -> (status, JSON-able body, response headers)."""


class Configurable:
    """A fake's settings and counters in `state`, changed under `lock` (tests, `/_fake/config`)."""

    state: Any
    lock: threading.Lock

    def configure(self, **changes: Any) -> None:
        with self.lock:
            for name, value in changes.items():
                setattr(self.state, name, value)


class JsonFake(Configurable):
    """Serves `_get` and `_post` (any path) on a loopback port in a thread."""

    def __init__(self, host: str, port: int, state: Any) -> None:
        self.state = state
        self.lock = threading.Lock()
        routes: dict[str, Route] = {"GET": self._get, "POST": self._post}

        class Handler(ResponseInOneWrite):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _handle(self, method: str) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                route = routes.get(method)
                reply: Reply = (405, {"message": "method not allowed"}, {})
                if route is not None:
                    reply = route(self.path, dict(self.headers.items()), body)
                status, payload, headers = reply
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for key, value in headers.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:  # noqa: N802 (http.server names)
                self._handle("GET")

            def do_POST(self) -> None:  # noqa: N802
                self._handle("POST")

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self.url = f"http://{host}:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> Self:
        self._thread.start()
        return self

    def _get(self, path: str, headers: dict[str, str], body: bytes) -> Reply:
        return 404, {"message": "not found"}, {}

    def _post(self, path: str, headers: dict[str, str], body: bytes) -> Reply:
        return 404, {"message": "not found"}, {}

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
