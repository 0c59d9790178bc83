"""Answers to assistant heartbeats, and the state changes they report.

Runs on the manager's heartbeat consumer thread, next to the command
threads and the broker's serving thread, so every step takes
``registry.lock``. It does no slow work: a lookup, at most one SQLite
transaction, and a reply.
"""

import logging

from manager.registry import Registry
from manager.states import IllegalTransition
from messages.models import (
    AssistantStatus,
    ContainerState,
    Heartbeat,
    HeartbeatReply,
    Verdict,
    utc_now,
)

log = logging.getLogger(__name__)

def answer_heartbeat(
    registry: Registry, beat: Heartbeat, epoch: int, adopting: bool
) -> HeartbeatReply:
    """Return the reply to one heartbeat, applying the status it reports.

    While ``adopting`` (the first seconds after a manager start), an
    unknown id gets retry_later instead of nack, so that an assistant is
    never killed by a manager that has not caught up yet.
    """
    reply = _answer(registry, beat, adopting)
    reply.epoch = epoch
    return reply


def _answer(registry: Registry, beat: Heartbeat, adopting: bool) -> HeartbeatReply:
    container_id = beat.container_id
    with registry.lock:
        pending = registry.pending.get(container_id)
        record = registry.get(container_id)
        if pending is not None:
            current = pending.token
        elif record is not None:
            current = record.assistant_token
        else:
            current = None
        if current and beat.token != current:
            # An assistant of an earlier create of this id, for instance one
            # whose manager crashed before it stored the container.
            log.warning(
                "heartbeat from stale assistant %d of container %s: nack",
                beat.assistant_pid,
                container_id,
            )
            return HeartbeatReply(verdict=Verdict.NACK)
        if beat.control_queue and registry.control_queues.get(container_id) != beat.control_queue:
            registry.control_queues[container_id] = beat.control_queue
            registry.changed.notify_all()  # an order may be waiting for it
        if pending is not None:
            pending.status = beat.status
            pending.pid = beat.pid
            pending.error = beat.error
            pending.assistant_pid = beat.assistant_pid
            registry.changed.notify_all()
            # A failed create is final: the create handler has what it needs.
            final = beat.status == AssistantStatus.CREATE_FAILED
            return HeartbeatReply(verdict=Verdict.ACK, exit_recorded=final)

        if record is None or record.info.state == ContainerState.DELETED:
            verdict = Verdict.RETRY_LATER if adopting else Verdict.NACK
            log.warning(
                "heartbeat from unknown container %s (assistant %d): %s",
                container_id,
                beat.assistant_pid,
                verdict.value,
            )
            return HeartbeatReply(verdict=verdict)
        registry.note_heartbeat(container_id)

        try:
            return _apply_status(registry, beat, record.info.state, record.stop_grace)
        except IllegalTransition as exc:
            log.error(
                "container %s: heartbeat status %s ignored: %s",
                container_id,
                beat.status.value,
                exc,
            )
            return HeartbeatReply(verdict=Verdict.ACK)


def _apply_status(
    registry: Registry,
    beat: Heartbeat,
    state: ContainerState,
    stop_grace: float | None,
) -> HeartbeatReply:
    container_id = beat.container_id
    if beat.status in (AssistantStatus.EXITED, AssistantStatus.CREATE_FAILED):
        if state != ContainerState.EXITED and beat.exit is not None:
            registry.transition(container_id, ContainerState.EXITED, exit=beat.exit)
        return HeartbeatReply(verdict=Verdict.ACK, exit_recorded=True)

    if state == ContainerState.LOST:
        found = ContainerState.RUNNING if beat.status == AssistantStatus.RUNNING else ContainerState.CREATED
        registry.transition(
            container_id,
            ContainerState.STOPPING if stop_grace is not None else found,
            message="heartbeats resumed",
            assistant_pid=beat.assistant_pid,
        )
    elif state == ContainerState.STARTING and beat.status == AssistantStatus.RUNNING:
        registry.transition(
            container_id, ContainerState.RUNNING, pid=beat.pid, started_at=utc_now()
        )

    if stop_grace is not None:
        return HeartbeatReply(verdict=Verdict.STOP, grace=stop_grace)
    return HeartbeatReply(verdict=Verdict.ACK)
