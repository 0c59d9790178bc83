"""Errors a command handler raises; each becomes one error reply."""

from messages.models import ErrorCode


class CommandError(Exception):
    """A command that cannot be carried out, with the reply's code and message.

    The message names the value at fault and, where there is one, the fix.
    """

    def __init__(self, code: ErrorCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def not_found(container_id: str) -> CommandError:
    return CommandError(
        ErrorCode.NOT_FOUND,
        f"no container {container_id!r} on this manager; `list` (berth ps --all)"
        " shows the known ids",
    )
