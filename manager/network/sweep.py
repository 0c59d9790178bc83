"""Removal of everything one manager id created on the host's network.

For tests and the lab, which throw a manager away: the startup sweep in
ContainerNetwork.sweep keeps known containers, this removes all of them
and the bridge too.
"""

import logging

from pyroute2 import IPRoute, netns

from manager.network import names
from manager.network.attach import NETLINK_ERRORS, delete_link, remove_netns

log = logging.getLogger(__name__)


def remove_manager_network(manager_id: str) -> None:
    """Delete every namespace, veth and the bridge of a manager id in this namespace."""
    for namespace in netns.listnetns():
        container_id = names.container_of_netns(manager_id, namespace)
        if container_id is not None:
            remove_netns(namespace, container_id)
    prefix = names.veth_prefix(manager_id)
    bridge = names.bridge_name(manager_id)
    try:
        with IPRoute() as ipr:
            links = [link.get("IFLA_IFNAME") for link in ipr.get_links()]
    except NETLINK_ERRORS as exc:
        log.error("bridge %s: cannot list interfaces: %s", bridge, exc)
        return
    for ifname in links:
        if ifname and ifname.startswith(prefix):
            delete_link(ifname, f"manager {manager_id}")
    if bridge in links:
        delete_link(bridge, f"manager {manager_id}")
