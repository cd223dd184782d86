"""An asyncio HTTPS server for the fakes of push providers: HTTP/2 (h2) or HTTP/1.1 by ALPN.

APNs speaks only HTTP/2; FCM and Google's token endpoint speak both. Each request is
answered on its own task after the fake's `latency_seconds`, so latency overlaps across
concurrent streams and connections as it does on the real services, and the server's own
cost stays small enough that a benchmark measures the client, not the fake.
A subclass implements `answer(method, path, headers, body) -> (status, headers, body)`;
header names arrive lower-cased.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import json
import secrets
import ssl
import tempfile
import threading
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from core.push.h2client import StatelessEncoder
from devhost.fakes.base import Configurable

Answer = tuple[int, Sequence[tuple[str, str]], bytes]
MAX_CONCURRENT_STREAMS = 1000
_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden",
            404: "Not Found", 405: "Method Not Allowed", 410: "Gone",
            413: "Payload Too Large", 429: "Too Many Requests",
            500: "Internal Server Error", 503: "Service Unavailable"}  # fmt: skip


def self_signed_certificate(directory: Path, label: str) -> tuple[Path, Path]:
    """A certificate for localhost and 127.0.0.1 (PEM files) the fake serves and clients
    trust. Its subject is unique, so that several fakes' certificates can share one CA
    bundle (OpenSSL finds an issuer by subject name)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = f"Switchboard {label} {secrets.token_hex(4)}"
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = dt.datetime.now(dt.UTC)
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        ), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    cert_path, key_path = directory / "fake.crt", directory / "fake.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )  # fmt: skip
    return cert_path, key_path


