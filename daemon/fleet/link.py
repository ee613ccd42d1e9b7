"""A device's uplink on loopback: a TCP relay that can be cut and restored, and counts the bytes it carries."""
from __future__ import annotations

import socket
import threading


class Link:
    """Listens on 127.0.0.1:port and relays each connection to `upstream`; cut() drops every connection
    and refuses new ones (as a dead uplink does) until restore(). Bytes up and down are counted."""

    def __init__(self, name: str, upstream: tuple[str, int]):
        self.name, self.upstream = name, upstream
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._up = True
        self._closed = False
        self.bytes_up = 0     # device -> central
        self.bytes_down = 0   # central -> device
        self._thread = threading.Thread(target=self._accept, name=f"link-{name}", daemon=True)

    def start(self) -> "Link":
        """Start accepting connections."""
        self._thread.start()
        return self

    @property
    def up(self) -> bool:
        """Whether the link carries traffic."""
        return self._up

    def cut(self) -> None:
        """Drop every open connection and refuse new ones."""
        with self._lock:
            self._up = False
            conns, self._conns = self._conns, set()
        for conn in conns:
            _close(conn)

    def restore(self) -> None:
        """Carry traffic again."""
        with self._lock:
            self._up = True

    def close(self) -> None:
        """Stop listening and drop every connection."""
        self._closed = True
        self.cut()
        _close(self._server)

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._server.accept()
            except OSError:  # closed
                return
            if not self._up:
                _close(client)  # a cut link: the connection dies at once
                continue
            try:
                upstream = socket.create_connection(self.upstream, timeout=5)
            except OSError:  # the central side is down: the device sees a refused connection
                _close(client)
                continue
            upstream.settimeout(None)
            with self._lock:
                self._conns |= {client, upstream}
            for src, dst, up in ((client, upstream, True), (upstream, client, False)):
                threading.Thread(target=self._pump, args=(src, dst, up), daemon=True,
                                 name=f"link-{self.name}-{'up' if up else 'down'}").start()

    def _pump(self, src: socket.socket, dst: socket.socket, up: bool) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
                with self._lock:
                    if up:
                        self.bytes_up += len(data)
                    else:
                        self.bytes_down += len(data)
        except OSError:  # the other side closed, or the link was cut
            pass
        finally:
            with self._lock:
                self._conns -= {src, dst}
            _close(src)
            _close(dst)


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:  # not connected
        pass
    sock.close()
