"""Exchange, queue and routing-key names: the one place that spells them.

Every party (manager, assistant, client) builds names through these
helpers, so a rename happens here and nowhere else.
"""

import re

COMMAND_EXCHANGE = "berth.commands"
"""Direct exchange; the routing key of a command is the manager id."""

EVENT_EXCHANGE = "berth.events"
"""Topic exchange; routing key ``<manager-id>.<container-id>.<event>``."""

DEAD_LETTER_EXCHANGE = "berth.dead-letter"
"""Fanout exchange receiving commands that were rejected as invalid."""

DEAD_LETTER_QUEUE = "berth.dead-letter"

DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"
"""RabbitMQ's pseudo-queue for RPC replies without a declared queue."""

# Manager and container ids become AMQP routing-key words, directory names
# and cgroup path components, so they may not contain ".", "/" or "#".
# Dots are allowed in container ids by the OCI runtime, but a dot splits a
# topic routing key into words, so berth rejects it.
ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
ID_RULE = "1 to 64 characters: letters, digits, '_' and '-', not starting with '_' or '-'"


def command_queue(manager_id: str) -> str:
    """Return the durable queue a manager consumes its commands from."""
    return f"berth.commands.{manager_id}"


def heartbeat_queue(manager_id: str) -> str:
    """Return the queue a manager consumes its assistants' heartbeats from."""
    return f"berth.heartbeats.{manager_id}"


def lock_queue(manager_id: str) -> str:
    """Return the exclusive queue whose holder is the one manager with this id."""
    return f"berth.lock.{manager_id}"


def event_routing_key(manager_id: str, container_id: str, event: str) -> str:
    return f"{manager_id}.{container_id}.{event}"
