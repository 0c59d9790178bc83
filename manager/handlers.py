"""Command handlers: one method per lifecycle command.

Handlers run on worker threads, never on the broker's serving thread,
because they write bundles, call runc and wait for assistants. Commands
on one container run one at a time, in arrival order per worker.
"""

import logging
import os
import shutil
import time
import uuid

from assistant.cgroups import cgroup_dirs
from assistant.config import AssistantConfig, ContainerPaths
from assistant.logfile import read_lines, remove_logs
from assistant.runtime import Runc, RuncError
from assistant.supervisor import read_exit_record
from manager import bundle
from manager.network import ContainerNetwork, NetworkError
from manager.assistants import Assistants
from manager.broker import Broker, BrokerError, OrderUndeliverable
from manager.config import ManagerConfig
from manager.errors import CommandError, not_found
from manager.registry import PendingCreate, Registry
from manager.states import ACTIVE, IllegalTransition
from manager.store import ContainerRecord
from messages.models import (
    AssistantStatus,
    Command,
    ContainerInfo,
    ContainerState,
    ControlOrder,
    CreateSpec,
    MAX_LOG_LINES,
    MAX_LOG_REPLY_BYTES,
    ErrorCode,
    ErrorInfo,
    ExitInfo,
    ExitReason,
    LogLine,
    Reply,
    utc_now,
)

log = logging.getLogger(__name__)

CRASH_HOOK = "BERTH_CRASH_ON_CREATE"
"""Fault injection for tests: a create of the container id in this
environment variable ends the manager process at once, as a crash would."""

START_TIMEOUT = 30.0
"""Seconds a start waits for the assistant to report the workload running."""

ORDER_TIMEOUT = 10.0
"""Seconds an order waits for the assistant to name a control queue that exists."""

KILL_TIMEOUT = 10.0
"""Seconds to wait for an exit after SIGKILL before cleaning up by hand."""

STOP_MARGIN = 10.0
"""Seconds a stop waits beyond its grace period for the exit report."""

ASSISTANT_END_TIMEOUT = 5.0
"""Seconds a delete waits for the assistant to end after its exit report.
An assistant writes exit.json and runs ``runc delete`` after the report."""

ASSISTANT_END_POLL = 0.01
"""Seconds between checks whether an assistant has ended."""


