"""A small HTTP/2 client over TLS for push providers (APNs, FCM), built on `h2` and asyncio.

Why not httpx: a push dispatch is thousands of small POSTs to one host, and httpx's
per-request cost made it 3.6 times slower than aioapns on the same fake. This client keeps
the cost per request to what HTTP/2 itself needs:

- a few connections, each carrying up to the server's MAX_CONCURRENT_STREAMS streams
  (one until its first answer: APNs wants each connection warmed by one request);
  a request takes the least busy connection and opens a new one only when all are full;
- frames of all requests issued in one loop iteration leave in one TLS write;
- response headers are kept as bytes (no decoding unless asked);
- flow control: a body larger than the window waits for WINDOW_UPDATE;
- GOAWAY: streams above the server's last stream id fail as `StreamNotProcessed`
  (safe to retry: the server did not see them); the connection takes no new streams.

Errors are `TransientError`s: `StreamNotProcessed` (retry at once), `ConnectionFailed`
(connect, reset or timeout; the request may or may not have been processed).
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import hpack

from core.errors import TransientError

Headers = Sequence[tuple[bytes, bytes]]
_CONNECTION_WINDOW = 2**24
# HPACK static table (RFC 7541, Appendix A): exact pairs and names this client sends.
_STATIC_PAIRS = {(b":method", b"POST"): 3, (b":scheme", b"https"): 7, (b":status", b"200"): 8}
_STATIC_NAMES = {b":authority": 1, b":path": 4, b":status": 8, b"authorization": 23,
                 b"content-length": 28, b"content-type": 31}  # fmt: skip


def _hpack_integer(value: int, prefix_bits: int, flags: int) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((flags | value,))
    out = bytearray((flags | limit,))
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


class StatelessEncoder(hpack.Encoder):
    """HPACK without the dynamic table or Huffman coding (both optional in RFC 7541).

    Push requests carry a unique path per request; hpack's default encoder Huffman-codes it
    and churns it through the dynamic table, which was the largest single cost of a send.
    Here every header is a static-table index or a literal "without indexing", and the
    encoding of each repeated header is cached, so a header block costs a join.
    """

    def __init__(self) -> None:
        super().__init__()
        self._cache: dict[tuple[bytes, bytes], bytes] = {}

    def encode(self, headers: Any, huffman: bool = True) -> bytes:
        block = [self._encode_table_size_change()] if self.header_table.resized else []
        self.header_table.resized = False
        cache = self._cache
        for name, value, *_ in headers:
            key = (name, value)
            encoded = cache.get(key)
            if encoded is None:
                encoded = self._literal(name, value)
                if name != b":path" and len(cache) < 256:  # paths are unique per request
                    cache[key] = encoded
            block.append(encoded)
        return b"".join(block)

    @staticmethod
    def _literal(name: bytes, value: bytes) -> bytes:
        pair = _STATIC_PAIRS.get((name, value))
        if pair is not None:
            return bytes((0x80 | pair,))
        index = _STATIC_NAMES.get(name)
        head = (_hpack_integer(index, 4, 0x00) if index is not None
                else b"\x00" + _hpack_integer(len(name), 7, 0x00) + name)  # fmt: skip
        return head + _hpack_integer(len(value), 7, 0x00) + value


class ConnectionFailed(TransientError):
    """The connection could not be made, broke, or the request timed out."""


class StreamNotProcessed(TransientError):
    """The server refused the stream before processing it (GOAWAY, REFUSED_STREAM)."""


@dataclass(frozen=True, slots=True)
class H2Response:
    status: int
    headers: dict[bytes, bytes]
    body: bytes

    def header(self, name: str) -> str:
        return self.headers.get(name.encode(), b"").decode("latin-1")


class _Stream:
    __slots__ = ("body", "future", "headers", "status")

    def __init__(self, future: asyncio.Future[H2Response]) -> None:
        self.future = future
        self.status = 0
        self.headers: dict[bytes, bytes] = {}
        self.body = bytearray()


class _Connection(asyncio.Protocol):
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        # Our own headers are lower-case constants; skip h2's per-header checks on them.
        config = h2.config.H2Configuration(
            client_side=True, validate_outbound_headers=False, normalize_outbound_headers=False
        )
        self._h2 = h2.connection.H2Connection(config)
        self._h2.encoder = StatelessEncoder()
        self._transport: asyncio.Transport | None = None
        self._streams: dict[int, _Stream] = {}
        self._flush_scheduled = False
        self._window_opened = asyncio.Event()
        self.max_streams = 100  # until the server's SETTINGS say otherwise
        # APNs allows one stream on a token-auth connection until a request with a valid
        # token went through: warm each connection with one request before fanning out.
        self.warmed = False
        self.usable = True
        self.closed = False
        self.ready: asyncio.Future[None] = loop.create_future()

    @property
    def active(self) -> int:
        return len(self._streams)

    def has_room(self) -> bool:
        return self.usable and len(self._streams) < (self.max_streams if self.warmed else 1)

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._h2.initiate_connection()
        self._h2.increment_flow_control_window(_CONNECTION_WINDOW)
        transport.write(self._h2.data_to_send())

    def data_received(self, data: bytes) -> None:
        try:
            events = self._h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            self._fail_all(ConnectionFailed(f"HTTP/2 protocol error: {exc}"))
            self.close()
            return
        for event in events:
            if isinstance(event, h2.events.ResponseReceived):
                stream = self._streams.get(event.stream_id)
                if stream is not None:
                    for name, value in event.headers:
                        if name == b":status":
                            stream.status = int(value)
                        else:
                            stream.headers[name] = value
            elif isinstance(event, h2.events.DataReceived):
                stream = self._streams.get(event.stream_id)
                if stream is not None:
                    stream.body.extend(event.data)
                self._h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamEnded):
                stream = self._streams.pop(event.stream_id, None)
                self.warmed = True
                if stream is not None and not stream.future.done():
                    response = H2Response(stream.status, stream.headers, bytes(stream.body))
                    stream.future.set_result(response)
            elif isinstance(event, h2.events.StreamReset):
                self._fail_stream(event.stream_id, event.error_code)
            elif isinstance(event, h2.events.RemoteSettingsChanged):
                changed = event.changed_settings.get(
                    h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS
                )
                if changed is not None:
                    self.max_streams = changed.new_value
                if not self.ready.done():
                    self.ready.set_result(None)
            elif isinstance(event, h2.events.WindowUpdated):
                self._window_opened.set()
            elif isinstance(event, h2.events.ConnectionTerminated):
                self._go_away(2**31 if event.last_stream_id is None else event.last_stream_id)
        self._schedule_flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.usable = False
        if not self.ready.done():
            self.ready.set_exception(ConnectionFailed(f"connection closed during setup: {exc}"))
        self._fail_all(ConnectionFailed(f"the connection was lost: {exc or 'closed by peer'}"))
        self._window_opened.set()

    # requests
    async def request(self, headers: Headers, body: bytes) -> H2Response:
        try:
            stream_id = self._h2.get_next_available_stream_id()
        except h2.exceptions.NoAvailableStreamIDError:
            self.usable = False
            raise StreamNotProcessed("stream ids exhausted on this connection") from None
        future: asyncio.Future[H2Response] = self._loop.create_future()
        self._streams[stream_id] = _Stream(future)
        self._h2.send_headers(stream_id, headers, end_stream=not body)
        if body:
            await self._send_body(stream_id, body)
        self._schedule_flush()
        return await future

    async def _send_body(self, stream_id: int, body: bytes) -> None:
        view = memoryview(body)
        while view:
            if self.closed:
                raise ConnectionFailed("the connection was lost while sending")
            window = min(self._h2.local_flow_control_window(stream_id),
                         self._h2.max_outbound_frame_size)  # fmt: skip
            if window <= 0:
                self._window_opened.clear()
                self._schedule_flush()
                await self._window_opened.wait()
                continue
            chunk, view = view[:window], view[window:]
            self._h2.send_data(stream_id, bytes(chunk), end_stream=not view)

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        data = self._h2.data_to_send()
        if data and self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)

    def _fail_stream(self, stream_id: int, error_code: int) -> None:
        stream = self._streams.pop(stream_id, None)
        if stream is None or stream.future.done():
            return
        if error_code == h2.errors.ErrorCodes.REFUSED_STREAM:
            stream.future.set_exception(StreamNotProcessed("the server refused the stream"))
        else:
            stream.future.set_exception(
                ConnectionFailed(f"the server reset the stream ({error_code})")
            )

    def _go_away(self, last_stream_id: int) -> None:
        self.usable = False
        for stream_id in [s for s in self._streams if s > last_stream_id]:
            stream = self._streams.pop(stream_id)
            if not stream.future.done():
                stream.future.set_exception(StreamNotProcessed("the server is going away (GOAWAY)"))
        if not self._streams:
            self.close()

    def _fail_all(self, error: Exception) -> None:
        streams, self._streams = self._streams, {}
        for stream in streams.values():
            if not stream.future.done():
                stream.future.set_exception(error)

    def close(self) -> None:
        self.usable = False
        if self._transport is not None and not self._transport.is_closing():
            try:
                self._h2.close_connection()
                self._transport.write(self._h2.data_to_send())
            except h2.exceptions.ProtocolError:
                pass
            self._transport.close()


class H2Client:
    """Requests to one origin (`https://host:port`) over up to `max_connections` connections."""

    def __init__(
        self,
        origin: str,
        *,
        ssl_context: ssl.SSLContext | None = None,
        max_connections: int = 4,
        connect_timeout: float = 10.0,
        request_timeout: float = 30.0,
        spread_after_streams: int = 100,
    ) -> None:
        parts = urlsplit(origin)
        if parts.scheme != "https" or not parts.hostname:
            raise ValueError(f"an HTTP/2 push endpoint must be https://host[:port], not {origin!r}")
        self.host = parts.hostname
        self.port = parts.port or 443
        self.authority = parts.netloc.encode()
        context = ssl_context or ssl.create_default_context()
        context.set_alpn_protocols(["h2"])
        self._ssl = context
        self.max_connections = max_connections
        self.connect_timeout = connect_timeout
        self.request_timeout = request_timeout
        self._connections: list[_Connection] = []
        self._connecting = 0
        self.spread_after_streams = spread_after_streams
        self._room = asyncio.Condition()
        self._waiting = 0
        self.connections_opened = 0

    async def post(self, path: str, headers: Headers, body: bytes) -> H2Response:
        request_headers = [(b":method", b"POST"), (b":scheme", b"https"),
                           (b":authority", self.authority), (b":path", path.encode()),
                           *headers]  # fmt: skip
        connection = await self._acquire()
        try:
            async with asyncio.timeout(self.request_timeout):
                return await connection.request(request_headers, body)
        except TimeoutError:
            raise ConnectionFailed(f"no answer within {self.request_timeout} s") from None
        finally:
            if self._waiting:  # a finished stream frees room for one waiter
                async with self._room:
                    self._room.notify(1)

    async def _acquire(self) -> _Connection:
        while True:
            self._connections = [c for c in self._connections if not c.closed]
            best = min((c for c in self._connections if c.has_room()),
                       key=lambda c: c.active, default=None)  # fmt: skip
            can_open = len(self._connections) + self._connecting < self.max_connections
            # Spread over more connections once one carries many streams (as APNs advises).
            if best is not None and (best.active < self.spread_after_streams or not can_open):
                return best
            if can_open:
                return await self._open()
            self._waiting += 1
            try:
                async with self._room:
                    await self._room.wait()
            finally:
                self._waiting -= 1

    async def _open(self) -> _Connection:
        loop = asyncio.get_running_loop()
        self._connecting += 1
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, connection = await loop.create_connection(
                    lambda: _Connection(loop), self.host, self.port, ssl=self._ssl,
                    server_hostname=self.host,
                )  # fmt: skip
                await connection.ready
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            raise ConnectionFailed(f"cannot connect to {self.host}:{self.port}: {exc}") from None
        finally:
            self._connecting -= 1
        self._connections.append(connection)
        self.connections_opened += 1
        return connection

    async def aclose(self) -> None:
        for connection in self._connections:
            connection.close()
        self._connections = []
