"""The manager's heartbeat consumer: its own connection, thread and I/O loop.

Every container's assistant sends a heartbeat about once a second and
waits for the reply, so heartbeats are the manager's most frequent
messages and need short reply times. They get a pika ``SelectConnection``
on a thread of their own, so that they no longer wait behind commands,
control orders, confirmed event publishing and periodic checks on the
broker's serving thread. The threads still share the GIL and
``registry.lock``.

``SelectConnection`` also does less I/O-loop work per reply. Its
``basic_publish`` only appends the reply's frames to the transport's
buffer, and the I/O loop writes them when the socket is next writable,
after every delivery read in the same pass has got its reply.
``BlockingChannel.basic_publish`` instead runs a pass of the I/O loop
for every message, switching the socket's write watch on and off
(pika 1.4.4, ``BlockingConnection._flush_output``). strace of the whole
manager process over 10,000 replies counted 2,704 ``epoll_ctl`` and
2,712 ``epoll_wait`` calls with this consumer, against 20,098 and 11,093
when the serving thread's blocking channel replied.

NOTE: pika 1.4.4 still sends every buffered frame with its own
``send()`` (``_AsyncTransportBase._produce``), so each reply costs three
``sendto`` calls with either adapter.

Threading: pika objects of this connection are used only on the consumer
thread. :meth:`HeartbeatConsumer.start` and :meth:`HeartbeatConsumer.stop`
are called from the broker's serving thread and reach the consumer thread
through ``ioloop.add_callback_threadsafe``.
"""

import logging
import threading
from collections.abc import Callable, Sequence

import pika
import pika.exceptions

from messages.models import HeartbeatReply

log = logging.getLogger(__name__)

STOP_TIMEOUT = 10.0
"""Seconds :meth:`HeartbeatConsumer.stop` waits for the connection to close."""


