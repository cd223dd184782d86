"""HTTP triggers served as `func start` serves them: `/{routePrefix}/{route}`.

Route templates follow ASP.NET Core routing as the host uses it: `{name}`, `{name?}`,
`{name:int}` (and `alpha`, `bool`, `guid`, `long`, `double`), `{*rest}` catch-alls. Local
runs do not check function keys, as with Core Tools. `POST /admin/functions/{name}`
invokes a non-HTTP function on demand, like the host's admin API.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import azure.functions as func

from devhost.app import HostedFunction
from devhost.handler import ResponseInOneWrite

log = logging.getLogger("devhost.http")

_CONSTRAINTS = {
    "int": r"-?\d+",
    "long": r"-?\d+",
    "double": r"-?\d+(?:\.\d+)?",
    "bool": r"(?i:true|false)",
    "alpha": r"[A-Za-z]+",
    "guid": r"[0-9A-Fa-f]{8}-(?:[0-9A-Fa-f]{4}-){3}[0-9A-Fa-f]{12}",
}
_PARAM = re.compile(r"\{(\*?)([A-Za-z_][A-Za-z0-9_]*)(?::([a-z]+))?(\?)?\}")


def compile_route(template: str) -> re.Pattern[str]:
    """Regex for a route template (without the prefix)."""
    pattern = ""
    position = 0
    for match in _PARAM.finditer(template):
        pattern += re.escape(template[position : match.start()])
        catch_all, name, constraint, optional = match.groups()
        if constraint and constraint not in _CONSTRAINTS:
            raise ValueError(f"route {template!r}: unsupported constraint {constraint!r}")
        body = ".*" if catch_all else _CONSTRAINTS.get(constraint or "", r"[^/]+")
        group = f"(?P<{name}>{body})"
        if optional or catch_all:
            if pattern.endswith("/"):
                pattern = pattern[:-1] + f"(?:/{group})?"
            else:
                pattern += f"{group}?"
        else:
            pattern += group
        position = match.end()
    pattern += re.escape(template[position:])
    return re.compile(f"^{pattern}/?$", re.IGNORECASE)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # A burst of connections (providers' webhooks) waits in the backlog instead of being
    # reset: the socketserver default of 5 is far below what the Functions front end takes.
    request_queue_size = 256


@dataclass
class Route:
    function: HostedFunction
    pattern: re.Pattern[str]
    methods: set[str] | None


def build_routes(functions: list[HostedFunction]) -> list[Route]:
    routes = []
    for function in functions:
        if function.trigger_type != "httpTrigger":
            continue
        template = function.trigger.get("route") or function.name
        methods = function.trigger.get("methods")
        routes.append(
            Route(
                function,
                compile_route(template.strip("/")),
                {m.upper() for m in methods} if methods else None,
            )
        )
    # Literal segments beat parameters, as in ASP.NET routing: fewer groups first.
    routes.sort(key=lambda r: (r.pattern.groups, -len(r.pattern.pattern)))
    return routes


def _to_wire(result: Any) -> tuple[int, dict[str, str], bytes]:
    if isinstance(result, func.HttpResponse):
        headers = dict(result.headers)
        if result.mimetype and "content-type" not in {k.lower() for k in headers}:
            headers["Content-Type"] = f"{result.mimetype}; charset={result.charset}"
        return result.status_code, headers, result.get_body() or b""
    if result is None:
        return 204, {}, b""
    if isinstance(result, bytes):
        return 200, {"Content-Type": "application/octet-stream"}, result
    return 200, {"Content-Type": "text/plain; charset=utf-8"}, str(result).encode()


def _json_error(status: int, code: str, message: str) -> tuple[int, dict[str, str], bytes]:
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    return status, {"Content-Type": "application/json"}, body


class HttpFrontEnd:
    """A threaded HTTP server dispatching to the app's HTTP functions."""

    def __init__(
        self,
        functions: list[HostedFunction],
        *,
        host: str,
        port: int,
        route_prefix: str,
        invoke_admin: Callable[[HostedFunction, dict[str, Any]], None],
    ) -> None:
        self.routes = build_routes(functions)
        self.by_name = {f.name.lower(): f for f in functions}
        self.prefix = f"/{route_prefix}" if route_prefix else ""
        self._invoke_admin = invoke_admin
        front = self

        class Handler(ResponseInOneWrite):
            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                status, headers, payload = front.dispatch(
                    self.command, self.path, dict(self.headers.items()), body, self.server
                )
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = _serve  # noqa: N815

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("%s - %s", self.address_string(), format % args)

        self.server = _Server((host, port), Handler)
        self.host = host
        self.port = int(self.server.server_address[1])
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def dispatch(
        self, method: str, raw_path: str, headers: dict[str, str], body: bytes, server: Any
    ) -> tuple[int, dict[str, str], bytes]:
        parts = urlsplit(raw_path)
        path = parts.path
        if path.lower().startswith("/admin/functions/") and method == "POST":
            return self._admin(path.rsplit("/", 1)[-1], body)
        if not path.lower().startswith(self.prefix.lower() + "/"):
            return _json_error(404, "not_found", f"no route for {path}")
        relative = path[len(self.prefix) + 1 :].strip("/")
        allowed: set[str] = set()
        for route in self.routes:
            match = route.pattern.match(relative)
            if not match:
                continue
            if route.methods is not None and method not in route.methods:
                allowed |= route.methods
                continue
            params = {k: v for k, v in match.groupdict().items() if v is not None}
            host, port = server.server_address[:2]
            request = func.HttpRequest(
                method=method,
                url=f"http://{host}:{port}{raw_path}",
                headers=headers,
                params=dict(parse_qsl(parts.query, keep_blank_values=True)),
                route_params=params,
                body=body,
            )
            try:
                return _to_wire(route.function.invoke({route.function.trigger["name"]: request}))
            except Exception:
                log.exception("function %s failed", route.function.name)
                return 500, {}, b""
        if allowed:
            return _json_error(405, "method_not_allowed", f"{method} not allowed on {path}")
        return _json_error(404, "not_found", f"no route for {path}")

    def _admin(self, name: str, body: bytes) -> tuple[int, dict[str, str], bytes]:
        function = self.by_name.get(name.lower())
        if function is None:
            return _json_error(404, "function_not_found", f"no function named {name}")
        if function.trigger_type == "httpTrigger":
            return _json_error(400, "http_function", "call HTTP functions on their route")
        try:
            payload = json.loads(body or b"{}")
        except json.JSONDecodeError:
            return _json_error(400, "bad_json", "admin body must be JSON")
        self._invoke_admin(function, payload)
        return 202, {}, b""