class TlsHttpFake(Configurable):
    state: Any
    protocols: Sequence[str] = ("h2", "http/1.1")
    http1_control_only = False
    """True for HTTP/2-only services (APNs): HTTP/1.1 serves the /_fake/ routes alone."""

    def __init__(self, host: str, port: int, state: Any) -> None:
        self.state = state
        self.lock = threading.Lock()
        self._host, self._port = host, port
        self._directory = tempfile.TemporaryDirectory(prefix="fake-tls-")
        self.cert_path, key_path = self_signed_certificate(
            Path(self._directory.name), type(self).__name__
        )
        self._ssl = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._ssl.load_cert_chain(self.cert_path, key_path)
        self._ssl.set_alpn_protocols(list(self.protocols))
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name=type(self).__name__)
        self._server: asyncio.Server | None = None
        self.url = ""

    def answer(self, method: str, path: str, headers: dict[str, str], body: bytes) -> Answer:
        """The service's answer to one request (header names lower-cased)."""
        raise NotImplementedError

    def client_ssl_context(self) -> ssl.SSLContext:
        """A client context that trusts this fake's certificate (and offers its protocols)."""
        context = ssl.create_default_context(cafile=str(self.cert_path))
        context.set_alpn_protocols(list(self.protocols))
        return context

    def start(self) -> Any:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError(f"{type(self).__name__} did not start")
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
        self._loop.set_exception_handler(_quiet_about_cancelled_connections)
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._serve, self._host, self._port, ssl=self._ssl, backlog=1024)
        )
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"https://127.0.0.1:{port}"
        self._ready.set()
        self._loop.run_forever()

    async def _respond(
        self, method: str, path: str, headers: dict[str, str], body: bytes
    ) -> Answer:
        if path.startswith("/_fake/"):
            return self.control(method, path, body)
        if self.state.latency_seconds:
            await asyncio.sleep(self.state.latency_seconds)
        return self.answer(method, path, headers, body)

    def control(self, method: str, path: str, body: bytes) -> Answer:
        """`POST /_fake/config` (JSON of state fields) and `GET /_fake/state` (counters and
        records), for a fake running in another process (demo)."""
        json_type = [("content-type", "application/json")]
        if method == "POST" and path == "/_fake/config":
            self.configure(**json.loads(body or b"{}"))
            return 204, [], b""
        if method == "GET" and path == "/_fake/state":
            with self.lock:
                state = {k: v for k, v in vars(self.state).items() if k != "public_key_pem"}
                data = json.dumps(state, default=_jsonable)
            return 200, json_type, data.encode()
        return 404, json_type, b'{"error": "no such fake control route"}'

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            alpn = writer.get_extra_info("ssl_object").selected_alpn_protocol()
            if alpn == "h2" or (alpn is None and self.http1_control_only):
                await self._serve_h2(reader, writer)
            else:
                await self._serve_http1(reader, writer)
        except (
            ConnectionError,
            h2.exceptions.ProtocolError,
            ssl.SSLError,
            asyncio.IncompleteReadError,
        ):
            pass
        finally:
            writer.close()

    async def _serve_http1(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                return
            request_line, *lines = head.decode("latin-1").split("\r\n")
            parts = request_line.split(" ")
            if len(parts) != 3:
                writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                return
            method, path, _ = parts
            headers = {}
            for line in lines:
                if ":" in line:
                    name, value = line.split(":", 1)
                    headers[name.strip().lower()] = value.strip()
            length = int(headers.get("content-length") or 0)
            body = await reader.readexactly(length) if length else b""
            reply: Answer = (505, [], b'{"reason": "HTTP/2 only"}')
            if not self.http1_control_only or path.startswith("/_fake/"):
                reply = await self._respond(method, path, headers, body)
            status, reply_headers, data = reply
            out = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}",
                   f"Content-Length: {len(data)}"]  # fmt: skip
            out += [f"{name}: {value}" for name, value in reply_headers]
            writer.write(("\r\n".join(out) + "\r\n\r\n").encode("latin-1") + data)
            await writer.drain()
            if headers.get("connection", "").lower() == "close":
                return

    async def _serve_h2(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        config = h2.config.H2Configuration(
            client_side=False, validate_outbound_headers=False, normalize_outbound_headers=False
        )
        connection = h2.connection.H2Connection(config)
        connection.encoder = StatelessEncoder()
        connection.local_settings = h2.settings.Settings(
            client=False,
            initial_values={
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: MAX_CONCURRENT_STREAMS
            },
        )
        connection.initiate_connection()
        # A large connection window, so many concurrent 4 KB payloads never stall.
        connection.increment_flow_control_window(2**24)
        writer.write(connection.data_to_send())
        streams: dict[int, tuple[dict[str, str], bytearray]] = {}
        loop = asyncio.get_running_loop()
        flush = _Flusher(loop, connection, writer)
        served, last_stream = 0, 0
        goaway_after = getattr(self.state, "goaway_after_streams", 0)
        while data := await reader.read(65536):
            for event in connection.receive_data(data):
                if isinstance(event, h2.events.RequestReceived):
                    headers = {k.decode(): v.decode() for k, v in event.headers}
                    streams[event.stream_id] = (headers, bytearray())
                elif isinstance(event, h2.events.DataReceived):
                    streams[event.stream_id][1].extend(event.data)
                    connection.acknowledge_received_data(
                        event.flow_controlled_length, event.stream_id
                    )
                elif isinstance(event, h2.events.StreamEnded):
                    headers, body = streams.pop(event.stream_id)
                    if last_stream:  # going away: refused, so the client sends it again
                        connection.reset_stream(
                            event.stream_id, h2.errors.ErrorCodes.REFUSED_STREAM
                        )
                        continue
                    # A timer, not a task per stream: the fake stays cheap under load.
                    loop.call_later(self.state.latency_seconds, self._answer_h2, flush,
                                    event.stream_id, headers, bytes(body))  # fmt: skip
                    served += 1
                    if served == goaway_after:  # as a server going down for maintenance
                        last_stream = event.stream_id
                        loop.call_later(self.state.latency_seconds + 0.05, _go_away, connection,
                                        last_stream, writer)  # fmt: skip
            flush()

    def _answer_h2(
        self, flush: _Flusher, stream_id: int, headers: dict[str, str], body: bytes,
    ) -> None:  # fmt: skip
        method, path = headers.get(":method", ""), headers.get(":path", "")
        control = path.startswith("/_fake/")
        answer = self.control if control else partial(self.answer, headers=headers)
        status, reply_headers, data = answer(method, path, body=body)
        connection = flush.connection
        try:
            connection.send_headers(
                stream_id,
                [(b":status", str(status).encode()),
                 *((k.lower().encode(), v.encode()) for k, v in reply_headers)],
                end_stream=not data,
            )  # fmt: skip
            if data:
                connection.send_data(stream_id, data, end_stream=True)
        except (h2.exceptions.ProtocolError, h2.exceptions.StreamClosedError):
            return
        flush()


class _Flusher:
    """Writes an h2 connection's pending frames once per loop iteration, not per stream."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, connection: Any, writer: asyncio.StreamWriter
    ) -> None:
        self.loop, self.connection, self._writer = loop, connection, writer
        self._scheduled = False

    def __call__(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            self.loop.call_soon(self._write)

    def _write(self) -> None:
        self._scheduled = False
        data = self.connection.data_to_send()
        if data and not self._writer.is_closing():
            self._writer.write(data)


def _go_away(connection: Any, last_stream: int, writer: asyncio.StreamWriter) -> None:
    """GOAWAY once the streams up to `last_stream` were answered, then hang up."""
    try:
        connection.close_connection(last_stream_id=last_stream)
        writer.write(connection.data_to_send())
    except h2.exceptions.ProtocolError:
        pass
    asyncio.get_running_loop().call_later(0.2, writer.close)


def _jsonable(value: Any) -> Any:
    return sorted(value) if isinstance(value, set) else str(value)


def _quiet_about_cancelled_connections(
    loop: asyncio.AbstractEventLoop, context: dict[str, Any]
) -> None:
    # Python 3.11 reports connection handlers cancelled at shutdown as errors (fixed in 3.12).
    if not isinstance(context.get("exception"), asyncio.CancelledError):
        loop.default_exception_handler(context)
