"""The manager process: wires the store, registry, handlers and broker.

The broker's serving thread consumes commands and runs
:meth:`Manager.periodic`; command handlers run on a thread pool, and
:meth:`Manager.on_heartbeat` runs on the heartbeat consumer's thread.
"""

import concurrent.futures
import functools
import gc
import hashlib
import os
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
from manager.network import remove_manager_network
from manager.registry import Registry
from manager.states import ACTIVE
from manager.store import Store
from messages.models import (
    BadMessage,
    ContainerState,
    ErrorCode,
    ErrorInfo,
    Heartbeat,
    HeartbeatReply,
    Reply,
    parse_command,
)

log = logging.getLogger(__name__)

MUTATING_COMMANDS = frozenset({"create", "run", "start", "stop", "kill", "delete"})
"""Commands whose replies are stored, so that a repeat of one never runs twice."""

CHECK_INTERVAL = 0.5
"""Seconds between checks for ended assistants and silent containers."""


def command_fingerprint(command) -> str:
    """Digest of a command without its request id, to spot a reused id."""
    body = command.model_dump_json(exclude={"request_id"})
    return hashlib.sha256(body.encode()).hexdigest()[:32]


class Manager:
    def __init__(self, config: ManagerConfig, connect_timeout: float = 60.0):
        self.config = config
        config.containers_dir.mkdir(parents=True, exist_ok=True)
        config.manager_runc_root.mkdir(parents=True, exist_ok=True)
        self.store = Store(config.database)
        self.assistants = Assistants(config.manager_dir, config.spawn_mode)
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
        self.epoch = self.store.next_epoch()
        self.started = time.monotonic()
        self.stopping = threading.Event()
        self.pid = os.getpid()
        self._futures: set[concurrent.futures.Future] = set()
        # Mutating commands in progress by request id, and the deliveries of
        # the same request that arrived meanwhile; serving thread only.
        self._in_progress: dict[str, tuple[concurrent.futures.Future, str]] = {}
        self._duplicates: dict[str, list[tuple[pika.BasicProperties, int, int]]] = {}
        self._checking: set[str] = set()
        self._checking_lock = threading.Lock()
        self._next_check = 0.0

    def run(self) -> int:
        """Serve until SIGTERM or SIGINT; return the process exit status."""
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)
        log.info(
            "manager %s starting, epoch %d, with %d known containers (%d active)",
            self.config.manager_id,
            self.epoch,
            len(self.registry.records),
            len(self.registry.active()),
        )
        pruned = self.store.prune_replies()
        if pruned:
            log.info("forgot %d stored replies older than the retention time", pruned)
        self.handlers.sweep_orphans()
        known = {cid for cid, record in self.registry.records.items() if record.info.state != ContainerState.DELETED}
        self.handlers.network.sweep(known)  # veths, namespaces and addresses of unknown containers
        # A full collection walks every tracked object and pauses every
        # thread meanwhile, heartbeat replies included. The imports alone
        # leave about 50,000 objects that live as long as the process, and
        # walking them took about 30 ms of CPU (Python 3.11.7, 2 vCPUs).
        # Frozen objects are never walked or collected.
        gc.freeze()
        log.info("moved %d start-up objects out of garbage collection", gc.get_freeze_count())
        self.started = time.monotonic()
        try:
            self.broker.serve(self.stopping)
        except BrokerError as exc:
            log.error("manager %s stops: %s", self.config.manager_id, exc)
            return 1
        finally:
            self.executor.shutdown(wait=False, cancel_futures=True)
            self._remove_unused_resources()
            self.assistants.close()
            self.store.close()
        log.info("manager %s stopped", self.config.manager_id)
        return 0

    def _remove_unused_resources(self) -> None:
        """Delete the manager's bridge and runc root when no container is left to use them.

        A container that still exists, running or not, keeps the bridge: its
        workload may outlive this manager, and a restarted manager reuses it.
        """
        with self.registry.lock:
            busy = self.in_flight() or self.registry.pending or any(
                record.info.state != ContainerState.DELETED
                for record in self.registry.records.values()
            )
        if busy:
            log.info("manager %s keeps its network: containers remain", self.config.manager_id)
            return
        remove_manager_network(self.config.manager_id)
        try:
            # Empty once runc has deleted every container; created again at start.
            self.config.manager_runc_root.rmdir()
        except OSError as exc:
            log.info("runc root %s stays: %s", self.config.manager_runc_root, exc)

    def _on_signal(self, signum: int, frame) -> None:
        if os.getpid() != self.pid:
            return  # a child forked by a library (pyroute2 does) inherited the handler
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
        request_id = command.request_id
        log.debug("command %s %s (request %s)", command.command, getattr(command, "id", ""), request_id)
        mutating = command.command in MUTATING_COMMANDS
        fingerprint = command_fingerprint(command)
        if mutating and self._answer_duplicate(
            request_id, fingerprint, properties, delivery_tag, generation
        ):
            return

        future = self.executor.submit(self._handle, command, mutating, fingerprint)
        self._futures.add(future)
        if mutating:
            self._in_progress[request_id] = (future, fingerprint)

        def finish(done: concurrent.futures.Future) -> None:
            reply_json: str = done.result()
            self.broker.submit(
                functools.partial(
                    self._send_result, request_id, reply_json, properties, delivery_tag, generation
                )
            )

        future.add_done_callback(finish)

    def _answer_duplicate(
        self,
        request_id: str,
        fingerprint: str,
        properties: pika.BasicProperties,
        delivery_tag: int,
        generation: int,
    ) -> bool:
        """Answer a request id seen before from its stored reply; False if new.

        A redelivery after a crash or reconnect, or a client's retry, must
        not run the command again, and gets the reply of the first run. A
        different command under a used request id gets an error instead.
        """
        running = self._in_progress.get(request_id)
        if running is not None and not running[0].done():
            if running[1] != fingerprint:
                self._reject_reused_id(request_id, properties, delivery_tag, generation)
                return True
            log.info("request %s is running already; its reply will answer this copy too", request_id)
            self._duplicates.setdefault(request_id, []).append((properties, delivery_tag, generation))
            return True
        stored = self.store.find_reply(request_id)
        if stored is None:
            return False
        stored_fingerprint, reply_json = stored
        if stored_fingerprint != fingerprint:
            self._reject_reused_id(request_id, properties, delivery_tag, generation)
            return True
        log.info("request %s was handled before; sending its stored reply again", request_id)
        self.broker.reply_json(properties, reply_json)
        self.broker.settle(delivery_tag, generation, accept=True)
        return True

    def _reject_reused_id(
        self, request_id: str, properties: pika.BasicProperties, delivery_tag: int, generation: int
    ) -> None:
        log.warning("request id %s reused for a different command; rejected", request_id)
        error = ErrorInfo(
            code=ErrorCode.INVALID_ARGUMENT,
            message=f"request_id {request_id!r} was already used for a different command;"
            " send every new command with a new request_id",
        )
        self.broker.reply(properties, Reply(request_id=request_id, ok=False, error=error))
        self.broker.settle(delivery_tag, generation, accept=True)

    def _handle(self, command, mutating: bool, fingerprint: str) -> str:
        """Run a command on a worker thread; store a mutating command's reply."""
        reply_json = self.handlers.handle(command).model_dump_json()
        if mutating:
            self.store.save_reply(command.request_id, fingerprint, reply_json)
        return reply_json

    def _send_result(
        self, request_id: str, reply_json: str, properties, delivery_tag: int, generation: int
    ) -> None:
        # The reply goes out before the ack: a crash between the two makes
        # the broker redeliver the command, which then gets the stored reply.
        self._in_progress.pop(request_id, None)
        deliveries = [(properties, delivery_tag, generation)] + self._duplicates.pop(request_id, [])
        for each_properties, each_tag, each_generation in deliveries:
            self.broker.reply_json(each_properties, reply_json)
            self.broker.settle(each_tag, each_generation, accept=True)

    # --- heartbeat consumer thread -------------------------------------------

    def on_heartbeat(self, body: bytes) -> HeartbeatReply | None:
        try:
            beat = Heartbeat.model_validate_json(body)
        except ValidationError as exc:
            log.warning("invalid heartbeat %r ignored: %s", body[:200], exc)
            return None
        adopting = time.monotonic() - self.started < self.config.adopt_window
        return answer_heartbeat(self.registry, beat, self.epoch, adopting)

    # --- serving thread ---------------------------------------------------

    def periodic(self) -> None:
        now = time.monotonic()
        if now < self._next_check:
            return
        self._next_check = now + CHECK_INTERVAL

        for container_id in self.assistants.reap():
            self._check_assistant(container_id)
        for record in self.registry.active():
            container_id = record.info.id
            pid = record.info.assistant_pid
            if not self.assistants.reaped_alive(container_id, pid) and not self.assistants.is_alive(
                container_id, pid, self.handlers.paths(container_id).root
            ):
                self._check_assistant(container_id)
                continue
            # Checked again under the lock, because the heartbeat thread may
            # have recorded a heartbeat or a state change since active().
            with self.registry.lock:
                silent = self.registry.silent_for(container_id)
                state = self.registry.records[container_id].info.state
                if state in ACTIVE and state != ContainerState.LOST and silent > self.config.lost_after:
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
