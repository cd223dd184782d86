"""A fake APNs provider API: HTTP/2 over TLS (h2 on asyncio), for tests, demo and bench.

`POST /3/device/<hex token>` with `authorization: bearer <ES256 JWT>`, `apns-topic`,
`apns-push-type`, optional `apns-id`, `apns-priority`, `apns-expiration`,
`apns-collapse-id`. Like APNs it verifies the JWT (key id, team, signature, not older
than an hour or than `tokens_expire_before`: 403 ExpiredProviderToken; bad: 403
InvalidProviderToken), the topic (400
TopicDisallowed / DeviceTokenNotForTopic), the token (400 BadDeviceToken), the payload
(413 PayloadTooLarge over 4 KB), answers 410 Unregistered with a `timestamp` for tokens
in `unregistered`, 429 TooManyRequests every `limit_every`-th request and 503 every
`fail_every`-th, and returns `apns-id` on success. Each stream is answered on its own
task, so a fixed `latency_seconds` overlaps across concurrent streams as on APNs.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import ipaddress
import json
import ssl
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.x509.oid import NameOID

from devhost.fakes.base import Configurable

MAX_PAYLOAD_BYTES = 4096


@dataclass
class FakeApnsState:
    team_id: str = "ABCDE12345"
    key_id: str = "KEY1234567"
    topic: str = "com.example.shop"
    public_key_pem: str = ""
    unregistered: dict[str, int] = field(default_factory=dict)
    """token -> the millisecond timestamp APNs reports it stopped being valid."""
    limit_every: int = 0
    fail_every: int = 0
    latency_seconds: float = 0.0
    max_token_age_seconds: int = 3600
    tokens_expire_before: int = 0
    """Provider tokens issued (`iat`) before this Unix second count as expired."""
    requests: int = 0
    delivered: list[dict[str, Any]] = field(default_factory=list)


def self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    """A localhost certificate and key (PEM files) the fake serves and clients trust."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.UTC)
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        ), critical=False)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    cert_path, key_path = directory / "apns-fake.crt", directory / "apns-fake.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )  # fmt: skip
    return cert_path, key_path


