"""The manager process: wires the store, registry, handlers and broker.

The broker's serving thread runs the consumers and :meth:`Manager.periodic`;
command handlers run on a thread pool.
"""

import concurrent.futures
import functools
import logging
import signal
import threading
import time

import pika
from pydantic import ValidationError

from manager.assistants import Assistants
from manager.broker import Broker, BrokerError
from manager.config import ManagerConfig
from manager.handlers import Handlers
from manager.heartbeats import answer_heartbeat
from manager.registry import Registry
from manager.states import ACTIVE
from manager.store import Store
from messages.models import (
    BadMessage,
    ContainerState,
    ErrorInfo,
    Heartbeat,
    HeartbeatReply,
    Reply,
    parse_command,
)

log = logging.getLogger(__name__)

CHECK_INTERVAL = 0.5
"""Seconds between checks for ended assistants and silent containers."""


class Manager:
    def __init__(self, config: ManagerConfig, connect_timeout: float = 60.0):
        self.config = config
        config.containers_dir.mkdir(parents=True, exist_ok=True)
        config.manager_runc_root.mkdir(parents=True, exist_ok=True)
        self.store = Store(config.database)
        self.assistants = Assistants()
        self.broker = Broker(
            config,
            self.store,
            on_command=self.on_command,
            on_heartbeat=self.on_heartbeat,
            periodic=self.periodic,
            in_flight=self.in_flight,
            connect_timeout=connect_timeout,
        )
        self.registry = Registry(config.manager_id, self.store, on_event=self.broker.wake_outbox)
        self.handlers = Handlers(config, self.registry, self.assistants, self.broker)
        self.executor = concurrent.futures.ThreadPoolExecutor(
            config.workers, thread_name_prefix="command"
        )
        self.stopping = threading.Event()
        self._futures: set[concurrent.futures.Future] = set()
        self._checking: set[str] = set()
        self._checking_lock = threading.Lock()
        self._next_check = 0.0

    def run(self) -> int:
        """Serve until SIGTERM or SIGINT; return the process exit status."""
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)
        log.info(
            "manager %s starting with %d known containers (%d active)",
            self.config.manager_id,
            len(self.registry.records),
            len(self.registry.active()),
        )
        try:
            self.broker.serve(self.stopping)
        except BrokerError as exc:
            log.error("manager %s stops: %s", self.config.manager_id, exc)
            return 1
        finally:
            self.executor.shutdown(wait=False, cancel_futures=True)
            self.store.close()
        log.info("manager %s stopped", self.config.manager_id)
        return 0

    def _on_signal(self, signum: int, frame) -> None:
        log.info("manager %s received %s; stopping", self.config.manager_id, signal.Signals(signum).name)
        self.stopping.set()

    def in_flight(self) -> int:
        """Count commands still being handled."""
        self._futures = {future for future in self._futures if not future.done()}
        return len(self._futures)

    # --- serving thread ---------------------------------------------------

    def on_command(
        self, body: bytes, properties: pika.BasicProperties, delivery_tag: int, generation: int
    ) -> None:
        try:
            command = parse_command(body)
        except BadMessage as exc:
            log.warning(
                "rejected command (correlation id %s) to the dead-letter queue: %s",
                properties.correlation_id,
                exc,
            )
            error = ErrorInfo(code=exc.code, message=str(exc))
            self.broker.reply(
                properties,
                Reply(request_id=exc.request_id or properties.correlation_id, ok=False, error=error),
            )
            self.broker.settle(delivery_tag, generation, accept=False)
            return

        if "request_id" not in command.model_fields_set and properties.correlation_id:
            # A client that sets only correlation_id still gets its id back.
            command.request_id = properties.correlation_id
        log.debug("command %s %s (request %s)", command.command, getattr(command, "id", ""), command.request_id)
        future = self.executor.submit(self.handlers.handle, command)
        self._futures.add(future)

        def finish(done: concurrent.futures.Future) -> None:
            reply: Reply = done.result()
            self.broker.submit(
                functools.partial(self._send_result, reply, properties, delivery_tag, generation)
            )

        future.add_done_callback(finish)

    def _send_result(self, reply: Reply, properties, delivery_tag: int, generation: int) -> None:
        # The reply goes out before the ack: a crash between the two makes
        # the broker redeliver the command, never lose its reply.
        self.broker.reply(properties, reply)
        self.broker.settle(delivery_tag, generation, accept=True)

    def on_heartbeat(self, body: bytes) -> HeartbeatReply | None:
        try:
            beat = Heartbeat.model_validate_json(body)
        except ValidationError as exc:
            log.warning("invalid heartbeat %r ignored: %s", body[:200], exc)
            return None
        return answer_heartbeat(self.registry, beat)

    def periodic(self) -> None:
        now = time.monotonic()
        if now < self._next_check:
            return
        self._next_check = now + CHECK_INTERVAL

        for container_id in self.assistants.reap():
            self._check_assistant(container_id)
        for record in self.registry.active():
            container_id = record.info.id
            if not self.assistants.is_alive(
                container_id, record.info.assistant_pid, self.handlers.paths(container_id).root
            ):
                self._check_assistant(container_id)
                continue
            silent = self.registry.silent_for(container_id)
            if record.info.state != ContainerState.LOST and silent > self.config.lost_after:
                self.registry.transition(
                    container_id,
                    ContainerState.LOST,
                    message=f"no heartbeat for {silent:.1f} s",
                )

    def _check_assistant(self, container_id: str) -> None:
        """Record the end of a container whose assistant is gone, off this thread."""
        with self._checking_lock:
            if container_id in self._checking:
                return
            self._checking.add(container_id)

        def check() -> None:
            try:
                with self.registry.command_lock(container_id):
                    record = self.registry.get(container_id)
                    if record is None or record.info.state not in ACTIVE:
                        return
                    log.warning("container %s: its assistant is gone", container_id)
                    self.handlers.force_runc_cleanup(container_id)
                    self.handlers.record_lost_exit(
                        container_id, "its assistant ended without reporting an exit"
                    )
            finally:
                with self._checking_lock:
                    self._checking.discard(container_id)

        self.executor.submit(check)
