"""Attach containers to the manager's bridge and detach them again.

Order of a bridge attach: allocate the address, create the named network
namespace, create the veth pair with its peer already inside the
namespace (named eth0), put the host end on the bridge, then configure
loopback, eth0, its address and the default route inside the namespace.
A failure at any step undoes the earlier ones before it is reported.
"""

import ipaddress
import json
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from pyroute2 import IPRoute, netns
from pyroute2.netlink.exceptions import NetlinkError

from manager.network import names
from manager.network.bridge import (
    BridgeError,
    bridge_subnet,
    ensure_bridge,
    ipv4_interfaces,
    parse_subnet,
    pick_subnet,
)
from manager.network.ipam import AddressPool, PoolExhausted
from manager.network.namespaces import create_namespace, run_in_namespace

log = logging.getLogger(__name__)

NETNS_DIR = Path(netns.NETNS_RUN_DIR)
CONTAINER_INTERFACE = "eth0"
NETLINK_ERRORS = (NetlinkError, OSError, BridgeError, PoolExhausted)


class NetworkError(RuntimeError):
    """A container's network could not be set up; nothing of it is left."""


@dataclass(frozen=True)
class Attachment:
    """The network of one container as its bundle and assistant need it."""

    mode: str
    address: str | None = None
    netns_path: str | None = None


class ContainerNetwork:
    """Networking of one manager's containers; thread-safe.

    ``subnet`` None lets the manager pick a free /24 (see bridge.py). The
    subnet chosen is stored with the allocations, so a restarted manager
    keeps it even when the bridge itself is gone.
    """

    def __init__(self, manager_id: str, manager_dir: Path, subnet: str | None = None):
        self.manager_id = manager_id
        self.bridge = names.bridge_name(manager_id)
        self.database = manager_dir / "network.db"
        self.requested_subnet = parse_subnet(subnet) if subnet else None
        self._lock = threading.Lock()
        self._pool: AddressPool | None = None
        self._gateway: ipaddress.IPv4Interface | None = None

    @property
    def pool(self) -> AddressPool:
        if self._pool is None:
            self._pool = AddressPool(self.database)
        return self._pool

    # --- attach -----------------------------------------------------------

    def attach(self, container_id: str, mode: str, config_path: Path) -> Attachment:
        """Set up the container's network and point its config.json at it.

        Raises NetworkError after removing whatever the attempt created.
        """
        if mode == "bridge":
            try:
                attachment = self._attach_bridge(container_id)
            except NETLINK_ERRORS as exc:
                log.error(
                    "container %s: bridge %s: network setup failed: %s",
                    container_id, self.bridge, exc,
                )
                self.detach(container_id)
                raise NetworkError(
                    f"network setup on bridge {self.bridge} failed: {exc}"
                ) from exc
        else:
            attachment = Attachment(mode=mode)
        set_network_namespace(config_path, attachment)
        return attachment

    def _attach_bridge(self, container_id: str) -> Attachment:
        namespace = names.netns_name(self.manager_id, container_id)
        veth = names.veth_name(self.manager_id, container_id)
        # One host netlink socket for every step outside the namespace.
        with IPRoute() as ipr:
            gateway = self._ensure_bridge(ipr)
            if (NETNS_DIR / namespace).exists() or ipr.link_lookup(ifname=veth):
                log.warning(
                    "container %s: removing leftover namespace %s and veth %s",
                    container_id, namespace, veth,
                )
                self._remove_interfaces(container_id)

            address = self.pool.allocate(container_id, gateway.network, self._unrecorded_addresses)
            create_namespace(namespace)
            ipr.link(
                "add",
                ifname=veth,
                kind="veth",
                peer={"ifname": CONTAINER_INTERFACE, "net_ns_fd": namespace},
            )
            bridge_index = ipr.link_lookup(ifname=self.bridge)[0]
            veth_index = ipr.link_lookup(ifname=veth)[0]
            ipr.link("set", index=veth_index, master=bridge_index, state="up")

        def configure_inside() -> None:
            with IPRoute() as inside:
                inside.link("set", index=inside.link_lookup(ifname="lo")[0], state="up")
                eth0 = inside.link_lookup(ifname=CONTAINER_INTERFACE)[0]
                inside.addr("add", index=eth0, address=str(address), prefixlen=gateway.network.prefixlen)
                inside.link("set", index=eth0, state="up")
                inside.route("add", dst="0.0.0.0/0", gateway=str(gateway.ip))

        run_in_namespace(namespace, configure_inside)
        log.info(
            "container %s: interface %s in namespace %s has address %s/%d, veth %s on bridge %s",
            container_id, CONTAINER_INTERFACE, namespace, address,
            gateway.network.prefixlen, veth, self.bridge,
        )
        return Attachment(mode="bridge", address=str(address), netns_path=str(NETNS_DIR / namespace))

    def _ensure_bridge(self, ipr: IPRoute) -> ipaddress.IPv4Interface:
        with self._lock:
            subnet = self._subnet(ipr)
            self._gateway = ensure_bridge(ipr, self.bridge, subnet)
            return self._gateway

    def _subnet(self, ipr: IPRoute) -> ipaddress.IPv4Network:
        """Choose the subnet: configured, else the bridge's, else stored, else a free one."""
        subnet = self.requested_subnet or bridge_subnet(ipr, self.bridge)
        if subnet is None:
            stored = self.pool.setting("subnet")
            subnet = ipaddress.IPv4Network(stored) if stored else pick_subnet(ipr, self.manager_id)
        if self.pool.setting("subnet") != str(subnet):
            self.pool.set_setting("subnet", str(subnet))
        return subnet

    def _unrecorded_addresses(self, recorded: set[str]) -> set[ipaddress.IPv4Address]:
        """Read the addresses configured in this manager's namespaces that have no allocation.

        Those are namespaces left by a manager whose allocation database
        was lost; their addresses must not be handed out again.
        """
        found = set()
        for namespace in netns.listnetns():
            container_id = names.container_of_netns(self.manager_id, namespace)
            if container_id is None or container_id in recorded:
                continue
            try:
                addresses = run_in_namespace(namespace, read_namespace_addresses)
            except NETLINK_ERRORS as exc:
                log.warning(
                    "container %s: cannot read the addresses in namespace %s: %s",
                    container_id, namespace, exc,
                )
                continue
            for interface in addresses:
                if not interface.ip.is_loopback:
                    log.info(
                        "container %s: address %s in namespace %s has no allocation; skipping it",
                        container_id, interface.ip, namespace,
                    )
                    found.add(interface.ip)
        return found

    # --- detach -----------------------------------------------------------

    def detach(self, container_id: str) -> None:
        """Remove the container's veth and namespace and release its address.

        It runs on cleanup paths, so it logs failures instead of raising them.
        """
        try:
            self._remove_interfaces(container_id)
            released = self.pool.release(container_id)
        except Exception:
            log.exception("container %s: network cleanup on bridge %s failed", container_id, self.bridge)
            return
        if released is not None:
            log.info("container %s: address %s on bridge %s released", container_id, released, self.bridge)

    def _remove_interfaces(self, container_id: str) -> None:
        veth = names.veth_name(self.manager_id, container_id)
        namespace = names.netns_name(self.manager_id, container_id)
        delete_link(veth, f"container {container_id}")
        remove_netns(namespace, container_id)

    # --- startup sweep ----------------------------------------------------

    def sweep(self, known_container_ids: set[str]) -> None:
        """Remove veths, namespaces and allocations of containers not in ``known_container_ids``.

        Meant for manager start, before any command runs: a crash in the
        middle of a create or a lost state database leaves these behind.
        """
        for namespace in netns.listnetns():
            container_id = names.container_of_netns(self.manager_id, namespace)
            if container_id is None or container_id in known_container_ids:
                continue
            log.warning("container %s: removing orphan namespace %s", container_id, namespace)
            remove_netns(namespace, container_id)

        known_veths = {names.veth_name(self.manager_id, cid): cid for cid in known_container_ids}
        prefix = names.veth_prefix(self.manager_id)
        try:
            with IPRoute() as ipr:
                links = [link.get("IFLA_IFNAME") for link in ipr.get_links()]
        except NETLINK_ERRORS as exc:
            log.error("bridge %s: cannot list interfaces for the sweep: %s", self.bridge, exc)
            links = []
        for ifname in links:
            if ifname and ifname.startswith(prefix) and ifname not in known_veths:
                log.warning("bridge %s: removing orphan veth %s", self.bridge, ifname)
                delete_link(ifname, f"bridge {self.bridge}")

        if not self.database.exists():
            return
        for container_id, address in self.pool.allocations().items():
            if container_id not in known_container_ids:
                log.warning(
                    "container %s: releasing orphan address %s on bridge %s",
                    container_id, address, self.bridge,
                )
                self.pool.release(container_id)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()


