"""The manager's connections to RabbitMQ.

Threading: the thread inside :meth:`Broker.serve` owns the main
connection, which consumes commands, sends replies and control orders and
publishes events. Worker threads hand work to it with :meth:`Broker.call`
(waits for the result) or :meth:`Broker.submit` (does not wait). Both go
through pika's ``add_callback_threadsafe``, whose callbacks run only from
``process_data_events`` on the serving thread. Heartbeats are consumed on
a second connection with a thread of its own
(:class:`manager.heartbeat_consumer.HeartbeatConsumer`), which the serving
thread starts after each connect and stops before each reconnect.
"""

import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import pika
import pika.exceptions
from tenacity import (
    Retrying,
    retry_if_exception,
    stop_after_delay,
    stop_never,
    stop_when_event_set,
    wait_exponential_jitter,
)

from manager.config import ManagerConfig
from manager.heartbeat_consumer import HeartbeatConsumer
from manager.store import Store
from messages import names
from messages.brokers import connection_parameters, retryable_broker_error
from messages.brokers import redact_url as redact
from messages.models import ControlOrder, ErrorCode, ErrorInfo, HeartbeatReply, Reply

log = logging.getLogger(__name__)

T = TypeVar("T")

LOOP_TICK = 0.1
"""Seconds the serving loop waits for I/O before running periodic work."""

HEARTBEAT_TTL_MS = 10_000
"""Age at which the broker drops an unread heartbeat: its sender has sent a
newer one or is gone. A constant, because a queue cannot be declared again
with another TTL, so a value derived from the heartbeat interval would
break a manager restarted with a new interval."""

DELIVERY_LIMIT = 5
"""Redeliveries after which the broker dead-letters a command by itself; the
manager rejects one on its MAX_DELIVERIES-th delivery already, with a reply."""

MAX_DELIVERIES = 3
"""Deliveries of one command the manager attempts. A command still not done
after that has crashed the manager each time, so it gets an error reply."""

HEARTBEAT_START_TIMEOUT = 30.0
"""Seconds to wait for the heartbeat connection to open and its consumer to start."""

SHUTDOWN_TIMEOUT = 30.0
"""Seconds a stopping manager waits for commands in progress to reply."""


class BrokerError(Exception):
    """The broker cannot be used; the message names the cause and what to check."""


class ConsumerCancelled(Exception):
    """The broker cancelled one of the manager's consumers."""


class OrderUndeliverable(Exception):
    """A control order found no queue: the assistant is not connected."""


class ManagerIdInUse(Exception):
    """Another connection holds this manager id's lock queue."""


def _retryable(exc: BaseException) -> bool:
    # A manager id in use is retried: after a crash of the previous manager
    # the broker may not have noticed its closed connection yet.
    return isinstance(exc, ManagerIdInUse) or retryable_broker_error(exc)


