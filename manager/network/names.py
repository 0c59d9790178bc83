"""Names of a manager's bridge, veths and network namespaces.

Linux limits interface names to 15 characters (IFNAMSIZ 16 with the NUL),
and manager and container ids may have 64, so interface names carry short
hashes of the ids. Every name starts with a per-manager prefix, which lets
a startup sweep find what one manager left behind without touching other
managers' interfaces on the same host.
"""

import hashlib

MANAGER_TAG_LENGTH = 6
CONTAINER_TAG_LENGTH = 7
"""Hex digits of the hashes in interface names: 24 bits for the manager
and 28 bits for the container, so a veth name has 2 + 6 + 7 = 15 characters."""

NETNS_PREFIX = "berth-"
VETH_PREFIX = "bv"


def _digest(text: str, length: int) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def manager_tag(manager_id: str) -> str:
    return _digest(manager_id, MANAGER_TAG_LENGTH)


def bridge_name(manager_id: str) -> str:
    """Return the manager's bridge name, e.g. ``berth-1a2b3c`` (12 characters)."""
    return f"berth-{manager_tag(manager_id)}"


def veth_prefix(manager_id: str) -> str:
    """Return the prefix shared by all host-side veth names of one manager."""
    return f"{VETH_PREFIX}{manager_tag(manager_id)}"


def veth_name(manager_id: str, container_id: str) -> str:
    """Return the host-side veth name of a container (15 characters)."""
    tag = _digest(f"{manager_id}/{container_id}", CONTAINER_TAG_LENGTH)
    return f"{veth_prefix(manager_id)}{tag}"


def netns_prefix(manager_id: str) -> str:
    """Return the prefix of the manager's namespace names in /run/netns."""
    return f"{NETNS_PREFIX}{manager_tag(manager_id)}-"


def netns_name(manager_id: str, container_id: str) -> str:
    """Return the container's namespace name: the manager prefix, then the container id.

    Namespace names are file names, so they are not bound by IFNAMSIZ and
    keep the container id readable for ``ip netns list``.
    """
    return f"{netns_prefix(manager_id)}{container_id}"


def container_of_netns(manager_id: str, name: str) -> str | None:
    """Return the container id in a namespace name of this manager, or None."""
    prefix = netns_prefix(manager_id)
    if not name.startswith(prefix) or len(name) == len(prefix):
        return None
    return name[len(prefix):]
