"""The settings the manager writes for an assistant, and a container's file paths."""

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from messages.models import PortMapping

CONFIG_NAME = "assistant.json"


class AssistantConfig(BaseModel):
    """Written by the manager into the container directory before spawning."""

    model_config = ConfigDict(extra="forbid")

    manager_id: str
    container_id: str
    token: str = Field(description="this assistant's id, new for every assistant started")
    container_dir: Path
    amqp_url: str
    runc_binary: str = "runc"
    runc_root: Path
    heartbeat_interval: float = Field(gt=0, description="seconds between heartbeats")
    heartbeat_timeout: float = Field(
        ge=0,
        description="seconds without a reply before the workload is killed; 0: never",
    )
    init: bool = Field(
        default=False,
        description="the workload runs under an init that turns a death by"
        " signal N into exit status 128 + N",
    )
    exit_report_timeout: float = Field(
        default=3600.0,
        gt=0,
        description="seconds to keep resending an exit nobody acknowledges;"
        " the record stays in exit.json for the manager to read later",
    )
    log_max_bytes: int = Field(default=10 * 1024 * 1024, gt=0)
    log_max_files: int = Field(default=3, ge=1)
    container_address: str | None = Field(
        default=None, description="the container's address on the bridge; published ports connect to it"
    )
    ports: list[PortMapping] = Field(default_factory=list)

    def reconnect_cap(self) -> float:
        """Longest wait between reconnect attempts.

        It stays well below the heartbeat timeout, so a manager or broker
        that comes back inside the timeout is seen before the workload is
        killed.
        """
        if self.heartbeat_timeout == 0:
            return 10.0
        return max(0.2, min(10.0, self.heartbeat_timeout / 4))


class ContainerPaths:
    """The files of one container directory, shared by manager and assistant."""

    def __init__(self, root: Path):
        self.root = root
        self.bundle = root / "bundle"
        self.config = root / CONFIG_NAME
        self.assistant_log = root / "assistant.log"
        self.runc_log = root / "runc.log"
        self.container_log = root / "container.log"
        self.init_pid = root / "init.pid"
        self.exit_record = root / "exit.json"
