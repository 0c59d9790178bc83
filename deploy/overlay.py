"""A VXLAN overlay between the lab's hosts, so containers reach each other across hosts.

Each lab host has its own container subnet (10.215.N.0/24 on host N).
In each host namespace this module creates a VXLAN device on eth0 with an
address of the transit subnet (OVERLAY_SUBNET), flood entries for every
other host, and a route to each other host's container subnet through
that host's transit address. IPv4 forwarding is switched on inside the
host namespaces only, whose one outside link is the lab bridge, so
routed traffic never leaves the lab.
"""

import ipaddress
import logging
import subprocess
import sys

from pyroute2 import IPRoute, netns

log = logging.getLogger(__name__)

OVERLAY_SUBNET = ipaddress.IPv4Network("10.216.0.0/24")
"""Transit addresses of the hosts' VXLAN devices; host N has address N."""

VXLAN_ID = 4213
VXLAN_PORT = 4789
"""VXLAN's IANA-assigned UDP port."""

DEVICE = "berthvx"


def transit_address(number: int) -> ipaddress.IPv4Address:
    return OVERLAY_SUBNET.network_address + number


def enable_forwarding(namespace: str) -> None:
    """Switch on IPv4 forwarding inside one named namespace.

    /proc/sys/net belongs to the network namespace of the process that
    opens it, so a child process enters the namespace first.
    """
    subprocess.run(
        [sys.executable, "-c", "open('/proc/sys/net/ipv4/ip_forward', 'w').write('1')"],
        check=True,
        preexec_fn=lambda: netns.setns(namespace, flags=0),
    )


def connect_hosts(hosts: list[dict], container_subnet: str) -> None:
    """Build the overlay between ``hosts`` (lab state entries with number, netns, address).

    ``container_subnet`` is a format string with ``{host}`` for the host number.
    """
    for host in hosts:
        peers = [peer for peer in hosts if peer["number"] != host["number"]]
        with IPRoute(netns=host["netns"], flags=0) as ipr:
            eth0 = ipr.link_lookup(ifname="eth0")[0]
            ipr.link(
                "add",
                ifname=DEVICE,
                kind="vxlan",
                vxlan_id=VXLAN_ID,
                vxlan_local=host["address"],
                vxlan_link=eth0,
                vxlan_port=VXLAN_PORT,
            )
            device = ipr.link_lookup(ifname=DEVICE)[0]
            # NOTE: the VXLAN device's MTU is 50 bytes below eth0's, but the
            # containers keep 1500, so large packets between hosts depend on
            # path MTU discovery; only short TCP exchanges are tested.
            ipr.addr(
                "add",
                index=device,
                address=str(transit_address(host["number"])),
                prefixlen=OVERLAY_SUBNET.prefixlen,
            )
            ipr.link("set", index=device, state="up")
            for peer in peers:
                # The all-zero MAC entry floods broadcasts (ARP) to the peer.
                ipr.fdb("append", ifindex=device, lladdr="00:00:00:00:00:00", dst=peer["address"])
                ipr.route(
                    "add",
                    dst=container_subnet.format(host=peer["number"]),
                    gateway=str(transit_address(peer["number"])),
                )
        enable_forwarding(host["netns"])
        log.info(
            "lab host %d: VXLAN %s with address %s reaches %d other hosts",
            host["number"], DEVICE, transit_address(host["number"]), len(peers),
        )
