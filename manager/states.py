"""The container state machine: which state may follow which."""

from messages.models import ContainerState as S

# None is "no container yet". DELETED -> CREATED lets an id be used again.
ALLOWED: dict[S | None, frozenset[S]] = {
    None: frozenset({S.CREATED}),
    S.CREATED: frozenset({S.STARTING, S.EXITED, S.LOST, S.DELETED}),
    # STARTING -> CREATED: the start order could not reach the assistant.
    S.STARTING: frozenset({S.CREATED, S.RUNNING, S.STOPPING, S.EXITED, S.LOST}),
    S.RUNNING: frozenset({S.STOPPING, S.EXITED, S.LOST}),
    S.STOPPING: frozenset({S.EXITED, S.LOST}),
    S.LOST: frozenset({S.CREATED, S.STARTING, S.RUNNING, S.STOPPING, S.EXITED, S.DELETED}),
    S.EXITED: frozenset({S.DELETED}),
    S.DELETED: frozenset({S.CREATED}),
}

ACTIVE = frozenset({S.CREATED, S.STARTING, S.RUNNING, S.STOPPING, S.LOST})
"""States in which an assistant may still be alive."""


class IllegalTransition(ValueError):
    def __init__(self, container_id: str, current: S | None, new: S):
        name = current.value if current else "nonexistent"
        super().__init__(f"container {container_id!r} cannot go from {name} to {new.value}")
        self.current = current
        self.new = new


def check_transition(container_id: str, current: S | None, new: S) -> None:
    if new not in ALLOWED[current]:
        raise IllegalTransition(container_id, current, new)
