"""A small blocking client: send commands, wait for replies, follow events.

One :class:`Client` owns one pika BlockingConnection and is not
thread-safe: use one per thread. Commands are published with publisher
confirms and ``mandatory``, so a command for a manager id that no manager serves
fails at once with :class:`NoManager` instead of waiting for a timeout.

Errors, all under :class:`ClientError`:

- :class:`BrokerUnavailable`: the broker cannot be reached or refused us;
- :class:`NoManager`: no queue is bound for the manager id;
- :class:`ReplyTimeout`: the manager took the command but sent no reply in time;
- :class:`CommandFailed`: the manager replied with an error (``code``, ``message``).
"""

import collections
import logging
import socket
import time
from collections.abc import Iterator
from typing import Any

import pika
import pika.exceptions
from pydantic import TypeAdapter
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_delay,
    wait_exponential_jitter,
)

from messages import names
from messages.brokers import connection_parameters, redact_url
from messages.models import Command, ErrorCode, Event, Reply, command_adapter

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 90.0
"""Seconds to wait for a reply: longer than the manager's 60 s create
timeout, so a slow create still gets its create_failed reply."""


class ClientError(Exception):
    """Root of the client's errors."""


class BrokerUnavailable(ClientError):
    pass


class NoManager(ClientError):
    pass


class ReplyTimeout(ClientError):
    pass


class CommandFailed(ClientError):
    def __init__(self, code: ErrorCode, message: str):
        super().__init__(f"{code.value}: {message}")
        self.code = code
        self.message = message


def default_manager_id() -> str:
    return socket.gethostname().split(".")[0]


RECONNECT_TIMEOUT = 30.0
"""Seconds a command keeps retrying a lost broker connection before failing."""


def _reconnectable(exc: BaseException) -> bool:
    # Wrong credentials stay wrong: fail at once instead of retrying.
    return isinstance(
        exc,
        (
            pika.exceptions.AMQPConnectionError,
            pika.exceptions.ConnectionWrongStateError,
            pika.exceptions.ChannelWrongStateError,
        ),
    ) and not isinstance(
        exc,
        (
            pika.exceptions.ProbableAuthenticationError,
            pika.exceptions.ProbableAccessDeniedError,
        ),
    )


