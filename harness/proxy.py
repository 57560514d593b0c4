"""A TCP proxy that a test can cut and restore: a database or PACS outage on demand.

``with TcpProxy(target_port) as proxy``: connect to ``proxy.port`` instead of the target;
:meth:`TcpProxy.cut` closes every relayed connection and refuses new ones (the peer is
down), :meth:`TcpProxy.restore` accepts again. Given several target ports it spreads the
connections over them in turn, as a Service or load balancer in front of several
listeners does (:attr:`TcpProxy.connections` counts them per target).
"""

from __future__ import annotations

import contextlib
import itertools
import select
import socket
import threading
from collections import Counter
from collections.abc import Sequence
from types import TracebackType

from harness.peers import get_port


class TcpProxy:
    """Relays ``127.0.0.1:port`` to ``target_host:target_port`` while up."""

    def __init__(self, target_port: int | Sequence[int], *,
                 target_host: str = "127.0.0.1") -> None:
        ports = [target_port] if isinstance(target_port, int) else list(target_port)
        self.targets = [(target_host, port) for port in ports]
        self.target = self.targets[0]
        self.connections: Counter[int] = Counter()
        """Connections relayed so far, by target port."""
        self._next = itertools.cycle(self.targets)
        self.port = get_port()
        self._up = threading.Event()
        self._stop = threading.Event()
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._thread = threading.Thread(target=self._accept, name="tcp-proxy", daemon=True)

    def __enter__(self) -> TcpProxy:
        self.restore()
        self._thread.start()
        return self

    def __exit__(self, *_: type[BaseException] | BaseException | TracebackType | None) -> None:
        self._stop.set()
        self.cut()

    def restore(self) -> None:
        """Accept connections again."""
        with self._lock:
            if self._listener is None:
                listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                listener.bind(("127.0.0.1", self.port))
                listener.listen(64)
                self._listener = listener
        self._up.set()

    def cut(self) -> None:
        """Close every relayed connection and stop listening (connections are refused)."""
        self._up.clear()
        with self._lock:
            if self._listener is not None:
                self._listener.close()
                self._listener = None
            pairs, self._pairs = self._pairs, []
        for a, b in pairs:
            for sock in (a, b):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            if not self._up.wait(0.1):
                continue
            with self._lock:
                listener = self._listener
            if listener is None:
                continue
            try:
                readable, _, _ = select.select([listener], [], [], 0.1)
                if not readable:
                    continue
                client, _ = listener.accept()
            except OSError:
                continue
            target = next(self._next)
            try:
                upstream = socket.create_connection(target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._pairs.append((client, upstream))
                self.connections[target[1]] += 1
            threading.Thread(target=self._relay, args=(client, upstream), daemon=True).start()

    def _relay(self, a: socket.socket, b: socket.socket) -> None:
        try:
            while True:
                readable, _, _ = select.select([a, b], [], [], 1.0)
                for source in readable:
                    data = source.recv(65536)
                    if not data:
                        return
                    (b if source is a else a).sendall(data)
        except (OSError, ValueError):
            return
        finally:
            for sock in (a, b):
                with contextlib.suppress(OSError):
                    sock.close()