class HeartbeatConsumer:
    """Consume one heartbeat queue and reply to each heartbeat on its own thread.

    ``on_heartbeat`` runs on the consumer thread and must be thread-safe.
    It returns the reply, or None to send none.
    """

    def __init__(self, queue: str, on_heartbeat: Callable[[bytes], HeartbeatReply | None]):
        self.queue = queue
        self.on_heartbeat = on_heartbeat
        self._connection: pika.SelectConnection | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stopping = False
        self._failure: BaseException | None = None

    @property
    def failure(self) -> BaseException | None:
        """The error that ended the connection or the consumer without a :meth:`stop`."""
        return self._failure

    def start(self, parameters: Sequence[pika.ConnectionParameters], timeout: float) -> None:
        """Connect, start consuming, and return once the broker confirmed the consumer.

        Tries each entry of ``parameters`` in order, like BlockingConnection.
        Raises the error of the last one, an AMQPError: AMQPConnectionError
        also when the consumer is not confirmed within ``timeout`` seconds.
        """
        if self._thread is not None:
            raise RuntimeError("the heartbeat consumer is running already")
        error: BaseException | None = None
        for candidate in parameters:
            error = self._start_one(candidate, timeout)
            if error is None:
                return
        assert error is not None, "connection_parameters returns at least one entry"
        raise error

    def _start_one(self, parameters: pika.ConnectionParameters, timeout: float) -> BaseException | None:
        self._ready.clear()
        self._stopping = False
        self._failure = None
        self._connection = pika.SelectConnection(
            parameters,
            on_open_callback=self._on_connection_open,
            on_open_error_callback=self._on_connection_open_error,
            on_close_callback=self._on_connection_closed,
        )
        self._thread = threading.Thread(target=self._run, name="heartbeats", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            self.stop()
            return pika.exceptions.AMQPConnectionError(
                f"the broker at {parameters.host}:{parameters.port} did not confirm the"
                f" consumer of {self.queue} within {timeout:.0f} s"
            )
        failure = self._failure
        if failure is not None:
            self.stop()
            return failure
        log.info("consuming heartbeats from %s on thread %s", self.queue, self._thread.name)
        return None

    def stop(self) -> None:
        """Close the connection and wait for the consumer thread to end."""
        thread, connection = self._thread, self._connection
        if thread is None or connection is None:
            return
        self._stopping = True
        # A closed I/O loop drops the callback: its thread has ended already.
        connection.ioloop.add_callback_threadsafe(self._close)
        thread.join(STOP_TIMEOUT)
        if thread.is_alive():
            log.warning(
                "heartbeat consumer of %s still running %.0f s after stop", self.queue, STOP_TIMEOUT
            )
        else:
            log.info("stopped consuming heartbeats from %s", self.queue)
        self._thread = None
        self._connection = None

    # --- consumer thread only ----------------------------------------------

    def _run(self) -> None:
        connection = self._connection
        assert connection is not None
        try:
            connection.ioloop.start()
        except Exception as exc:  # a bug in a callback; the broker reconnects everything
            log.exception("heartbeat consumer of %s failed", self.queue)
            self._fail(exc)
        finally:
            self._ready.set()
            connection.ioloop.close()

    def _fail(self, exc: BaseException) -> None:
        if self._failure is None:
            self._failure = exc

    def _close(self) -> None:
        connection = self._connection
        if connection is None or connection.is_closed:
            if connection is not None:
                connection.ioloop.stop()
            return
        if not connection.is_closing:
            connection.close()
        # The close callback stops the I/O loop. Stopping it here instead
        # would leave the connection registered on the broker.

    def _on_connection_open(self, connection: pika.SelectConnection) -> None:
        connection.channel(on_open_callback=self._on_channel_open)

    def _on_connection_open_error(self, connection: pika.SelectConnection, error) -> None:
        if not isinstance(error, BaseException):
            error = pika.exceptions.AMQPConnectionError(error)
        if not self._stopping:
            log.warning("heartbeat connection for %s failed to open: %r", self.queue, error)
            self._fail(error)
        connection.ioloop.stop()

    def _on_connection_closed(self, connection: pika.SelectConnection, reason: BaseException) -> None:
        if not self._stopping:
            log.warning("heartbeat connection for %s lost: %r", self.queue, reason)
            self._fail(reason)
        connection.ioloop.stop()

    def _on_channel_open(self, channel) -> None:
        channel.add_on_close_callback(self._on_channel_closed)
        # The broker cancels a consumer when its queue is deleted. A silent
        # stall would follow, so the broker's serving thread reconnects and
        # declares the queue again.
        channel.add_on_cancel_callback(self._on_consumer_cancelled)
        channel.basic_consume(
            self.queue,
            self._on_delivery,
            auto_ack=True,
            callback=lambda frame: self._ready.set(),
        )

    def _on_channel_closed(self, channel, reason: BaseException) -> None:
        connection = self._connection
        if self._stopping or connection is None:
            return
        log.warning("heartbeat channel for %s closed: %r", self.queue, reason)
        self._fail(reason)
        if connection.is_open:
            connection.close()

    def _on_consumer_cancelled(self, frame) -> None:
        log.error("the broker cancelled the consumer of %s; reconnecting", self.queue)
        self._fail(pika.exceptions.ConsumerCancelled(f"consumer of {self.queue} cancelled by the broker"))
        connection = self._connection
        if connection is not None and connection.is_open:
            connection.close()

    def _on_delivery(self, channel, method, properties: pika.BasicProperties, body: bytes) -> None:
        try:
            reply = self.on_heartbeat(body)
        except Exception:  # one bad heartbeat must not end the consumer
            log.exception(
                "replying to the heartbeat with correlation id %s failed", properties.correlation_id
            )
            return
        if reply is None or not properties.reply_to:
            return
        channel.basic_publish(
            "",
            properties.reply_to,
            reply.model_dump_json().encode(),
            pika.BasicProperties(
                content_type="application/json", correlation_id=properties.correlation_id
            ),
        )
