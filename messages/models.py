"""Wire models of every message berth sends, validated with pydantic v2.

These classes are the single source of the protocol: docs/protocol.md
describes them and messages/schema.json is generated from them. Every
message is a JSON object carrying ``schema_version``; a party rejects a
version it does not speak with the ``unsupported_version`` error.
"""

import enum
import json
import signal
import uuid
from datetime import datetime, timezone
from typing import Annotated, Literal, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from messages.names import ID_PATTERN, ID_RULE

SCHEMA_VERSION = 1

MAX_MESSAGE_BYTES = 1024 * 1024
"""Largest command body a manager accepts; larger ones are rejected before parsing."""

MAX_LOG_LINES = 10_000
"""Maximum log lines in one ``logs`` reply."""

MAX_LOG_REPLY_BYTES = 8 * 1024 * 1024
"""Maximum bytes of log text in one ``logs`` reply; older lines are left out first."""


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def new_id() -> str:
    return uuid.uuid4().hex


class Model(BaseModel):
    # Unknown fields are errors: a misspelt option must not be ignored.
    model_config = ConfigDict(extra="forbid")


ContainerId = Annotated[str, Field(pattern=ID_PATTERN.pattern, description=ID_RULE)]


class ContainerState(str, enum.Enum):
    CREATED = "created"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    EXITED = "exited"
    LOST = "lost"
    DELETED = "deleted"


class ExitReason(str, enum.Enum):
    """Cause of a workload's end."""

    EXITED = "exited"  # it ended by itself
    STOPPED = "stopped"  # a stop command ended it
    KILLED = "killed"  # a kill or a forced delete ended it
    OOM = "oom"  # the kernel's OOM killer ended it
    MANAGER_NACK = "manager_nack"  # the manager did not know the container
    MANAGER_UNREACHABLE = "manager_unreachable"  # no heartbeat reply in time
    ASSISTANT_LOST = "assistant_lost"  # its assistant died, status unknown


class ErrorCode(str, enum.Enum):
    BAD_REQUEST = "bad_request"  # not JSON, unknown command, too large
    INVALID_ARGUMENT = "invalid_argument"  # a field has a wrong type or value
    UNSUPPORTED_VERSION = "unsupported_version"
    NOT_FOUND = "not_found"
    CONFLICT = "conflict"  # illegal in the container's current state
    CREATE_FAILED = "create_failed"  # the OCI runtime rejected the container
    UNAVAILABLE = "unavailable"  # the assistant or the broker could not be reached in time
    INTERNAL = "internal"


def signal_name(value: str | int) -> str:
    """Normalize ``9``, ``"9"``, ``"KILL"`` or ``"SIGKILL"`` to ``"SIGKILL"``."""
    text = str(value).strip().upper()
    try:
        if text.isdigit():
            return signal.Signals(int(text)).name
        if not text.startswith("SIG"):
            text = "SIG" + text
        return signal.Signals[text].name
    except (KeyError, ValueError):
        raise ValueError(
            f"unknown signal {value!r}: use a name such as SIGTERM or a number"
        ) from None


# --- commands (client -> manager) -----------------------------------------


class CommandBase(Model):
    schema_version: Literal[1] = SCHEMA_VERSION
    request_id: str = Field(default_factory=new_id, min_length=1, max_length=128)


INT64_MAX = 2**63 - 1
"""Largest limit runc accepts: it reads the limits of config.json as int64."""


class Limits(Model):
    memory_bytes: int | None = Field(
        default=None,
        ge=4 * 1024 * 1024,
        le=INT64_MAX,
        strict=True,
        description="memory limit in bytes, at least 4 MiB",
    )
    cpus: float | None = Field(
        default=None, gt=0, le=1024, description="CPU time as a number of cores"
    )
    pids: int | None = Field(
        default=None, ge=1, le=INT64_MAX, strict=True, description="maximum number of processes"
    )


class PortMapping(Model):
    """A TCP port of the container published on the manager's host loopback."""

    host_port: int = Field(ge=1, le=65535, description="port on 127.0.0.1 of the manager's host")
    container_port: int = Field(ge=1, le=65535, description="port on the container's address")
    protocol: Literal["tcp"] = "tcp"


NetworkMode = Literal["none", "bridge", "host"]


