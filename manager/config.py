"""Settings of one manager process."""

import socket
from dataclasses import dataclass, field
from pathlib import Path

from manager.network.bridge import parse_subnet
from messages.names import ID_PATTERN, ID_RULE


@dataclass(frozen=True)
class ManagerConfig:
    amqp_url: str
    manager_id: str = field(default_factory=lambda: socket.gethostname().split(".")[0])
    state_dir: Path = Path("/var/lib/berth")
    runc_binary: str = "runc"
    runc_root: Path = Path("/run/berth/runc")

    init_binary: str = "/usr/bin/tini-static"
    """Init run as the container's pid 1 unless a create sets init false;
    statically linked, so it runs in any root filesystem."""

    heartbeat_interval: float = 1.0
    """Seconds between an assistant's heartbeats."""

    heartbeat_timeout: float = 30.0
    """Default seconds an assistant waits for a reply before killing its
    workload. Long enough to ride out a manager restart, short enough that
    a dead host's workloads end within a minute."""

    adopt_window: float = 5.0
    """Seconds after start during which an unknown container id gets
    retry_later instead of nack. Keep it below the heartbeat timeout."""

    lost_after: float = 5.0
    """Seconds without a heartbeat after which a container becomes lost."""

    spawn_mode: str = "fork"
    """The way assistants start: "fork" from the fork server that imported
    their code once (fast, small), or "exec" as a new interpreter each."""

    workers: int = 8
    """Threads running slow command work (bundles, runc, waiting)."""

    prefetch: int = 16
    """Unacknowledged commands the broker may hand this manager at once."""

    create_timeout: float = 60.0
    """Seconds a create waits for its assistant to report the runc result."""

    log_max_bytes: int = 10 * 1024 * 1024
    log_max_files: int = 3

    network_subnet: str | None = None
    """IPv4 subnet of the manager's container bridge, e.g. 10.213.7.0/24; the
    bridge takes its first address. None: a free /24 of 10.213.0.0/16."""

    def __post_init__(self) -> None:
        if not ID_PATTERN.fullmatch(self.manager_id):
            raise ValueError(
                f"invalid manager id {self.manager_id!r}: use {ID_RULE}"
                " (set it with --id)"
            )
        if self.spawn_mode not in ("fork", "exec"):
            raise ValueError(f"invalid spawn mode {self.spawn_mode!r}: use fork or exec")
        if self.heartbeat_interval <= 0:
            raise ValueError(
                f"invalid heartbeat interval {self.heartbeat_interval!r}: use seconds > 0"
            )
        if self.network_subnet is not None:
            parse_subnet(self.network_subnet)  # raises ValueError naming the value

    @property
    def manager_dir(self) -> Path:
        return self.state_dir / self.manager_id

    @property
    def containers_dir(self) -> Path:
        return self.manager_dir / "containers"

    @property
    def database(self) -> Path:
        return self.manager_dir / "state.db"

    @property
    def manager_runc_root(self) -> Path:
        """runc's state directory for this manager's containers only."""
        return self.runc_root / self.manager_id
