"""A TCP proxy on loopback whose connections a test can cut at will."""

import logging
import socket
import threading

log = logging.getLogger(__name__)


class TcpProxy:
    """Forwards 127.0.0.1:<port> to one target address on loopback.

    ``cut()`` closes every open connection, as a failing network or a
    broker node crash would, while the proxy keeps accepting new ones.
    ``refuse`` makes it close new connections at once, for an outage.
    """

    def __init__(self, target_host: str, target_port: int):
        self.target = (target_host, target_port)
        self.refuse = False
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._sockets: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, name="proxy-accept", daemon=True).start()

    def url(self, user: str = "guest", password: str = "guest") -> str:
        return f"amqp://{user}:{password}@127.0.0.1:{self.port}/%2F"

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self.refuse:
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError as exc:
                log.info("proxy cannot reach %s: %s", self.target, exc)
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._sockets.update((client, upstream))
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            self._close(source)
            self._close(sink)

    def _close(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.discard(sock)
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()

    def connection_count(self) -> int:
        with self._lock:
            return len(self._sockets) // 2

    def cut(self) -> int:
        """Close every open connection; return how many were cut."""
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:
            self._close(sock)
        return len(sockets) // 2

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        self.cut()