class CreateSpec(Model):
    id: ContainerId
    argv: list[str] = Field(min_length=1, description="program and arguments")
    env: dict[str, str] = Field(default_factory=dict)
    cwd: str = Field(default="/", pattern=r"^/")
    rootfs: str | None = Field(
        default=None,
        pattern=r"^/",
        description="absolute path of a root directory on the manager's host;"
        " by default a read-only root made of the host's /usr, /bin, /lib, /sbin",
    )
    hostname: str | None = Field(
        default=None,
        max_length=63,
        pattern=r"^[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?)*$",
        description="dot-separated labels of letters, digits and inner '-'",
    )
    limits: Limits = Field(default_factory=Limits)
    labels: dict[str, str] = Field(default_factory=dict)
    init: bool = Field(
        default=True,
        description="run the workload under a small init (tini) that forwards"
        " signals and reaps zombies; exits by signal N then read as 128 + N",
    )
    heartbeat_timeout: float | None = Field(
        default=None,
        ge=0,
        le=365 * 24 * 3600,
        allow_inf_nan=False,
        description="seconds without a heartbeat reply after which the"
        " assistant kills the workload; 0 means never; null: manager default",
    )
    network: NetworkMode = Field(
        default="bridge",
        description="bridge: own namespace with an address on the manager's bridge;"
        " none: own namespace with loopback only; host: the manager's host network",
    )
    ports: list[PortMapping] = Field(
        default_factory=list, description="ports published on 127.0.0.1; network bridge only"
    )

    @model_validator(mode="after")
    def _check_ports(self) -> "CreateSpec":
        if self.ports and self.network != "bridge":
            raise ValueError(
                f"ports need network bridge, not {self.network}: a container without"
                " an address of its own cannot have ports published"
            )
        host_ports = [mapping.host_port for mapping in self.ports]
        duplicates = sorted({port for port in host_ports if host_ports.count(port) > 1})
        if duplicates:
            raise ValueError(f"host_port {duplicates[0]} is published twice; use each host port once")
        return self


class CreateCommand(CommandBase, CreateSpec):
    command: Literal["create"]


class RunCommand(CommandBase, CreateSpec):
    """Create and start in one command."""

    command: Literal["run"]


class StartCommand(CommandBase):
    command: Literal["start"]
    id: ContainerId


class StopCommand(CommandBase):
    command: Literal["stop"]
    id: ContainerId
    grace: float = Field(
        default=10.0, ge=0, le=3600, description="seconds between SIGTERM and SIGKILL"
    )


class KillCommand(CommandBase):
    command: Literal["kill"]
    id: ContainerId
    signal: str | int = Field(default="SIGKILL", description="a name such as SIGTERM or a number")

    @field_validator("signal", mode="before")
    @classmethod
    def _normalize_signal(cls, value: str | int) -> str:
        return signal_name(value)


class DeleteCommand(CommandBase):
    command: Literal["delete"]
    id: ContainerId
    force: bool = False


class ListCommand(CommandBase):
    command: Literal["list"]
    state: ContainerState | None = None
    labels: dict[str, str] = Field(
        default_factory=dict, description="keep containers carrying all of these"
    )
    all: bool = Field(default=False, description="include deleted containers")


class InspectCommand(CommandBase):
    command: Literal["inspect"]
    id: ContainerId


class LogsCommand(CommandBase):
    command: Literal["logs"]
    id: ContainerId
    tail: int | None = Field(default=None, ge=0, le=MAX_LOG_LINES)


Command = Annotated[
    Union[
        CreateCommand,
        RunCommand,
        StartCommand,
        StopCommand,
        KillCommand,
        DeleteCommand,
        ListCommand,
        InspectCommand,
        LogsCommand,
    ],
    Field(discriminator="command"),
]
COMMAND_NAMES = (
    "create run start stop kill delete list inspect logs".split()
)
command_adapter: TypeAdapter[Command] = TypeAdapter(Command)


# --- replies (manager -> client) -------------------------------------------


class ExitInfo(Model):
    exit_code: int | None = Field(
        description="the workload's status, 128 + N when signal N ended it;"
        " null when it could not be collected"
    )
    signal: str | None = None
    oom_killed: bool = False
    reason: ExitReason
    finished_at: datetime = Field(default_factory=utc_now)


class ContainerInfo(Model):
    id: str
    manager_id: str
    state: ContainerState
    argv: list[str]
    labels: dict[str, str] = Field(default_factory=dict)
    limits: Limits = Field(default_factory=Limits)
    heartbeat_timeout: float
    created_at: datetime
    started_at: datetime | None = None
    assistant_pid: int | None = None
    pid: int | None = Field(default=None, description="workload pid on the host")
    exit: ExitInfo | None = None
    last_heartbeat_at: datetime | None = None
    address: str | None = Field(
        default=None, description="IPv4 address on the manager's bridge; null without network bridge"
    )
    ports: list[PortMapping] = Field(default_factory=list)


class LogLine(Model):
    stream: Literal["stdout", "stderr"]
    time: datetime
    line: str


class ErrorInfo(Model):
    code: ErrorCode
    message: str


class Reply(Model):
    schema_version: Literal[1] = SCHEMA_VERSION
    request_id: str | None = Field(
        default=None, description="the command's request id; null when unreadable"
    )
    ok: bool
    error: ErrorInfo | None = None
    container: ContainerInfo | None = None
    containers: list[ContainerInfo] | None = None
    logs: list[LogLine] | None = None
    logs_omitted: int | None = Field(
        default=None,
        description="older log lines of the requested tail left out, because the"
        " reply would have exceeded its size limit; ask for a smaller tail",
    )


