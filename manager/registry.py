"""The manager's containers in memory, backed by the store.

Every state change goes through :meth:`Registry.transition`, which checks
the state machine, persists the record with its event, and wakes the
threads waiting in :meth:`Registry.wait_for`.
"""

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from manager.states import ACTIVE, check_transition
from manager.store import ContainerRecord, Store
from messages.models import (
    AssistantStatus,
    ContainerState,
    Event,
    ExitInfo,
    utc_now,
)
from messages.names import event_routing_key

log = logging.getLogger(__name__)


@dataclass
class PendingCreate:
    """A container whose assistant has not reported the runc create result yet."""

    token: str
    assistant_pid: int | None = None
    status: AssistantStatus = AssistantStatus.CREATING
    pid: int | None = None
    error: str | None = None


class Registry:
    def __init__(self, manager_id: str, store: Store, on_event: Callable[[], None]):
        self.manager_id = manager_id
        self.store = store
        self.on_event = on_event
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)
        self.records = {record.info.id: record for record in store.load()}
        self.pending: dict[str, PendingCreate] = {}
        # Monotonic time of each container's last heartbeat; a restart
        # counts as one, so reloaded containers get a full lost_after window.
        self.last_heartbeat: dict[str, float] = dict.fromkeys(self.records, time.monotonic())
        self._command_locks: dict[str, threading.Lock] = {}
        # The control queue each assistant named in its latest heartbeat.
        self.control_queues: dict[str, str] = {}

    def command_lock(self, container_id: str) -> threading.Lock:
        """Return the lock that serializes commands on one container."""
        with self.lock:
            return self._command_locks.setdefault(container_id, threading.Lock())

    def get(self, container_id: str) -> ContainerRecord | None:
        with self.lock:
            return self.records.get(container_id)

    def active(self) -> list[ContainerRecord]:
        with self.lock:
            return [r for r in self.records.values() if r.info.state in ACTIVE]

    def add(self, record: ContainerRecord) -> None:
        """Store a new container in state created and announce it."""
        with self.lock:
            previous = self.records.get(record.info.id)
            current = previous.info.state if previous else None
            check_transition(record.info.id, current, ContainerState.CREATED)
            record.sequence = 0
            self.records[record.info.id] = record
            self.last_heartbeat[record.info.id] = time.monotonic()
            self._commit(record, ContainerState.CREATED, None, None)

    def transition(
        self,
        container_id: str,
        new: ContainerState,
        exit: ExitInfo | None = None,
        message: str | None = None,
        **changes: object,
    ) -> ContainerRecord:
        """Move a container to ``new``, persist it and queue its event.

        ``changes`` are ContainerInfo fields set in the same step. Raises
        IllegalTransition (a ValueError) when the state machine forbids it.
        """
        with self.lock:
            record = self.records[container_id]
            check_transition(container_id, record.info.state, new)
            record.info = record.info.model_copy(update={"state": new, **changes})
            if exit is not None:
                record.info.exit = exit
            if new in (ContainerState.EXITED, ContainerState.DELETED):
                record.stop_grace = None
            self._commit(record, new, exit, message)
            return record

    def announce(self, container_id: str, event_name: str, state: ContainerState, message: str) -> None:
        """Publish an event that is not a transition, such as an orphan's removal."""
        with self.lock:
            record = self.records.get(container_id)
            sequence = record.sequence + 1 if record else 1
            event = Event(
                manager_id=self.manager_id,
                container_id=container_id,
                sequence=sequence,
                event=event_name,
                state=state,
                message=message,
            )
            key = event_routing_key(self.manager_id, container_id, event_name)
            if record is not None:
                record.sequence = sequence
                self.store.save(record, event, key)
            else:
                self.store.save_event(event, key)
        log.info("container %s: %s: %s", container_id, event_name, message)
        self.on_event()

    def update(self, record: ContainerRecord) -> None:
        """Persist a change that is not a state transition (no event)."""
        with self.lock:
            self.store.save(record)
            self.changed.notify_all()

    def _commit(
        self,
        record: ContainerRecord,
        state: ContainerState,
        exit: ExitInfo | None,
        message: str | None,
    ) -> None:
        record.sequence += 1
        event = Event(
            manager_id=self.manager_id,
            container_id=record.info.id,
            sequence=record.sequence,
            event=state.value,
            state=state,
            exit=exit,
            message=message,
        )
        key = event_routing_key(self.manager_id, record.info.id, state.value)
        self.store.save(record, event, key)
        log.info(
            "container %s is %s (event %d)%s",
            record.info.id,
            state.value,
            record.sequence,
            f": {message}" if message else "",
        )
        self.changed.notify_all()
        self.on_event()

    def note_heartbeat(self, container_id: str) -> None:
        with self.lock:
            self.last_heartbeat[container_id] = time.monotonic()
            record = self.records.get(container_id)
            if record is not None:
                record.info.last_heartbeat_at = utc_now()

    def silent_for(self, container_id: str) -> float:
        with self.lock:
            return time.monotonic() - self.last_heartbeat.get(container_id, time.monotonic())

    def wait_for(
        self,
        container_id: str,
        predicate: Callable[[ContainerRecord | None, PendingCreate | None], bool],
        timeout: float,
    ) -> bool:
        """Wait until ``predicate(record, pending)`` holds; False on timeout."""
        with self.changed:
            return self.changed.wait_for(
                lambda: predicate(self.records.get(container_id), self.pending.get(container_id)),
                timeout,
            )