class Client:
    def __init__(
        self,
        url: str,
        manager_id: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        reconnect_timeout: float = RECONNECT_TIMEOUT,
    ):
        """Connect to the broker at ``url`` (several comma-separated URLs fail over)."""
        self.url = url
        self.manager_id = manager_id or default_manager_id()
        self.timeout = timeout
        self.reconnect_timeout = reconnect_timeout
        self._replies: dict[str, bytes] = {}
        self._subscriptions: list[Subscription] = []
        try:
            self._connect()
        except (
            pika.exceptions.ProbableAuthenticationError,
            pika.exceptions.ProbableAccessDeniedError,
        ) as exc:
            raise BrokerUnavailable(
                f"the broker at {redact_url(url)} rejected the login ({exc!r}): check the"
                " user, password and vhost in the URL"
            ) from exc
        except pika.exceptions.AMQPConnectionError as exc:
            raise BrokerUnavailable(
                f"cannot connect to the broker at {redact_url(url)}: {exc!r}"
            ) from exc

    def _connect(self) -> None:
        self._connection = pika.BlockingConnection(connection_parameters(self.url))
        self._channel = self._connection.channel()
        self._channel.confirm_delivery()
        # Declared here too (same arguments as the manager), so a command
        # sent before any manager ever ran fails with NoManager, not a 404.
        self._channel.exchange_declare(names.COMMAND_EXCHANGE, "direct", durable=True)
        self._channel.basic_consume(names.DIRECT_REPLY_TO, self._on_reply, auto_ack=True)
        for subscription in self._subscriptions:
            subscription._open()

    def _retrying(self, before_sleep) -> Retrying:
        """Retry a lost connection with backoff for up to ``reconnect_timeout`` s."""
        return Retrying(
            retry=retry_if_exception(_reconnectable),
            wait=wait_exponential_jitter(multiplier=0.2, max=5.0, jitter=0.5),
            stop=stop_after_delay(self.reconnect_timeout),
            before_sleep=before_sleep,
            reraise=True,
        )

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        if self._connection.is_open:
            self._connection.close()

    def _on_reply(self, channel, method, properties, body: bytes) -> None:
        if properties.correlation_id:
            self._replies[properties.correlation_id] = body

    # --- commands ---------------------------------------------------------

    def send(self, command: Command | dict[str, Any], manager_id: str | None = None, timeout: float | None = None) -> Reply:
        """Send a command and return the manager's reply, ok or not."""
        if isinstance(command, dict):
            command = command_adapter.validate_python(command)
        body = command.model_dump_json().encode()
        wait = timeout if timeout is not None else self.timeout + float(getattr(command, "grace", 0))
        return self.send_raw(body, command.request_id, manager_id, wait)

    def send_raw(self, body: bytes, correlation_id: str, manager_id: str | None = None, timeout: float | None = None) -> Reply:
        """Publish ``body`` as is (tests use it for malformed input) and wait for the reply.

        A connection lost on the way is opened again and the same body sent
        again, with backoff, for up to ``reconnect_timeout`` seconds. The
        manager keeps the reply of every state-changing request id, so a
        repeated command does not run twice.
        """
        target = manager_id or self.manager_id
        try:
            return self._retrying(self._reconnect_before_retry)(self._publish_and_wait, body, correlation_id, target, timeout)
        except pika.exceptions.AMQPError as exc:
            raise BrokerUnavailable(f"sending to manager {target!r} failed: {exc!r}") from exc

    def _reconnect_before_retry(self, state: RetryCallState) -> None:
        log.warning(
            "broker connection lost (%r); reconnecting, retry %d in %.1f s",
            state.outcome.exception(),
            state.attempt_number,
            state.next_action.sleep,
        )
        try:
            if self._connection.is_open:
                self._connection.close()
        except pika.exceptions.AMQPError:
            pass
        try:
            self._connect()
        except pika.exceptions.AMQPConnectionError as exc:
            log.warning("reconnecting to %s failed: %r", redact_url(self.url), exc)

    def _publish_and_wait(self, body: bytes, correlation_id: str, target: str, timeout: float | None) -> Reply:
        properties = pika.BasicProperties(
            content_type="application/json",
            delivery_mode=2,
            reply_to=names.DIRECT_REPLY_TO,
            correlation_id=correlation_id,
        )
        try:
            self._channel.basic_publish(
                names.COMMAND_EXCHANGE, target, body, properties, mandatory=True
            )
        except pika.exceptions.UnroutableError:
            raise NoManager(
                f"no manager serves id {target!r}: start one with --id {target}"
                " or send to another id"
            ) from None
        return Reply.model_validate_json(self._wait_reply(correlation_id, target, timeout or self.timeout))

    def _wait_reply(self, correlation_id: str, target: str, timeout: float) -> bytes:
        deadline = time.monotonic() + timeout
        while correlation_id not in self._replies:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ReplyTimeout(
                    f"manager {target!r} sent no reply to request {correlation_id}"
                    f" within {timeout:g} s; is that manager running? Its queue keeps"
                    " the command until it starts"
                )
            self._connection.process_data_events(time_limit=min(remaining, 0.5))
        return self._replies.pop(correlation_id)

    def request(self, command: Command | dict[str, Any], **options: Any) -> Reply:
        """Like :meth:`send`, but raise CommandFailed for an error reply."""
        reply = self.send(command, **options)
        if not reply.ok:
            assert reply.error is not None
            raise CommandFailed(reply.error.code, reply.error.message)
        return reply

    # --- events -----------------------------------------------------------

    def subscribe(self, pattern: str = "#", queue: str | None = None) -> "Subscription":
        """Follow events whose routing key matches the topic ``pattern``.

        Without ``queue``, events go to a private queue that lives as long
        as the connection: events published while the client is
        disconnected are missed. With ``queue``, a durable queue of that
        name keeps them until the next subscription with the same name
        reads them, also across client restarts. Delete it with
        ``rabbitmqctl delete_queue NAME`` when no longer needed.
        """
        subscription = Subscription(self, pattern, queue)
        self._subscriptions.append(subscription)
        return subscription


_event_adapter = TypeAdapter(Event)


EVENT_PREFETCH = 100
"""Unacknowledged events a named event queue hands to one subscriber at a time."""


def check_queue_name(name: str) -> None:
    """Raise ValueError for a name unusable for an event queue.

    RabbitMQ rejects empty-looking, reserved ``amq.`` and over-long names,
    and ``berth.`` names are berth's own queues.
    """
    if not name or name.startswith(("amq.", "berth.")) or len(name.encode()) > 255:
        raise ValueError(
            f"{name!r} is not a usable queue name: give a non-empty name of at most"
            " 255 bytes that starts with neither 'amq.' nor 'berth.'"
        )


