"""A fake Braze REST endpoint for tests, demo and benchmarks: `POST /users/track`.

Speaks the documented wire protocol: Bearer auth (401 on a wrong key), at most
`max_objects` objects per request (400 "Max Input Length Exceeded"), 4 MB bodies (413),
per-item non-fatal `errors` ({type, input_array, index}), `_update_existing_only` against
the profiles it knows, and injectable 5xx answers. It applies what it accepts to its own
profiles, so a test can compare the destination's final state.

Rate limit as Braze documents it: `rate_limit` requests per `rate_window_seconds` (3,000
per 3 s for /users/track), counted in fixed windows; a request past it is answered 429 with
`X-RateLimit-Limit`, `-Remaining`, `-Reset` and `Retry-After` (the window's end).
`rate_per_second` is the same with 1-second windows.

Latency: each answer waits a draw from a log-normal distribution with median
`latency_seconds` and shape `latency_sigma` (0: always the median), capped at
`latency_max_seconds`; 100 ms with sigma 0.3 is a REST round trip to a Braze cluster from
the same continent, with its tail.

Control from Python (`FakeBraze` object) or over HTTP (`GET /_fake/profiles`,
`GET /_fake/received`, `GET /_fake/stats`, `POST /_fake/config`) when it runs as its own
process (`python -m devhost.fakes.braze`); `/_fake/stats` carries the process's CPU seconds
so a benchmark can show that the fake was not the bottleneck.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import resource
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import orjson

from devhost.fakes.base import JsonFake, Reply

MAX_BODY_BYTES = 4 * 1024 * 1024


@dataclass
class FakeBrazeState:
    api_key: str = "fake-braze-key"
    max_objects: int = 75
    rate_per_second: float | None = None
    rate_limit: int | None = None
    """Requests per `rate_window_seconds` (None: no limit, unless `rate_per_second`)."""
    rate_window_seconds: float = 3.0
    latency_seconds: float = 0.0
    latency_sigma: float = 0.0
    latency_max_seconds: float = 5.0
    latency_seed: int = 7
    fail_next: list[int] = field(default_factory=list)
    fail_every: int = 0
    """Answer every n-th request with 503 (0: never), for 5xx storms."""
    limit_every: int = 0
    """Answer every n-th request with 429 (0: never), for rate-limit storms that do not
    depend on how fast the client happens to be."""
    profiles: dict[str, dict[str, Any]] = field(default_factory=dict)
    requests: int = 0
    accepted_objects: int = 0
    rate_limited: int = 0
    server_errors: int = 0
    record_objects: bool = True
    received: list[dict[str, Any]] = field(default_factory=list)
    """Every attributes object accepted, in order (when record_objects is on)."""
    window_start: float = 0.0
    window_count: int = 0
    busiest_window: int = 0
    """The most requests accepted in one rate window so far."""


def _profile_key(item: dict[str, Any]) -> str | None:
    """The profile an object is for: its `external_id`, else its `email` (which Braze
    prefers to `phone` when both are given), else its `phone`; other identifiers are
    keyed as `email:<address>` and `phone:<number>`."""
    for name in ("external_id", "email", "phone"):
        value = item.get(name)
        if isinstance(value, str) and value:
            return value if name == "external_id" else f"{name}:{value}"
    return None


def _apply(profile: dict[str, Any], attributes: dict[str, Any]) -> None:
    for name, value in attributes.items():
        if name in ("external_id", "braze_id", "user_alias") or name.startswith("_"):
            continue
        if value is None:
            profile.pop(name, None)
        elif isinstance(value, dict) and set(value) <= {"add", "remove"} and value:
            current = list(profile.get(name) or [])
            for item in value.get("remove", []):
                while item in current:
                    current.remove(item)
            for item in value.get("add", []):
                if item in current:
                    current.remove(item)
                current.append(item)
            profile[name] = current
        else:
            profile[name] = value


class FakeBraze(JsonFake):
    def __init__(self, host: str = "127.0.0.1", port: int = 0, **config: Any) -> None:
        super().__init__(host, port, FakeBrazeState(**config))
        self._random = random.Random(self.state.latency_seed)

    def _get(self, path: str, headers: dict[str, str], body: bytes) -> Reply:
        with self.lock:
            if path == "/_fake/profiles":
                return 200, self.state.profiles, {}
            if path == "/_fake/received":
                return 200, self.state.received, {}
            if path == "/_fake/stats":
                return 200, self.stats(), {}
        return 404, {"message": "not found"}, {}

    def _post(self, path: str, headers: dict[str, str], body: bytes) -> Reply:
        if path == "/_fake/config":
            self.configure(**json.loads(body or b"{}"))
            return 200, {"ok": True}, {}
        if path == "/users/track":
            status, payload, reply_headers = self.track(headers, body)
            return status, payload, reply_headers or {}
        return 404, {"message": "not found"}, {}

    def configure(self, **changes: Any) -> None:
        with self.lock:
            known = changes.pop("known_profiles", None)
            for name, value in changes.items():
                setattr(self.state, name, value)
            for external_id in known or []:
                self.state.profiles.setdefault(external_id, {})

    def reset(self, known_profiles: list[str]) -> None:
        """Forget everything: only `known_profiles` exist, with no attributes."""
        with self.lock:
            self.state = FakeBrazeState(
                api_key=self.state.api_key, record_objects=self.state.record_objects
            )
            self.state.profiles = {external_id: {} for external_id in known_profiles}

    def stats(self) -> dict[str, Any]:
        """Counters, and this process's CPU seconds (all of it: run the fake on its own)."""
        usage = resource.getrusage(resource.RUSAGE_SELF)
        state = self.state
        return {
            "requests": state.requests, "accepted_objects": state.accepted_objects,
            "rate_limited": state.rate_limited, "server_errors": state.server_errors,
            "busiest_window": state.busiest_window, "cpu_seconds": usage.ru_utime + usage.ru_stime,
        }  # fmt: skip

    def profiles(self) -> dict[str, dict[str, Any]]:
        with self.lock:
            return json.loads(json.dumps(self.state.profiles))

    def _rate_limited(self, now: float) -> dict[str, str] | None:
        state = self.state
        if state.rate_limit is not None:
            limit, window = state.rate_limit, state.rate_window_seconds
        elif state.rate_per_second is not None:
            limit, window = int(state.rate_per_second), 1.0
        else:
            return None
        start = math.floor(now / window) * window
        if start != state.window_start:
            state.window_start, state.window_count = start, 0
        reset = start + window
        if state.window_count >= limit:
            state.rate_limited += 1
            return {
                "X-RateLimit-Limit": str(limit),
                "X-RateLimit-Remaining": "0",
                "X-RateLimit-Reset": str(math.ceil(reset)),
                "Retry-After": f"{max(0.05, reset - now):.2f}",
            }
        state.window_count += 1
        state.busiest_window = max(state.busiest_window, state.window_count)
        return None

    def _latency(self) -> float:
        state = self.state
        if not state.latency_seconds:
            return 0.0
        if not state.latency_sigma:
            return state.latency_seconds
        with self.lock:
            draw = self._random.lognormvariate(math.log(state.latency_seconds), state.latency_sigma)
        return min(draw, state.latency_max_seconds)

    def track(
        self, headers: dict[str, str], body: bytes
    ) -> tuple[int, dict[str, Any], dict[str, str]]:
        delay = self._latency()
        if delay:
            time.sleep(delay)
        try:  # outside the lock: parsing is most of a request's CPU
            request = orjson.loads(body) if len(body) <= MAX_BODY_BYTES else {}
        except orjson.JSONDecodeError:
            request = None
        with self.lock:
            state = self.state
            state.requests += 1
            auth = {k.lower(): v for k, v in headers.items()}.get("authorization", "")
            if auth != f"Bearer {state.api_key}":
                return 401, {"message": "Invalid API key: unknown or missing"}, {}
            limited = self._rate_limited(time.time())
            if not limited and state.limit_every and state.requests % state.limit_every == 0:
                state.rate_limited += 1
                limited = {"X-RateLimit-Remaining": "0", "Retry-After": "0.05"}
            if limited:
                return 429, {"message": "API rate limit reached"}, limited
            if state.fail_next or (state.fail_every and state.requests % state.fail_every == 0):
                status = state.fail_next.pop(0) if state.fail_next else 503
                state.server_errors += 1
                return status, {"message": "Internal server error"}, {}
            if len(body) > MAX_BODY_BYTES:
                return 413, {"message": "Payload too large"}, {}
            if not isinstance(request, dict):
                return 400, {"message": "Invalid JSON"}, {}
            attributes = request.get("attributes") or []
            total = sum(len(request.get(k) or []) for k in ("attributes", "events", "purchases"))
            if total > state.max_objects:
                return 400, {"message": "Max Input Length Exceeded"}, {}
            errors = []
            for index, item in enumerate(attributes):
                key = _profile_key(item)
                if key is None:
                    errors.append({"type": "missing identifier", "input_array": "attributes",
                                   "index": index})  # fmt: skip
                    continue
                if key not in state.profiles:
                    if item.get("_update_existing_only", False):
                        errors.append({"type": f"user '{key[:8]}…' does not exist",
                                       "input_array": "attributes", "index": index})  # fmt: skip
                        continue
                    state.profiles[key] = {}
                _apply(state.profiles[key], item)
                state.accepted_objects += 1
                if state.record_objects:
                    state.received.append(item)
            payload: dict[str, Any] = {"message": "success", "attributes_processed":
                                       len(attributes) - len(errors)}  # fmt: skip
            if errors:
                payload["errors"] = errors
            return 200, payload, {"X-RateLimit-Limit": "3000", "X-RateLimit-Remaining": "2999"}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m devhost.fakes.braze")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--api-key", default="fake-braze-key")
    args = parser.parse_args()
    fake = FakeBraze(port=args.port, api_key=args.api_key).start()
    print(f"fake Braze on {fake.url}", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