def _b64(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


class FakeApns(Configurable):
    def __init__(self, host: str = "127.0.0.1", port: int = 0, **config: Any) -> None:
        self.state = FakeApnsState(**config)
        self.lock = threading.Lock()
        self._host, self._port = host, port
        self._directory = tempfile.TemporaryDirectory(prefix="fake-apns-")
        self.cert_path, key_path = self_signed_certificate(Path(self._directory.name))
        self._ssl = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._ssl.load_cert_chain(self.cert_path, key_path)
        self._ssl.set_alpn_protocols(["h2"])
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._server: asyncio.Server | None = None
        self.url = ""

    def start(self) -> FakeApns:
        self._thread.start()
        self._ready.wait(10)
        return self

    def stop(self) -> None:
        """Close the listener and every connection, then the loop (nothing left pending)."""

        async def shut_down() -> None:
            if self._server is not None:
                self._server.close()
            pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shut_down(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
        self._directory.cleanup()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._serve, self._host, self._port, ssl=self._ssl)
        )
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"https://127.0.0.1:{port}"
        self._ready.set()
        self._loop.run_forever()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connection = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding="utf-8")
        )
        connection.initiate_connection()
        connection.update_settings({h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 1000})
        writer.write(connection.data_to_send())
        streams: dict[int, dict[str, Any]] = {}
        answering: set[asyncio.Task[None]] = set()  # held until done (tasks are weakly kept)
        send_lock = asyncio.Lock()
        try:
            while data := await reader.read(65536):
                for event in connection.receive_data(data):
                    if isinstance(event, h2.events.RequestReceived):
                        streams[event.stream_id] = {"headers": dict(event.headers), "body": b""}
                    elif isinstance(event, h2.events.DataReceived):
                        streams[event.stream_id]["body"] += event.data
                        connection.acknowledge_received_data(
                            event.flow_controlled_length, event.stream_id
                        )
                    elif isinstance(event, h2.events.StreamEnded):
                        request = streams.pop(event.stream_id)
                        task = asyncio.ensure_future(
                            self._answer(connection, writer, send_lock, event.stream_id, request)
                        )
                        answering.add(task)
                        task.add_done_callback(answering.discard)
                writer.write(connection.data_to_send())
                await writer.drain()
        except (ConnectionError, h2.exceptions.ProtocolError, ssl.SSLError):
            pass
        finally:
            for task in answering:
                task.cancel()
            writer.close()

    async def _answer(
        self, connection: Any, writer: asyncio.StreamWriter, lock: asyncio.Lock,
        stream_id: int, request: dict[str, Any],
    ) -> None:  # fmt: skip
        if self.state.latency_seconds:
            await asyncio.sleep(self.state.latency_seconds)
        status, body, apns_id = self._decide(request["headers"], request["body"])
        headers = [(":status", str(status)), ("apns-id", apns_id)]
        data = json.dumps(body).encode() if body else b""
        if data:
            headers.append(("content-type", "application/json"))
        async with lock:
            try:
                connection.send_headers(stream_id, headers, end_stream=not data)
                if data:
                    connection.send_data(stream_id, data, end_stream=True)
                writer.write(connection.data_to_send())
                await writer.drain()
            except (ConnectionError, h2.exceptions.ProtocolError):
                pass

    def _decide(self, headers: dict[str, str], body: bytes) -> tuple[int, Any, str]:
        apns_id = headers.get("apns-id") or str(uuid.uuid4()).upper()
        with self.lock:
            state = self.state
            state.requests += 1
            if state.limit_every and state.requests % state.limit_every == 0:
                return 429, {"reason": "TooManyRequests"}, apns_id
            if state.fail_every and state.requests % state.fail_every == 0:
                return 503, {"reason": "ServiceUnavailable"}, apns_id
            auth = self._check_jwt(headers.get("authorization", ""))
            if auth:
                return 403, {"reason": auth}, apns_id
            path = headers.get(":path", "")
            token = path.removeprefix("/3/device/")
            if headers.get(":method") != "POST" or not path.startswith("/3/device/"):
                return 405, {"reason": "MethodNotAllowed"}, apns_id
            if headers.get("apns-topic") != state.topic:
                return 400, {"reason": "TopicDisallowed"}, apns_id
            if len(token) < 64 or any(c not in "0123456789abcdefABCDEF" for c in token):
                return 400, {"reason": "BadDeviceToken"}, apns_id
            if len(body) > MAX_PAYLOAD_BYTES:
                return 413, {"reason": "PayloadTooLarge"}, apns_id
            if token in state.unregistered:
                return (
                    410,
                    {"reason": "Unregistered", "timestamp": state.unregistered[token]},
                    apns_id,
                )
            try:
                payload = json.loads(body)
            except ValueError:
                return 400, {"reason": "BadPayload"}, apns_id
            state.delivered.append({"token": token, "payload": payload, "apns_id": apns_id,
                                    "push_type": headers.get("apns-push-type")})  # fmt: skip
            return 200, None, apns_id

    def _check_jwt(self, authorization: str) -> str | None:
        """None if the provider token is good, else APNs' reason."""
        state = self.state
        if not authorization.lower().startswith("bearer "):
            return "MissingProviderToken"
        try:
            header_part, claims_part, signature_part = authorization[7:].split(".")
            header, claims = json.loads(_b64(header_part)), json.loads(_b64(claims_part))
            signature = _b64(signature_part)
            key = serialization.load_pem_public_key(state.public_key_pem.encode())
            assert isinstance(key, ec.EllipticCurvePublicKey)
            der = encode_dss_signature(
                int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
            )
            key.verify(der, f"{header_part}.{claims_part}".encode(), ec.ECDSA(hashes.SHA256()))
        except (ValueError, InvalidSignature, AssertionError, KeyError):
            return "InvalidProviderToken"
        if header.get("alg") != "ES256" or header.get("kid") != state.key_id:
            return "InvalidProviderToken"
        if claims.get("iss") != state.team_id:
            return "InvalidProviderToken"
        issued = float(claims.get("iat", 0))
        if (
            time.time() - issued > state.max_token_age_seconds
            or issued < state.tokens_expire_before
        ):
            return "ExpiredProviderToken"
        return None
