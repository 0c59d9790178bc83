"""The manager's bridge: created on first use, with the gateway address.

Without a configured subnet the manager picks a /24 of AUTO_SUPERNET,
starting from a hash of its id. It skips every /24 that overlaps an
address already configured in the network namespace, so several managers
sharing a host (as in tests) do not route one subnet to two bridges.
"""

import hashlib
import ipaddress
import logging
import socket

from pyroute2 import IPRoute

log = logging.getLogger(__name__)

AUTO_SUPERNET = ipaddress.IPv4Network("10.213.0.0/16")
"""Private range from which a manager without a configured subnet picks a /24."""

AUTO_PREFIX_LENGTH = 24


class BridgeError(RuntimeError):
    """The bridge cannot be created or carries an unexpected address."""


def ipv4_interfaces(ipr: IPRoute, index: int | None = None) -> list[ipaddress.IPv4Interface]:
    """Return the IPv4 addresses with their prefix, of one interface or of all."""
    query = {"family": socket.AF_INET}
    if index is not None:
        query["index"] = index
    found = []
    for message in ipr.get_addr(**query):
        address = message.get("IFA_ADDRESS")
        if address is not None:
            found.append(ipaddress.IPv4Interface(f"{address}/{message['prefixlen']}"))
    return found


def pick_subnet(ipr: IPRoute, manager_id: str) -> ipaddress.IPv4Network:
    """Pick a /24 of AUTO_SUPERNET that overlaps no address of this namespace."""
    used = [interface.network for interface in ipv4_interfaces(ipr)]
    candidates = list(AUTO_SUPERNET.subnets(new_prefix=AUTO_PREFIX_LENGTH))
    start = int(hashlib.sha256(manager_id.encode()).hexdigest(), 16) % len(candidates)
    for step in range(len(candidates)):
        candidate = candidates[(start + step) % len(candidates)]
        if not any(candidate.overlaps(network) for network in used):
            return candidate
    raise BridgeError(
        f"every /{AUTO_PREFIX_LENGTH} of {AUTO_SUPERNET} overlaps an address on this host;"
        " set the manager's network subnet explicitly"
    )


def gateway_of(subnet: ipaddress.IPv4Network) -> ipaddress.IPv4Interface:
    """Return the bridge address of a subnet: its first host address."""
    first = next(subnet.hosts())
    return ipaddress.IPv4Interface(f"{first}/{subnet.prefixlen}")


def ensure_bridge(
    ipr: IPRoute, name: str, subnet: ipaddress.IPv4Network
) -> ipaddress.IPv4Interface:
    """Create the bridge if missing, give it the subnet's gateway address, bring it up.

    Returns the gateway address. Raises BridgeError when the bridge exists
    with an address of another subnet, because moving it would cut off the
    containers attached to it.
    """
    gateway = gateway_of(subnet)
    indexes = ipr.link_lookup(ifname=name)
    if not indexes:
        log.info("bridge %s: creating it with address %s", name, gateway)
        ipr.link("add", ifname=name, kind="bridge")
        indexes = ipr.link_lookup(ifname=name)
    index = indexes[0]

    present = ipv4_interfaces(ipr, index)
    if gateway not in present:
        other = [interface for interface in present if interface.network != subnet]
        if other:
            raise BridgeError(
                f"bridge {name} has address {other[0]}, not one of subnet {subnet}:"
                " delete the bridge's containers and the bridge, or configure subnet"
                f" {other[0].network}"
            )
        ipr.addr("add", index=index, address=str(gateway.ip), prefixlen=subnet.prefixlen)
    ipr.link("set", index=index, state="up")
    return gateway


def bridge_subnet(ipr: IPRoute, name: str) -> ipaddress.IPv4Network | None:
    """Return the subnet of the bridge's first IPv4 address, or None without one."""
    indexes = ipr.link_lookup(ifname=name)
    if not indexes:
        return None
    present = ipv4_interfaces(ipr, indexes[0])
    return present[0].network if present else None


PRIVATE_BLOCKS = tuple(
    ipaddress.IPv4Network(block) for block in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16")
)
"""The private IPv4 ranges of RFC 1918, which container subnets must lie in."""


def parse_subnet(text: str) -> ipaddress.IPv4Network:
    """Parse a container subnet such as 10.213.7.0/24; raise ValueError naming the value."""
    try:
        subnet = ipaddress.IPv4Network(text)
    except ValueError as exc:
        raise ValueError(
            f"invalid network subnet {text!r}: {exc}; use a network address with"
            " a prefix length, such as 10.213.7.0/24"
        ) from None
    if subnet.prefixlen > 30:
        raise ValueError(
            f"invalid network subnet {text!r}: a /{subnet.prefixlen} has no room for"
            " the bridge and a container; use a prefix length of 30 or less"
        )
    if not any(subnet.subnet_of(block) for block in PRIVATE_BLOCKS):
        # Routes for a public range would send the host's own traffic for
        # those addresses to the containers instead.
        raise ValueError(
            f"invalid network subnet {text!r}: not a private range; use a subnet of"
            f" {', '.join(str(block) for block in PRIVATE_BLOCKS)}"
        )
    return subnet