def read_namespace_addresses() -> list[ipaddress.IPv4Interface]:
    """Return the IPv4 addresses of the calling thread's network namespace."""
    with IPRoute() as inside:
        return ipv4_interfaces(inside)


def delete_link(ifname: str, owner: str) -> None:
    """Delete an interface if it exists (a veth with its peer); log failures.

    ``owner`` names what the interface belongs to in the log, such as
    "container web".
    """
    try:
        with IPRoute() as ipr:
            indexes = ipr.link_lookup(ifname=ifname)
            if indexes:
                ipr.link("del", index=indexes[0])
                log.info("%s: interface %s deleted", owner, ifname)
    except NETLINK_ERRORS as exc:
        log.error("%s: cannot delete interface %s: %s", owner, ifname, exc)


def remove_netns(namespace: str, container_id: str) -> None:
    """Unmount and remove a named namespace, if it exists; log failures."""
    if not (NETNS_DIR / namespace).exists():
        return
    try:
        netns.remove(namespace)
        log.info("container %s: namespace %s removed", container_id, namespace)
    except OSError as exc:
        log.error("container %s: cannot remove namespace %s: %s", container_id, namespace, exc)


def set_network_namespace(config_path: Path, attachment: Attachment) -> None:
    """Rewrite ``linux.namespaces`` of a bundle's config.json for the network mode.

    none: a new namespace that runc creates, with loopback only. bridge:
    the namespace prepared here, joined by path. host: no entry, so the
    container shares the network namespace of the manager.
    """
    config = json.loads(config_path.read_text())
    namespaces = [
        entry for entry in config["linux"]["namespaces"] if entry.get("type") != "network"
    ]
    if attachment.mode == "none":
        namespaces.append({"type": "network"})
    elif attachment.mode == "bridge":
        namespaces.append({"type": "network", "path": attachment.netns_path})
    config["linux"]["namespaces"] = namespaces
    partial = config_path.with_name(config_path.name + ".partial")
    partial.write_text(json.dumps(config, indent=2) + "\n")
    os.replace(partial, config_path)