class Subscription:
    """Events matching one binding pattern, read on the client's connection.

    When the connection is lost, :meth:`get` reconnects the client and binds
    the queue again, for up to the client's ``reconnect_timeout``.

    From a named queue, an event is acknowledged only when the next
    :meth:`get` or :meth:`close` call shows that the caller is done with
    it. A subscriber that dies before that gets it again next time, so
    delivery is at least once; ``event_id`` identifies repeats.
    """

    def __init__(self, client: Client, pattern: str, queue: str | None = None):
        if queue is not None:
            check_queue_name(queue)
        self._client = client
        self.pattern = pattern
        self.durable_queue = queue
        self._events: collections.deque[tuple[Any, int, Event]] = collections.deque()
        self._returned: tuple[Any, int] | None = None
        """Channel and delivery tag of the event last returned, not yet acknowledged."""
        self._channel = None
        self._open()

    def _open(self) -> None:
        """Declare and bind the queue and start consuming; also after a reconnect."""
        channel = self._client._connection.channel()
        channel.exchange_declare(names.EVENT_EXCHANGE, "topic", durable=True)
        if self.durable_queue is None:
            queue = channel.queue_declare("", exclusive=True, auto_delete=True).method.queue
        else:
            # Quorum, like the command queues: it stays readable while one
            # cluster node is down.
            queue = channel.queue_declare(
                self.durable_queue, durable=True, arguments={"x-queue-type": "quorum"}
            ).method.queue
        channel.queue_bind(queue, names.EVENT_EXCHANGE, routing_key=self.pattern)
        if self.durable_queue is not None:
            channel.basic_qos(prefetch_count=EVENT_PREFETCH)
        channel.basic_consume(queue, self._on_event, auto_ack=self.durable_queue is None)
        self._channel = channel

    def _on_event(self, channel, method, properties, body: bytes) -> None:
        try:
            event = _event_adapter.validate_json(body)
        except ValueError as exc:
            log.warning("ignoring an invalid event %r: %s", body[:200], exc)
            if self.durable_queue is not None:
                channel.basic_ack(method.delivery_tag)
            return
        self._events.append((channel, method.delivery_tag, event))

    def _ack_returned(self) -> None:
        """Acknowledge the event last returned, if its channel still exists."""
        returned, self._returned = self._returned, None
        if returned is None or self.durable_queue is None:
            return
        channel, tag = returned
        if channel.is_open:
            channel.basic_ack(tag)
        # On a closed channel the broker has put the event back in the queue.

    def get(self, timeout: float) -> Event | None:
        """Return the next event, or None when none arrives within ``timeout`` s."""
        deadline = time.monotonic() + timeout
        try:
            self._ack_returned()
            while not self._events:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._client._retrying(self._reconnect_before_retry)(self._wait, remaining)
        except pika.exceptions.AMQPError as exc:
            raise BrokerUnavailable(
                f"following events {self.pattern!r} failed: {exc!r}; check that the"
                f" broker at {redact_url(self._client.url)} runs"
            ) from exc
        channel, tag, event = self._events.popleft()
        self._returned = (channel, tag)
        return event

    def _wait(self, remaining: float) -> None:
        connection = self._client._connection
        if not connection.is_open:
            # A reconnect that failed leaves the closed connection in place,
            # and pika fails on it with errors of its own.
            raise pika.exceptions.ConnectionWrongStateError("the broker connection is closed")
        connection.process_data_events(time_limit=min(remaining, 0.5))

    def _reconnect_before_retry(self, state: RetryCallState) -> None:
        if self.durable_queue is None:
            log.warning(
                "event subscription %r lost its connection; events published until"
                " it is bound again are missed",
                self.pattern,
            )
        self._client._reconnect_before_retry(state)

    def __iter__(self) -> Iterator[Event]:
        """Follow events forever."""
        while True:
            event = self.get(3600.0)
            if event is not None:
                yield event

    def close(self) -> None:
        """Acknowledge the event last returned and stop following."""
        if self in self._client._subscriptions:
            self._client._subscriptions.remove(self)
        try:
            self._ack_returned()
            if self._channel is not None and self._channel.is_open:
                self._channel.close()
        except pika.exceptions.AMQPError as exc:
            log.warning("closing the subscription to %r failed: %r", self.pattern, exc)