class Handlers:
    def __init__(
        self,
        config: ManagerConfig,
        registry: Registry,
        assistants: Assistants,
        broker: Broker,
    ):
        self.config = config
        self.registry = registry
        self.assistants = assistants
        self.broker = broker
        self.runc = Runc(config.runc_binary, config.manager_runc_root)
        self.network = ContainerNetwork(config.manager_id, config.manager_dir, config.network_subnet)

    def handle(self, command: Command) -> Reply:
        """Run one command and return its reply; never raises."""
        name = command.command
        container_id = getattr(command, "id", None)
        try:
            if container_id is None or name == "stop":
                # stop takes the container's lock only to order the stop, so
                # that a kill or a forced delete need not wait out its grace.
                return getattr(self, f"do_{name}")(command)
            with self.registry.command_lock(container_id):
                return getattr(self, f"do_{name}")(command)
        except CommandError as exc:
            log.info("%s %s rejected: %s", name, container_id or "", exc.message)
            return self._error(command, exc.code, exc.message)
        except IllegalTransition as exc:
            return self._error(command, ErrorCode.CONFLICT, str(exc))
        except BrokerError as exc:
            log.error("%s %s failed: %s", name, container_id or "", exc)
            return self._error(command, ErrorCode.UNAVAILABLE, str(exc))
        except Exception:
            log.exception("%s %s failed unexpectedly (request %s)", name, container_id, command.request_id)
            return self._error(
                command, ErrorCode.INTERNAL, f"internal error in {name}; see the manager's log"
            )

    @staticmethod
    def _error(command: Command, code: ErrorCode, message: str) -> Reply:
        return Reply(
            request_id=command.request_id, ok=False, error=ErrorInfo(code=code, message=message)
        )

    def _ok(self, command: Command, container_id: str) -> Reply:
        record = self._require(container_id)
        return Reply(request_id=command.request_id, ok=True, container=record.info)

    def _require(self, container_id: str) -> ContainerRecord:
        record = self.registry.get(container_id)
        if record is None or record.info.state == ContainerState.DELETED:
            raise not_found(container_id)
        return record

    def paths(self, container_id: str) -> ContainerPaths:
        return ContainerPaths(self.config.containers_dir / container_id)

    # --- create and start -------------------------------------------------

    def do_create(self, command) -> Reply:
        self._create(command)
        return self._ok(command, command.id)

    def do_run(self, command) -> Reply:
        self._create(command)
        self._start(command.id)
        return self._ok(command, command.id)

    def do_start(self, command) -> Reply:
        self._start(command.id)
        return self._ok(command, command.id)

    def _create(self, spec: CreateSpec) -> None:
        container_id = spec.id
        if os.environ.get(CRASH_HOOK) == container_id:
            log.error("container %s: %s is set; exiting at once", container_id, CRASH_HOOK)
            os._exit(70)
        existing = self.registry.get(container_id)
        if existing is not None and existing.info.state != ContainerState.DELETED:
            raise CommandError(
                ErrorCode.CONFLICT,
                f"container {container_id!r} already exists in state"
                f" {existing.info.state.value}; delete it first or pick another id",
            )
        paths = self.paths(container_id)
        if paths.root.exists():
            shutil.rmtree(paths.root)  # left by a deleted container of the same id
        paths.root.mkdir(parents=True)
        try:
            bundle.write_bundle(
                paths.bundle,
                spec,
                bundle.cgroups_path(self.config.manager_id, container_id),
                init_binary=self.config.init_binary if spec.init else None,
            )
        except bundle.BundleError as exc:
            self._remove_dir(paths)
            raise CommandError(ErrorCode.INVALID_ARGUMENT, str(exc)) from None
        try:  # a failed attach removes what it made; later failures call network.detach
            attachment = self.network.attach(container_id, spec.network, paths.bundle / "config.json")
        except NetworkError as exc:
            self._remove_dir(paths)
            raise CommandError(ErrorCode.CREATE_FAILED, f"container {container_id!r}: {exc}") from None

        timeout = self.config.heartbeat_timeout if spec.heartbeat_timeout is None else spec.heartbeat_timeout
        token = uuid.uuid4().hex[:12]
        assistant_config = AssistantConfig(
            manager_id=self.config.manager_id,
            container_id=container_id,
            token=token,
            container_dir=paths.root,
            amqp_url=self.config.amqp_url,
            runc_binary=self.config.runc_binary,
            runc_root=self.config.manager_runc_root,
            heartbeat_interval=self.config.heartbeat_interval,
            heartbeat_timeout=timeout,
            init=spec.init,
            log_max_bytes=self.config.log_max_bytes,
            log_max_files=self.config.log_max_files,
            container_address=attachment.address,
            ports=spec.ports,
        )
        with self.registry.lock:
            self.registry.pending[container_id] = PendingCreate(token=token)
        try:
            assistant_pid = self.assistants.spawn(assistant_config)
            pending = self._wait_for_create(container_id, assistant_pid, paths)
        except BaseException:
            self._remove_dir(paths)
            self.network.detach(container_id)
            raise
        finally:
            with self.registry.lock:
                self.registry.pending.pop(container_id, None)

        if pending.status != AssistantStatus.CREATED:
            self._remove_dir(paths)
            self.network.detach(container_id)
            raise CommandError(
                ErrorCode.CREATE_FAILED,
                f"container {container_id!r} could not be created: "
                f"{pending.error or 'the assistant reported no error text'}",
            )
        info = ContainerInfo(
            id=container_id,
            manager_id=self.config.manager_id,
            state=ContainerState.CREATED,
            argv=spec.argv,
            labels=spec.labels,
            limits=spec.limits,
            heartbeat_timeout=timeout,
            created_at=utc_now(),
            assistant_pid=assistant_pid,
            pid=pending.pid,
            address=attachment.address,
            ports=spec.ports,
        )
        spec_only = CreateSpec.model_validate(spec.model_dump(include=set(CreateSpec.model_fields)))
        self.registry.add(ContainerRecord(info=info, spec=spec_only, assistant_token=token))

    def _wait_for_create(self, container_id: str, assistant_pid: int, paths: ContainerPaths) -> PendingCreate:
        """Wait for the assistant's first report: created or create_failed."""
        def reported(record, pending: PendingCreate | None) -> bool:
            return pending is not None and pending.status != AssistantStatus.CREATING

        deadline_step = 0.5
        waited = 0.0
        while waited < self.config.create_timeout:
            if self.registry.wait_for(container_id, reported, deadline_step):
                return self.registry.pending[container_id]
            waited += deadline_step
            if not self.assistants.is_alive(container_id, assistant_pid, paths.root):
                return PendingCreate(
                    token="",
                    status=AssistantStatus.CREATE_FAILED,
                    error=f"its assistant exited before reporting; log: {self._log_tail(paths)}",
                )
        self.assistants.kill(container_id, assistant_pid, paths.root)
        self.force_runc_cleanup(container_id)
        return PendingCreate(
            token="",
            status=AssistantStatus.CREATE_FAILED,
            error=f"its assistant did not report within {self.config.create_timeout:.0f} s",
        )

    def _start(self, container_id: str) -> None:
        record = self._require(container_id)
        if record.info.state != ContainerState.CREATED:
            raise CommandError(
                ErrorCode.CONFLICT,
                f"container {container_id!r} is {record.info.state.value}; only a"
                " created container can be started",
            )
        self.registry.transition(container_id, ContainerState.STARTING)
        try:
            self._send_order(container_id, ControlOrder(action="start"))
        except CommandError:
            self.registry.transition(
                container_id, ContainerState.CREATED, message="start order undeliverable"
            )
            raise
        started = self.registry.wait_for(
            container_id,
            lambda record, _: record.info.state not in (ContainerState.STARTING,),
            START_TIMEOUT,
        )
        if not started:
            raise CommandError(
                ErrorCode.UNAVAILABLE,
                f"container {container_id!r} did not report running within"
                f" {START_TIMEOUT:.0f} s; inspect it later",
            )

    def _send_order(self, container_id: str, order: ControlOrder) -> None:
        """Deliver an order to the container's assistant, or raise UNAVAILABLE.

        An assistant declares a new control queue at every reconnect and
        names it in its next heartbeat, so an order that finds no queue is
        sent again once a heartbeat brings a new name, for up to
        ORDER_TIMEOUT seconds.
        """
        self._require(container_id)
        deadline = time.monotonic() + ORDER_TIMEOUT
        with self.registry.lock:
            queue = self.registry.control_queues.get(container_id)
        while True:
            if queue is not None:
                try:
                    self.broker.call(lambda: self.broker.send_order(container_id, queue, order))
                    return
                except OrderUndeliverable as exc:
                    log.info("container %s: %s; waiting for its next heartbeat", container_id, exc)
            remaining = deadline - time.monotonic()
            renamed = remaining > 0 and self.registry.wait_for(
                container_id,
                lambda record, pending: self.registry.control_queues.get(container_id) != queue,
                remaining,
            )
            if not renamed:
                raise CommandError(
                    ErrorCode.UNAVAILABLE,
                    f"the assistant of container {container_id!r} is not connected to the"
                    f" broker: no control queue of it for {ORDER_TIMEOUT:.0f} s",
                )
            with self.registry.lock:
                queue = self.registry.control_queues.get(container_id)

    # --- stop, kill, delete -----------------------------------------------

    def do_stop(self, command) -> Reply:
        with self.registry.command_lock(command.id):
            record = self._require(command.id)
            state = record.info.state
            if state not in (ContainerState.RUNNING, ContainerState.STARTING, ContainerState.STOPPING):
                raise CommandError(
                    ErrorCode.CONFLICT,
                    f"container {command.id!r} is {state.value}, not running; nothing to stop",
                )
            with self.registry.lock:
                record.stop_grace = command.grace
                if state != ContainerState.STOPPING:
                    self.registry.transition(command.id, ContainerState.STOPPING)
                else:
                    self.registry.update(record)
            self._send_order(command.id, ControlOrder(action="stop", grace=command.grace))
        if not self._wait_exited(command.id, command.grace + STOP_MARGIN):
            raise CommandError(
                ErrorCode.UNAVAILABLE,
                f"container {command.id!r} did not report its exit within"
                f" {command.grace + STOP_MARGIN:.0f} s of the stop; inspect it later",
            )
        return self._ok(command, command.id)

    def do_kill(self, command) -> Reply:
        record = self._require(command.id)
        if record.info.state not in (
            ContainerState.CREATED,
            ContainerState.STARTING,
            ContainerState.RUNNING,
            ContainerState.STOPPING,
        ):
            raise CommandError(
                ErrorCode.CONFLICT,
                f"container {command.id!r} is {record.info.state.value}; only a"
                " created or running container can be signalled",
            )
        self._send_order(command.id, ControlOrder(action="kill", signal=command.signal))
        return self._ok(command, command.id)

    def do_delete(self, command) -> Reply:
        record = self.registry.get(command.id)
        if record is not None and record.info.state == ContainerState.DELETED:
            # Deleting twice succeeds, so a client may retry a delete freely.
            return Reply(request_id=command.request_id, ok=True, container=record.info)
        record = self._require(command.id)
        state = record.info.state
        if state in (ContainerState.STARTING, ContainerState.RUNNING, ContainerState.STOPPING) and not command.force:
            raise CommandError(
                ErrorCode.CONFLICT,
                f"container {command.id!r} is {state.value}; stop it first or delete"
                " with force",
            )
        if state in ACTIVE:
            self._end_workload(record)
        paths = self.paths(command.id)
        self._wait_assistant_ended(record, paths)
        self.force_runc_cleanup(command.id)
        self.network.detach(command.id)
        remove_logs(paths.container_log)
        self._remove_dir(paths)
        self.registry.transition(command.id, ContainerState.DELETED)
        self.remove_empty_cgroups()
        return Reply(request_id=command.request_id, ok=True, container=self.registry.get(command.id).info)

    def _end_workload(self, record: ContainerRecord) -> None:
        """Kill a workload through its assistant, or by hand if it is gone."""
        container_id = record.info.id
        try:
            self._send_order(container_id, ControlOrder(action="kill", signal="SIGKILL"))
            if self._wait_exited(container_id, KILL_TIMEOUT):
                return
        except CommandError as exc:
            log.warning("container %s: %s; cleaning up without it", container_id, exc.message)
        paths = self.paths(container_id)
        self.assistants.kill(container_id, record.info.assistant_pid, paths.root)
        self.force_runc_cleanup(container_id)
        self.record_lost_exit(container_id, "killed while its assistant did not answer")

    def _wait_assistant_ended(self, record: ContainerRecord, paths: ContainerPaths) -> None:
        """Wait until the assistant has ended, killing it after ASSISTANT_END_TIMEOUT.

        The delete must not remove the container directory or the runc
        state while the assistant still writes exit.json or runs
        ``runc delete``.
        """
        container_id = record.info.id
        pid = record.info.assistant_pid
        deadline = time.monotonic() + ASSISTANT_END_TIMEOUT
        while self.assistants.is_alive(container_id, pid, paths.root):
            if time.monotonic() >= deadline:
                log.warning(
                    "container %s: assistant %s still runs %.0f s after the exit; killing it",
                    container_id, pid, ASSISTANT_END_TIMEOUT,
                )
                self.assistants.kill(container_id, pid, paths.root)
                return
            time.sleep(ASSISTANT_END_POLL)

    def _wait_exited(self, container_id: str, timeout: float) -> bool:
        return self.registry.wait_for(
            container_id,
            lambda record, _: record.info.state == ContainerState.EXITED,
            timeout,
        )

    def record_lost_exit(self, container_id: str, message: str) -> None:
        """Record the exit of a container whose assistant died.

        The exit record on disk wins when the assistant wrote one before it
        died; otherwise the status is unknown, never 0.
        """
        with self.registry.lock:
            record = self.registry.get(container_id)
            if record is None or record.info.state not in ACTIVE:
                return
            exit = read_exit_record(self.paths(container_id).exit_record)
            if exit is None:
                exit = ExitInfo(exit_code=None, reason=ExitReason.ASSISTANT_LOST)
            self.registry.transition(container_id, ContainerState.EXITED, exit=exit, message=message)

    def force_runc_cleanup(self, container_id: str) -> None:
        """Kill every process of the container and remove its runc state."""
        if not (self.runc.root / container_id).exists():
            # runc keeps a container's state in <root>/<id>. The assistant
            # deletes it before it ends, and a delete waits for that end,
            # so this check saves starting runc once per delete.
            return
        try:
            if self.runc.state(container_id) is None:
                return
            self.runc.kill(container_id, "SIGKILL", all_processes=True)
        except RuncError as exc:
            log.info("container %s: runc kill: %s", container_id, exc.text)
        try:
            self.runc.delete(container_id)
        except RuncError as exc:
            log.warning("container %s: runc delete failed: %s", container_id, exc)

    def sweep_orphans(self) -> None:
        """Remove runc containers and directories that no known container owns.

        Runs once at start, before any command: what is left from a crash
        in the middle of a create, or from a lost state database.
        """
        active = {record.info.id for record in self.registry.active()}
        try:
            runc_ids = self.runc.list_ids()
        except RuncError as exc:
            log.error("cannot list runc containers under %s: %s", self.runc.root, exc)
            runc_ids = []
        for container_id in runc_ids:
            if container_id in active:
                continue
            log.warning("container %s: removing an orphan runc container", container_id)
            self.force_runc_cleanup(container_id)
            self.registry.announce(
                container_id,
                "orphan_removed",
                ContainerState.DELETED,
                "runc container unknown to the manager's state was killed and removed",
            )

        if not self.config.containers_dir.exists():
            return
        for directory in self.config.containers_dir.iterdir():
            record = self.registry.get(directory.name)
            if record is not None and record.info.state != ContainerState.DELETED:
                continue
            log.warning("removing orphan container directory %s", directory)
            self._remove_dir(ContainerPaths(directory))
        self.remove_empty_cgroups()

    def remove_empty_cgroups(self) -> None:
        """Remove this manager's parent cgroups once no container uses them.

        runc removes a container's own cgroups on delete, but not the
        /berth/<manager id> directories above them. The registry lock keeps
        a create from starting meanwhile: runc would fail to create its
        cgroup below a parent removed halfway.
        """
        with self.registry.lock:
            if self.registry.pending or self.registry.active():
                return
            # /berth itself stays: another manager on this host may be
            # creating a container below it right now.
            for directory in cgroup_dirs(f"/berth/{self.config.manager_id}"):
                try:
                    directory.rmdir()
                except OSError:
                    pass  # a container's cgroup is still below it

    def _remove_dir(self, paths: ContainerPaths) -> None:
        try:
            bundle.remove_bundle(paths.bundle)
        except OSError as exc:
            log.warning("cannot remove bundle %s: %s", paths.bundle, exc)
        shutil.rmtree(paths.root, ignore_errors=True)

    @staticmethod
    def _log_tail(paths: ContainerPaths, lines: int = 3) -> str:
        try:
            text = paths.assistant_log.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "(no log)"
        return " | ".join(text[-lines:]) or "(empty)"

    # --- queries ----------------------------------------------------------

    def do_list(self, command) -> Reply:
        with self.registry.lock:
            records = list(self.registry.records.values())
        containers = [
            record.info
            for record in sorted(records, key=lambda r: r.info.created_at)
            if (command.all or record.info.state != ContainerState.DELETED)
            and (command.state is None or record.info.state == command.state)
            and all(record.info.labels.get(k) == v for k, v in command.labels.items())
        ]
        return Reply(request_id=command.request_id, ok=True, containers=containers)

    def do_inspect(self, command) -> Reply:
        return self._ok(command, command.id)

    def do_logs(self, command) -> Reply:
        self._require(command.id)
        tail = MAX_LOG_LINES if command.tail is None else command.tail
        lines = read_lines(self.paths(command.id).container_log, tail=tail) if tail else []
        kept = newest_within(lines, MAX_LOG_REPLY_BYTES)
        return Reply(
            request_id=command.request_id,
            ok=True,
            container=self.registry.get(command.id).info,
            logs=kept,
            logs_omitted=len(lines) - len(kept),
        )


def newest_within(lines: list[dict], max_bytes: int) -> list[LogLine]:
    """Keep the newest log lines whose text fits in ``max_bytes``."""
    kept: list[LogLine] = []
    size = 0
    for line in reversed(lines):
        size += len(line["line"]) + 64  # 64: the record's other fields
        if size > max_bytes:
            break
        kept.append(LogLine.model_validate(line))
    kept.reverse()
    return kept

