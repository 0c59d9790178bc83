"""Container networking on a per-manager Linux bridge, done through pyroute2.

Each manager owns one bridge. A container in network mode "bridge" gets a
named network namespace that runc joins by path. A veth pair connects the
bridge with eth0 inside that namespace, which gets an IPv4 address from
the manager's subnet and the bridge's address as default gateway.
"""

from manager.network.attach import Attachment, ContainerNetwork, NetworkError
from manager.network.sweep import remove_manager_network

__all__ = ["Attachment", "ContainerNetwork", "NetworkError", "remove_manager_network"]