class Broker:
    def __init__(
        self,
        config: ManagerConfig,
        store: Store,
        on_command: Callable[..., None],
        on_heartbeat: Callable[[bytes], HeartbeatReply | None],
        periodic: Callable[[], None],
        in_flight: Callable[[], int],
        connect_timeout: float = 60.0,
    ):
        self.config = config
        self.store = store
        self.on_command = on_command
        self.heartbeats = HeartbeatConsumer(names.heartbeat_queue(config.manager_id), on_heartbeat)
        self.periodic = periodic
        self.in_flight = in_flight
        self.connect_timeout = connect_timeout
        self.generation = 0
        """Counts connections; an ack for a delivery of an older one is dropped."""
        self.connected = threading.Event()
        self._connection: pika.BlockingConnection | None = None
        self._outbox_dirty = True

    # --- called from any thread -----------------------------------------

    def submit(self, callback: Callable[[], Any]) -> None:
        """Run ``callback`` on the serving thread soon; drop it if disconnected."""
        connection = self._connection
        if connection is None:
            log.warning("broker disconnected; dropping a queued callback")
            return
        try:
            connection.add_callback_threadsafe(callback)
        except (pika.exceptions.AMQPError, RuntimeError) as exc:
            log.warning("broker connection closed; dropping a queued callback: %r", exc)

    def call(self, function: Callable[[], T], timeout: float = 30.0) -> T:
        """Run ``function`` on the serving thread and return its result."""
        future: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            try:
                future.set_result(function())
            except BaseException as exc:  # handed to the waiting thread
                future.set_exception(exc)

        if not self.connected.wait(timeout):
            raise BrokerError(f"not connected to the broker after {timeout:.0f} s")
        self.submit(run)
        return future.result(timeout)

    def wake_outbox(self) -> None:
        """Ask the serving thread to publish newly stored events."""
        self._outbox_dirty = True
        connection = self._connection
        if connection is not None:
            try:
                connection.add_callback_threadsafe(lambda: None)
            except (pika.exceptions.AMQPError, RuntimeError):
                pass  # published after the reconnect

    # --- serving thread only ----------------------------------------------

    def serve(self, stopping: threading.Event) -> None:
        """Connect, consume and publish until ``stopping`` is set."""
        while not stopping.is_set():
            self._connect(stopping)
            if self._connection is None:
                return
            try:
                self._loop(stopping)
            except (pika.exceptions.AMQPError, ConsumerCancelled) as exc:
                log.warning("broker connection lost (%r); reconnecting", exc)
            finally:
                self.connected.clear()
                # Heartbeat replies stop with the main connection, because
                # it owns the lock queue. Without it, another manager with
                # this id may be serving already.
                self.heartbeats.stop()
                connection, self._connection = self._connection, None
                if connection is not None and connection.is_open:
                    try:
                        connection.close()
                    except pika.exceptions.AMQPError as exc:
                        log.debug("closing the connection failed: %r", exc)

    def _connect(self, stopping: threading.Event) -> None:
        url = self.config.amqp_url
        retrying = Retrying(
            retry=retry_if_exception(_retryable),
            wait=wait_exponential_jitter(multiplier=0.5, max=8.0, jitter=0.5),
            # 0 means no limit: keep retrying for as long as the broker is away.
            # A SIGTERM or SIGINT sets ``stopping``, which ends the wait at once.
            stop=(stop_after_delay(self.connect_timeout) if self.connect_timeout else stop_never)
            | stop_when_event_set(stopping),
            sleep=stopping.wait,
            before_sleep=lambda state: log.warning(
                "cannot reach broker %s (%r); retry %d in %.1f s",
                redact(url),
                state.outcome.exception(),
                state.attempt_number,
                state.next_action.sleep,
            ),
            reraise=True,
        )
        try:
            retrying(self._open)
        except Exception as exc:
            if stopping.is_set():
                log.info(
                    "manager %s stops before reaching the broker (%r)", self.config.manager_id, exc
                )
                return
            self._raise_connect_error(url, exc)

    def _raise_connect_error(self, url: str, error: Exception) -> None:
        """Raise BrokerError naming the cause of a failed connect and what to check."""
        if isinstance(
            error,
            (pika.exceptions.ProbableAuthenticationError, pika.exceptions.ProbableAccessDeniedError),
        ):
            message = (
                f"authentication failed at broker {redact(url)}: check the user and"
                " password in the AMQP URL"
            )
        elif isinstance(error, pika.exceptions.AMQPConnectionError):
            message = f"broker {redact(url)} unreachable for {self.connect_timeout:.0f} s: {error!r}"
        elif isinstance(error, ManagerIdInUse):
            message = f"{error}: stop that manager, or start this one with another --id"
        elif isinstance(error, pika.exceptions.AMQPChannelError):
            message = (
                f"declaring berth's exchanges and queues at {redact(url)} failed: {error!r}."
                " Either one of them exists with other arguments (delete it with"
                " rabbitmqctl delete_queue NAME and start again), or the cluster node"
                " holding it stayed down for the whole --connect-timeout"
            )
        else:
            raise error
        raise BrokerError(message) from error

    def _open(self) -> None:
        # A broker resource alarm blocks publishing; past
        # blocked_connection_timeout seconds pika drops the connection
        # instead of hanging, and the manager reconnects.
        # The names tell the two connections apart in rabbitmqctl list_connections.
        name = f"berth-manager {self.config.manager_id}"
        parameters = connection_parameters(
            self.config.amqp_url,
            connection_attempts=1,
            blocked_connection_timeout=10.0,
            client_properties={"connection_name": name},
        )
        heartbeat_parameters = connection_parameters(
            self.config.amqp_url,
            connection_attempts=1,
            blocked_connection_timeout=10.0,
            client_properties={"connection_name": f"{name} heartbeats"},
        )
        connection = pika.BlockingConnection(parameters)
        try:
            self._take_lock(connection)
            self._declare(connection)
            self.heartbeats.start(heartbeat_parameters, timeout=HEARTBEAT_START_TIMEOUT)
        except pika.exceptions.AMQPError:
            if connection.is_open:
                connection.close()
            raise
        self._connection = connection
        self.generation += 1
        self.connected.set()
        self._outbox_dirty = True
        log.info(
            "manager %s connected to %s, consuming %s",
            self.config.manager_id,
            redact(self.config.amqp_url),
            names.command_queue(self.config.manager_id),
        )

    def _take_lock(self, connection: pika.BlockingConnection) -> None:
        """Declare this manager id's exclusive lock queue, or fail if another has it.

        Two managers with one id would split the commands between them and
        nack each other's containers. The queue lives as long as this
        connection, so a crashed manager's lock goes with its connection.
        """
        lock = names.lock_queue(self.config.manager_id)
        try:
            channel = connection.channel()
            channel.queue_declare(lock, exclusive=True, auto_delete=True)
            channel.close()
        except pika.exceptions.ChannelClosedByBroker as exc:
            connection.close()
            if exc.reply_code == 405:  # RESOURCE_LOCKED
                raise ManagerIdInUse(
                    f"another manager with id {self.config.manager_id!r} is connected"
                    f" to the broker (it holds queue {lock})"
                ) from None
            raise

    def _declare(self, connection: pika.BlockingConnection) -> None:
        manager_id = self.config.manager_id
        setup = connection.channel()
        setup.exchange_declare(names.COMMAND_EXCHANGE, "direct", durable=True)
        setup.exchange_declare(names.EVENT_EXCHANGE, "topic", durable=True)
        setup.exchange_declare(names.DEAD_LETTER_EXCHANGE, "fanout", durable=True)
        # Quorum, like the command queue: a classic queue would live on one
        # node only and be unreachable while that node is down.
        setup.queue_declare(
            names.DEAD_LETTER_QUEUE, durable=True, arguments={"x-queue-type": "quorum"}
        )
        setup.queue_bind(names.DEAD_LETTER_QUEUE, names.DEAD_LETTER_EXCHANGE)
        command_queue = names.command_queue(manager_id)
        # A quorum queue survives the loss of a cluster node, and counts
        # deliveries: a command whose handling crashed the manager again
        # and again is dead-lettered by the broker at the limit.
        setup.queue_declare(
            command_queue,
            durable=True,
            arguments={
                "x-queue-type": "quorum",
                "x-dead-letter-exchange": names.DEAD_LETTER_EXCHANGE,
                "x-delivery-limit": DELIVERY_LIMIT,
            },
        )
        setup.queue_bind(command_queue, names.COMMAND_EXCHANGE, routing_key=manager_id)
        setup.queue_declare(
            names.heartbeat_queue(manager_id),
            arguments={"x-message-ttl": HEARTBEAT_TTL_MS},
        )
        setup.close()

        self._commands = connection.channel()
        self._commands.basic_qos(prefetch_count=self.config.prefetch)
        self._commands.basic_consume(command_queue, self._on_command_delivery)

        self._confirmed = connection.channel()
        self._confirmed.confirm_delivery()

        # The broker cancels a consumer when its queue is deleted, or on a
        # delivery acknowledgement timeout. A silent stall would follow, so
        # the manager reconnects and declares everything again.
        self._cancelled: str | None = None
        self._commands.add_on_cancel_callback(
            lambda frame: self._on_consumer_cancelled(command_queue)
        )

    def _on_consumer_cancelled(self, queue: str) -> None:
        log.error("the broker cancelled the consumer of %s; reconnecting", queue)
        self._cancelled = queue

    def _loop(self, stopping: threading.Event) -> None:
        assert self._connection is not None
        while not stopping.is_set():
            self._step()
        self._drain()

    def _step(self) -> None:
        assert self._connection is not None
        self._connection.process_data_events(time_limit=LOOP_TICK)
        if self._cancelled is not None:
            raise ConsumerCancelled(f"consumer of {self._cancelled} cancelled by the broker")
        failure = self.heartbeats.failure
        if isinstance(failure, pika.exceptions.AMQPError):
            raise failure  # its connection was lost, or the broker cancelled its consumer
        if failure is not None:
            raise ConsumerCancelled(f"the heartbeat consumer failed: {failure!r}") from failure
        self.periodic()
        if self._outbox_dirty:
            self._publish_outbox()

    def _drain(self) -> None:
        """Stop taking commands, let those in progress reply, publish events."""
        self._commands.cancel()
        deadline = time.monotonic() + SHUTDOWN_TIMEOUT
        while self.in_flight() and time.monotonic() < deadline:
            self._step()
        # One more pass delivers the replies handed over by the last handlers.
        self._step()
        if self.in_flight():
            log.warning(
                "%d commands still running after %.0f s; the broker will redeliver them",
                self.in_flight(),
                SHUTDOWN_TIMEOUT,
            )

    def _on_command_delivery(self, channel, method, properties, body: bytes) -> None:
        deliveries = 1 + int((properties.headers or {}).get("x-delivery-count", 0))
        if deliveries >= MAX_DELIVERIES:
            self._reject_poison(properties, method.delivery_tag, deliveries)
            return
        self.on_command(body, properties, method.delivery_tag, self.generation)

    def _reject_poison(self, properties: pika.BasicProperties, delivery_tag: int, deliveries: int) -> None:
        log.error(
            "command with correlation id %s delivered %d times without completing;"
            " dead-lettering it",
            properties.correlation_id,
            deliveries,
        )
        error = ErrorInfo(
            code=ErrorCode.INTERNAL,
            message=f"the command was delivered {deliveries} times and the manager"
            " stopped while handling it each time; it was moved to the dead-letter"
            f" queue {names.DEAD_LETTER_QUEUE}",
        )
        self.reply(properties, Reply(request_id=properties.correlation_id, ok=False, error=error))
        self.settle(delivery_tag, self.generation, accept=False)

    def _publish_outbox(self) -> None:
        self._outbox_dirty = False
        while True:
            batch = self.store.pending_events()
            if not batch:
                return
            for position, routing_key, body in batch:
                self._confirmed.basic_publish(
                    names.EVENT_EXCHANGE,
                    routing_key,
                    body.encode(),
                    pika.BasicProperties(content_type="application/json", delivery_mode=2),
                )
                self.store.remove_events(position)

    def reply(self, properties: pika.BasicProperties, reply: Reply) -> None:
        """Send a command's reply; serving thread only."""
        self.reply_json(properties, reply.model_dump_json())

    def reply_json(self, properties: pika.BasicProperties, reply_json: str) -> None:
        """Send a reply already serialized; serving thread only."""
        if not properties.reply_to:
            return
        self._commands.basic_publish(
            "",
            properties.reply_to,
            reply_json.encode(),
            pika.BasicProperties(
                content_type="application/json", correlation_id=properties.correlation_id
            ),
        )

    def settle(self, delivery_tag: int, generation: int, accept: bool) -> None:
        """Ack, or reject to the dead-letter queue; serving thread only."""
        if generation != self.generation:
            log.info("delivery %d belongs to a closed connection; not acked", delivery_tag)
            return
        if accept:
            self._commands.basic_ack(delivery_tag)
        else:
            self._commands.basic_reject(delivery_tag, requeue=False)

    def send_order(self, container_id: str, queue: str, order: ControlOrder) -> None:
        """Publish an order to an assistant's control ``queue``; serving thread only."""
        try:
            self._confirmed.basic_publish(
                "",
                queue,
                order.model_dump_json().encode(),
                pika.BasicProperties(content_type="application/json"),
                mandatory=True,
            )
        except pika.exceptions.UnroutableError:
            raise OrderUndeliverable(
                f"the assistant of container {container_id!r} is not connected"
                f" (queue {queue} missing)"
            ) from None
