"""A TCP proxy on loopback that breaks connections on purpose (tests and benchmarks).

    proxy = FaultProxy("127.0.0.1", azurite_table_port).start()
    proxy.configure(reset_every=3, delay_seconds=0.05)   # then point a client at proxy.port

Bytes go through unchanged, except that the proxy can, per response (a turn of bytes from
the server after bytes from the client: one HTTP response on a keep-alive connection):
- `reset_every=n`: on every n-th response, close the client's connection with a reset
  (RST) instead of passing the response on. The server has handled the request; the
  client does not know it: the ambiguous failure that retries must survive.
- `refuse_every=n`: reset every n-th new connection before a byte goes through.
- `delay_seconds`: hold each response this long first.
- `down`: refuse every connection (a restarting server).
Counts of what it did are in `stats`. It stops its threads when stopped.
"""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Self

_BUFFER = 65536


@dataclass
class ProxyStats:
    connections: int = 0
    responses: int = 0
    resets: int = 0
    refused: int = 0


@dataclass
class _Faults:
    reset_every: int = 0
    refuse_every: int = 0
    delay_seconds: float = 0.0
    down: bool = False
    stats: ProxyStats = field(default_factory=ProxyStats)


def _reset(sock: socket.socket) -> None:
    """Close with RST (linger 0), as a peer that died does."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


class FaultProxy:
    def __init__(self, target_host: str, target_port: int, host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self._listener = socket.create_server((host, 0))
        self.port = int(self._listener.getsockname()[1])
        self._faults = _Faults()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._open: set[socket.socket] = set()

    @property
    def stats(self) -> ProxyStats:
        with self._lock:
            return ProxyStats(**vars(self._faults.stats))

    def configure(self, **changes: object) -> None:
        with self._lock:
            for name, value in changes.items():
                if not hasattr(self._faults, name) or name == "stats":
                    raise ValueError(f"no such fault: {name}")
                setattr(self._faults, name, value)

    def start(self) -> Self:
        thread = threading.Thread(target=self._accept, name="faultproxy-accept", daemon=True)
        thread.start()
        self._threads.append(thread)
        return self

    def stop(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self._listener.close()
        with self._lock:
            sockets = list(self._open)
        for sock in sockets:
            _reset(sock)
        for thread in self._threads:
            thread.join(timeout=5)

    def _accept(self) -> None:
        self._listener.settimeout(0.2)
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                faults = self._faults
                faults.stats.connections += 1
                refuse = faults.down or (
                    faults.refuse_every and faults.stats.connections % faults.refuse_every == 0
                )
                if refuse:
                    faults.stats.refused += 1
            if refuse:
                _reset(client)
                continue
            thread = threading.Thread(target=self._pipe, args=(client,), daemon=True)
            thread.start()
            self._threads = [t for t in self._threads if t.is_alive()] + [thread]

    def _pipe(self, client: socket.socket) -> None:
        try:
            server = socket.create_connection(self.target, timeout=5)
        except OSError:
            _reset(client)
            return
        with self._lock:
            self._open |= {client, server}
        client_spoke = False  # bytes from the client since the server last answered
        broken = True
        try:
            while not self._stop.is_set():
                ready, _, _ = select.select([client, server], [], [], 0.2)
                for sock in ready:
                    data = sock.recv(_BUFFER)
                    if not data:
                        broken = False
                        return
                    if sock is client:
                        client_spoke = True
                        server.sendall(data)
                        continue
                    if client_spoke:  # the first bytes of a response
                        client_spoke = False
                        if self._response_starts():
                            return  # reset below, with the response unsent
                    client.sendall(data)
        except OSError:
            return
        finally:
            with self._lock:
                self._open -= {client, server}
            if broken:
                _reset(client)
            else:
                with contextlib.suppress(OSError):
                    client.close()
            with contextlib.suppress(OSError):
                server.close()

    def _response_starts(self) -> bool:
        """Count a response; whether to reset instead of passing it on (after the delay)."""
        with self._lock:
            faults = self._faults
            faults.stats.responses += 1
            delay = faults.delay_seconds
            reset = bool(faults.reset_every) and faults.stats.responses % faults.reset_every == 0
            if reset:
                faults.stats.resets += 1
        if delay:
            time.sleep(delay)
        return reset
