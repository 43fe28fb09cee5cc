"""A small TCP proxy on the loopback interface, to cut a server off from the processes that
use it: a real outage as they see it (connections torn down, new ones refused), while the
server itself, which other users of this machine share, runs on untouched.

    proxy = TcpProxy("127.0.0.1", 6379).start()
    url = proxy.route("redis://127.0.0.1:6379/0")   # -> redis://127.0.0.1:<proxy port>/0
    proxy.cut()      # every open connection reset, connects refused (ECONNREFUSED)
    proxy.restore()  # listening again on the same port
    proxy.close()

Bounded: at most `max_connections` open pairs (two forwarding threads each); a connection
past the cap is closed at once. Both ends are loopback only: the listening address is
127.0.0.1, and a target that is not a loopback address is refused.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
import threading
from contextlib import suppress
from urllib.parse import urlsplit, urlunsplit

__all__ = ["TcpProxy", "target_of"]

_DEFAULT_PORTS = {"redis": 6379, "rediss": 6379, "postgresql": 5432, "postgres": 5432,
                  "amqp": 5672, "pyamqp": 5672}
_CHUNK = 65536


def target_of(url: str) -> tuple[str, int]:
    """(host, port) a server URL points at, with the scheme's default port."""
    parts = urlsplit(url)
    scheme = parts.scheme.split("+", 1)[0]
    port = parts.port or _DEFAULT_PORTS.get(scheme)
    if parts.hostname is None or port is None:
        raise ValueError(f"cannot tell host and port of {url!r}: give both, e.g. "
                         "redis://127.0.0.1:6379/0")
    return parts.hostname, port


def _loopback(host: str) -> str:
    address = socket.gethostbyname(host)
    if not ipaddress.ip_address(address).is_loopback:
        raise ValueError(f"the proxy forwards to loopback addresses only (127.0.0.0/8); "
                         f"{host!r} is {address}")
    return address


def _reset(sock: socket.socket) -> None:
    """Tear the connection down now: shutdown wakes a thread blocked in recv() on it, and a
    zero linger makes close() send a reset instead of waiting out the peer."""
    with suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with suppress(OSError):
        sock.close()


class TcpProxy:
    def __init__(self, host: str, port: int, *, max_connections: int = 256,
                 connect_timeout_s: float = 2.0) -> None:
        self.target = (_loopback(host), port)
        self.max_connections = max_connections
        self.connect_timeout_s = connect_timeout_s
        self.port = 0  # chosen at start(), kept across cut() and restore()
        self.accepted = 0
        self.refused_over_cap = 0
        self.cuts = 0
        self._pairs: set[tuple[socket.socket, socket.socket]] = set()
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._closed = False

    # -- control ----------------------------------------------------------------------------
    def start(self) -> TcpProxy:
        self._listen()
        return self

    def route(self, url: str) -> str:
        """`url` with its host:port replaced by this proxy's (user and path kept)."""
        if self.port == 0:
            raise RuntimeError("start() the proxy before routing a URL through it")
        parts = urlsplit(url)
        user = parts.netloc.rsplit("@", 1)[0] + "@" if "@" in parts.netloc else ""
        return urlunsplit(parts._replace(netloc=f"{user}127.0.0.1:{self.port}"))

    @property
    def is_cut(self) -> bool:
        return self._listener is None

    def cut(self) -> int:
        """Stop listening and reset every open connection; how many were reset."""
        with self._lock:
            listener, self._listener = self._listener, None
            pairs, self._pairs = self._pairs, set()
            self.cuts += 1
        if listener is not None:
            with suppress(OSError):
                listener.close()
        for client, upstream in pairs:
            _reset(client)
            _reset(upstream)
        return len(pairs)

    def restore(self) -> None:
        """Listen again, on the same port."""
        if self._listener is None and not self._closed:
            self._listen()

    def close(self) -> None:
        self._closed = True
        self.cut()

    def open_connections(self) -> int:
        with self._lock:
            return len(self._pairs)

    # -- forwarding ---------------------------------------------------------------------------
    def _listen(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        listener.settimeout(0.2)  # the accept loop checks now and then whether it was cut
        self.port = listener.getsockname()[1]
        with self._lock:
            self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True,
                         name=f"tcp-proxy-{self.port}").start()

    def _accept(self, listener: socket.socket) -> None:
        while self._listener is listener:
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # closed by cut()
            self._connect(client)

    def _connect(self, client: socket.socket) -> None:
        client.settimeout(None)
        with self._lock:
            full = len(self._pairs) >= self.max_connections
        if full:
            self.refused_over_cap += 1
            _reset(client)
            return
        try:
            upstream = socket.create_connection(self.target, timeout=self.connect_timeout_s)
        except OSError:
            _reset(client)  # the server itself is down: the client sees it so
            return
        upstream.settimeout(None)
        pair = (client, upstream)
        with self._lock:
            if self._listener is None:  # cut while this one was connecting
                pair_alive = False
            else:
                self._pairs.add(pair)
                pair_alive = True
                self.accepted += 1
        if not pair_alive:
            _reset(client)
            _reset(upstream)
            return
        for source, sink in (pair, pair[::-1]):
            threading.Thread(target=self._pump, args=(source, sink, pair), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket,
              pair: tuple[socket.socket, socket.socket]) -> None:
        try:
            while True:
                data = source.recv(_CHUNK)
                if not data:
                    break
                sink.sendall(data)
        except OSError:
            pass
        with self._lock:
            owned = pair in self._pairs
            self._pairs.discard(pair)
        if owned:  # the first of the two directions to end closes both
            _reset(sink)
            _reset(source)
