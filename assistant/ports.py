"""TCP port forwarding from the host's loopback to a container's address.

Each published port gets a listening socket on 127.0.0.1 and an accept
thread. Each accepted connection gets a connection to the container's
address and two threads that copy bytes, one per direction. The
assistant opens the listeners before ``runc create``, so a port that is
already taken fails the create, and closes them when the workload exits.

``python -m assistant.ports LISTEN_HOST:PORT TARGET_HOST:PORT`` runs one
forwarder in the foreground until SIGTERM; the multi-host lab uses it to
make a loopback broker reachable on its bridge address.
"""

import argparse
import errno
import logging
import signal
import socket
import sys
import threading

log = logging.getLogger(__name__)

LISTEN_ADDRESS = "127.0.0.1"
CONNECT_TIMEOUT = 5.0
"""Seconds to wait for the container to accept a forwarded connection."""

BUFFER_BYTES = 64 * 1024
BACKLOG = 64


class Forwarder:
    """One listening socket whose connections are relayed to one target address."""

    def __init__(self, label: str, listen: tuple[str, int], target: tuple[str, int]):
        self.label = label
        self.listen_address = listen
        self.target = target
        self._server: socket.socket | None = None
        self._connections: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closed = threading.Event()

    def open(self) -> None:
        """Bind and listen, then accept on a daemon thread.

        Raises OSError naming the address when it cannot be bound.
        """
        server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        host, port = self.listen_address
        try:
            server.bind(self.listen_address)
            server.listen(BACKLOG)
        except OSError as exc:
            server.close()
            reason = "already in use" if exc.errno == errno.EADDRINUSE else exc.strerror
            raise OSError(
                exc.errno,
                f"cannot publish port {host}:{port}: {reason}; pick another host_port",
            ) from None
        self._server = server
        thread = threading.Thread(target=self._accept, name=f"accept-{port}", daemon=True)
        thread.start()
        log.info("%s: forwarding %s:%d to %s:%d", self.label, host, port, *self.target)

    def _accept(self) -> None:
        server = self._server
        while not self._closed.is_set():
            try:
                client, peer = server.accept()
            except OSError:
                if not self._closed.is_set():
                    log.exception("%s: accept on port %d failed", self.label, self.listen_address[1])
                return
            threading.Thread(
                target=self._relay, args=(client, peer), name="relay", daemon=True
            ).start()

    def _relay(self, client: socket.socket, peer: tuple[str, int]) -> None:
        try:
            upstream = socket.create_connection(self.target, timeout=CONNECT_TIMEOUT)
        except OSError as exc:
            log.warning(
                "%s: connection from %s:%d to %s:%d failed: %s",
                self.label, *peer, *self.target, exc,
            )
            client.close()
            return
        upstream.settimeout(None)
        with self._lock:
            if self._closed.is_set():
                client.close()
                upstream.close()
                return
            self._connections.update((client, upstream))
        backward = threading.Thread(target=self._copy, args=(upstream, client), name="relay", daemon=True)
        backward.start()
        self._copy(client, upstream)
        backward.join()
        with self._lock:
            self._connections.difference_update((client, upstream))
        client.close()
        upstream.close()

    @staticmethod
    def _copy(source: socket.socket, destination: socket.socket) -> None:
        """Copy until EOF or an error, then pass the EOF on with a half close."""
        try:
            while data := source.recv(BUFFER_BYTES):
                destination.sendall(data)
        except OSError:
            pass  # a reset or a close by the other direction ends the copy
        try:
            destination.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self) -> None:
        """Stop listening and cut every relayed connection."""
        if self._closed.is_set():
            return
        self._closed.set()
        if self._server is not None:
            # shutdown wakes the thread blocked in accept; close alone does not.
            try:
                self._server.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._server.close()
        with self._lock:
            connections = list(self._connections)
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        log.info("%s: port %d closed", self.label, self.listen_address[1])


class PortForwarders:
    """The published ports of one container."""

    def __init__(self, container_id: str, container_address: str | None, ports: list) -> None:
        self.container_id = container_id
        self.forwarders = [
            Forwarder(
                f"container {container_id}",
                (LISTEN_ADDRESS, mapping.host_port),
                (container_address or "", mapping.container_port),
            )
            for mapping in ports
        ]

    def open(self) -> None:
        """Open every listener, or none: a failure closes those already open and raises OSError."""
        opened = []
        try:
            for forwarder in self.forwarders:
                forwarder.open()
                opened.append(forwarder)
        except OSError:
            for forwarder in opened:
                forwarder.close()
            raise

    def close(self) -> None:
        for forwarder in self.forwarders:
            forwarder.close()


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"invalid address {text!r}: expected HOST:PORT")
    return host, int(port)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m assistant.ports", description=__doc__.split("\n")[0])
    parser.add_argument("listen", type=_address, help="HOST:PORT to listen on")
    parser.add_argument("target", type=_address, help="HOST:PORT to connect each connection to")
    arguments = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stopped.set())
    signal.signal(signal.SIGINT, lambda signum, frame: stopped.set())
    forwarder = Forwarder("relay", arguments.listen, arguments.target)
    try:
        forwarder.open()
    except OSError as exc:
        log.error("relay: %s", exc)
        return 1
    stopped.wait()
    forwarder.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