# --- events (manager -> subscribers) ---------------------------------------


class Event(Model):
    schema_version: Literal[1] = SCHEMA_VERSION
    event_id: str = Field(default_factory=new_id)
    manager_id: str
    container_id: str
    sequence: int = Field(ge=1, description="per container, from 1, no gaps")
    event: str = Field(description="created, starting, running, ...: the routing key's last word")
    state: ContainerState
    time: datetime = Field(default_factory=utc_now)
    exit: ExitInfo | None = None
    message: str | None = None


# --- heartbeats (assistant <-> manager) ------------------------------------


class AssistantStatus(str, enum.Enum):
    CREATING = "creating"  # runc create has not returned yet
    CREATED = "created"
    CREATE_FAILED = "create_failed"
    RUNNING = "running"
    EXITED = "exited"


class Heartbeat(Model):
    """Sent by an assistant every interval, and at once when its status changes."""

    schema_version: Literal[1] = SCHEMA_VERSION
    container_id: str
    assistant_pid: int
    token: str = Field(description="the assistant's id, new for every assistant started")
    control_queue: str | None = Field(
        default=None,
        description="the broker-named queue this assistant takes orders from;"
        " new at every reconnect",
    )
    status: AssistantStatus
    pid: int | None = None
    exit: ExitInfo | None = None
    error: str | None = Field(default=None, description="runc's error text")
    sent_at: datetime = Field(default_factory=utc_now)


class Verdict(str, enum.Enum):
    ACK = "ack"  # keep going
    NACK = "nack"  # the manager does not know this container: kill and exit
    STOP = "stop"  # SIGTERM, then SIGKILL after the grace period
    RETRY_LATER = "retry_later"  # a restarted manager does not know the id yet


class HeartbeatReply(Model):
    schema_version: Literal[1] = SCHEMA_VERSION
    verdict: Verdict
    epoch: int = Field(
        default=0,
        ge=0,
        description="the manager run that sent it; assistants ignore nack and"
        " stop from a run older than one they heard from",
    )
    grace: float | None = None
    exit_recorded: bool = Field(
        default=False, description="the manager stored the exit it was sent"
    )


class ControlOrder(Model):
    """Sent by the manager to one assistant's control queue."""

    schema_version: Literal[1] = SCHEMA_VERSION
    action: Literal["start", "stop", "kill"]
    grace: float | None = None
    signal: str | None = None


# --- decoding --------------------------------------------------------------


class BadMessage(ValueError):
    """A message body that cannot be accepted; ``code`` is its error code."""

    def __init__(self, code: ErrorCode, message: str, request_id: str | None = None):
        super().__init__(message)
        self.code = code
        self.request_id = request_id


def parse_command(body: bytes) -> Command:
    """Decode and validate one command body, raising BadMessage on any fault."""
    if len(body) > MAX_MESSAGE_BYTES:
        raise BadMessage(
            ErrorCode.BAD_REQUEST,
            f"message of {len(body)} bytes exceeds the limit of"
            f" {MAX_MESSAGE_BYTES} bytes; send a smaller command",
        )
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadMessage(ErrorCode.BAD_REQUEST, f"message is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise BadMessage(
            ErrorCode.BAD_REQUEST,
            f"message must be a JSON object, got {type(data).__name__}",
        )

    request_id = data.get("request_id")
    request_id = request_id if isinstance(request_id, str) else None
    version = data.get("schema_version", SCHEMA_VERSION)
    if version != SCHEMA_VERSION:
        raise BadMessage(
            ErrorCode.UNSUPPORTED_VERSION,
            f"schema_version {version!r} is not supported; this manager speaks"
            f" version {SCHEMA_VERSION}",
            request_id,
        )
    name = data.get("command")
    if name not in COMMAND_NAMES:
        raise BadMessage(
            ErrorCode.BAD_REQUEST,
            f"unknown command {name!r}; expected one of: {', '.join(COMMAND_NAMES)}",
            request_id,
        )

    try:
        return command_adapter.validate_python(data)
    except ValidationError as exc:
        raise BadMessage(
            ErrorCode.INVALID_ARGUMENT, describe_validation_error(exc), request_id
        ) from None


def describe_validation_error(exc: ValidationError) -> str:
    """Render pydantic errors as one line naming each field and value."""
    parts = []
    for error in exc.errors():
        # The first location item of a union is the discriminator tag.
        location = ".".join(str(item) for item in error["loc"][1:]) or "message"
        value = error.get("input")
        parts.append(f"{location}={value!r}: {error['msg']}")
    return "; ".join(parts)
