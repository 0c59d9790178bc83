"""The assistant's life: create, start, watch, report and end one workload.

Threads and what they may touch:

- the main thread owns the pika connection and channel; it sends
  heartbeats, reads replies and control orders, and is the only caller of
  pika;
- the watcher thread waits for the container's init, reaps orphans,
  hands the exit to the main thread through ``_exits``, and then writes
  exit.json and removes the runc state;
- two drain threads copy the workload's stdout and stderr into the log.

Signals go to the init through a pidfd, from the main thread and from
stop timers. runc is called from the main thread, from stop timers and
from the watcher; the shared ``children_lock`` in assistant.runtime keeps
those calls apart from the reaper.
"""

import json
import logging
import os
import queue
import signal
import threading
import time
from pathlib import Path

import pika
import pika.exceptions
from tenacity import (
    Retrying,
    retry_if_exception,
    stop_after_delay,
    wait_exponential_jitter,
)

from assistant.cgroups import oom_kill_count
from assistant.config import AssistantConfig, ContainerPaths
from assistant.logfile import RotatingLog, drain
from assistant.ports import PortForwarders
from assistant.reaper import InitWatcher, become_subreaper, decode_status
from assistant.runtime import RUNC_TIMEOUT, Runc, RuncError
from messages import names
from messages.brokers import connection_parameters, retryable_broker_error
from messages.models import (
    AssistantStatus,
    ControlOrder,
    ExitInfo,
    ExitReason,
    Heartbeat,
    HeartbeatReply,
    Verdict,
    signal_name as normalize_signal_name,
)

log = logging.getLogger(__name__)

LOOP_TICK = 0.05
"""Seconds the main loop pauses before another reconnect attempt."""

MAX_WAIT = 1.0
"""Maximum seconds the main loop waits in pika. It wakes earlier for a
delivery, an exit from the watcher, the next heartbeat or the heartbeat
timeout. So an idle assistant wakes about once per heartbeat."""

CLEANUP_TIMEOUT = 2 * RUNC_TIMEOUT
"""Maximum seconds the assistant waits at its end for the watcher to write
exit.json and run ``runc delete``."""


class AssistantExit(Exception):
    """The assistant cannot continue; the message names the cause."""


class Supervisor:
    def __init__(self, config: AssistantConfig):
        self.config = config
        self.id = config.container_id
        self.paths = ContainerPaths(config.container_dir)
        self.runc = Runc(config.runc_binary, config.runc_root, self.paths.runc_log)
        self.heartbeat_queue = names.heartbeat_queue(config.manager_id)

        self.status = AssistantStatus.CREATING
        self.pid: int | None = None
        self.error: str | None = None
        self.exit: ExitInfo | None = None
        self.ending_reason: ExitReason | None = None
        self.exit_recorded = False
        self.nacked = False
        self.exited_at: float | None = None

        self.last_reply = time.monotonic()
        self.control_queue: str | None = None
        self.epoch = 0
        """Newest manager epoch seen in a heartbeat reply."""
        self.connection: pika.BlockingConnection | None = None
        self.channel = None
        self._exits: queue.SimpleQueue[ExitInfo] = queue.SimpleQueue()
        self._stop_timer: threading.Timer | None = None
        self._stop_deadline = 0.0
        self._threads: list[threading.Thread] = []
        self._terminate_requested = False
        self._init_pidfd: int | None = None
        self._own_pid_namespace = False
        """Whether killing the init kills every process of the container."""
        self._pidfd_lock = threading.Lock()
        self._cleanup_done = threading.Event()
        """Set once the watcher has written exit.json and removed the runc state."""
        self.ports = PortForwarders(self.id, config.container_address, config.ports)

    # --- lifecycle --------------------------------------------------------

    def run(self) -> int:
        log.info("assistant %d starting for container %s", os.getpid(), self.id)
        # Any of these stops the workload with a grace period and reports
        # the exit, so no signal to the assistant leaves a workload behind.
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, self._on_terminate_signal)
        become_subreaper()
        self.connect(budget=max(self.config.heartbeat_timeout, 10.0))
        self.create_workload()
        self.send_heartbeat()

        next_beat = time.monotonic() + self.config.heartbeat_interval
        while not self._finished():
            self._pump(until=min(next_beat, self._timeout_deadline()))
            self._collect_exits()
            now = time.monotonic()
            if self._terminate_requested and self.is_alive():
                self._terminate_requested = False
                self.stop_workload(grace=10.0)
            if now >= next_beat:
                self.send_heartbeat()
                next_beat = now + self.config.heartbeat_interval
            self._check_timeout(now)

        self._shutdown()
        log.info("assistant %d for container %s stops", os.getpid(), self.id)
        return 0

    def _finished(self) -> bool:
        if self.status not in (AssistantStatus.EXITED, AssistantStatus.CREATE_FAILED):
            return False
        if self.exit_recorded or self.nacked:
            return True
        waited = time.monotonic() - (self.exited_at or time.monotonic())
        if waited > self.config.exit_report_timeout:
            log.error(
                "container %s: no manager acknowledged its exit within %.0f s;"
                " the record stays in %s",
                self.id,
                self.config.exit_report_timeout,
                self.paths.exit_record,
            )
            return True
        return False

    def is_alive(self) -> bool:
        return self.status in (AssistantStatus.CREATED, AssistantStatus.RUNNING)

    def _on_terminate_signal(self, signum, frame) -> None:
        # Only a flag: pika's wake-up takes locks that the interrupted main
        # thread may hold. The main loop acts on it within MAX_WAIT.
        self._terminate_requested = True

    def _shutdown(self) -> None:
        if self._stop_timer is not None:
            self._stop_timer.cancel()
        self._wait_for_cleanup()
        with self._pidfd_lock:
            if self._init_pidfd is not None:
                os.close(self._init_pidfd)
                self._init_pidfd = None
        for thread in self._threads:
            thread.join(timeout=2.0)
        if self.connection is not None and self.connection.is_open:
            try:
                self.connection.close()
            except pika.exceptions.AMQPError as exc:
                log.debug("closing the connection of %s failed: %s", self.id, exc)

    # --- the workload -----------------------------------------------------

    def create_workload(self) -> None:
        stdout_read, stdout_write = os.pipe()
        stderr_read, stderr_write = os.pipe()
        self.output = RotatingLog(
            self.paths.container_log, self.config.log_max_bytes, self.config.log_max_files
        )
        for fd, stream in ((stdout_read, "stdout"), (stderr_read, "stderr")):
            thread = threading.Thread(
                target=drain, args=(fd, stream, self.output), name=f"drain-{stream}", daemon=True
            )
            thread.start()
            self._threads.append(thread)

        try:
            self.ports.open()  # an OSError for a taken port fails the create
            self.pid = self.runc.create(
                self.id, self.paths.bundle, self.paths.init_pid, stdout_write, stderr_write
            )
        except (RuncError, OSError, ValueError) as exc:
            self.error = str(exc)
            self.status = AssistantStatus.CREATE_FAILED
            self.exited_at = time.monotonic()
            log.error("container %s: create failed: %s", self.id, exc)
            self._delete_runc_state()
            self.ports.close()
            return
        finally:
            # The workload has its own copies now; the drains see EOF once
            # every process of the container closed them.
            os.close(stdout_write)
            os.close(stderr_write)

        self.status = AssistantStatus.CREATED
        log.info("container %s created, init pid %d", self.id, self.pid)
        # The init is our child until the watcher reaps it, so its pid and
        # this pidfd cannot name another process.
        self._init_pidfd = os.pidfd_open(self.pid)
        self._own_pid_namespace = has_own_pid_namespace(self._read_spec())
        watcher = threading.Thread(
            target=self._watch, args=(InitWatcher(self.pid),), name="watch", daemon=True
        )
        watcher.start()
        self._threads.append(watcher)

    def start_workload(self) -> None:
        if self.status != AssistantStatus.CREATED:
            log.warning("container %s: start ignored in status %s", self.id, self.status.value)
            return
        try:
            self.runc.start(self.id)
        except RuncError as exc:
            self.error = str(exc)
            log.error("container %s: start failed: %s", self.id, exc)
            self.kill_workload(ExitReason.KILLED)
            return
        self.status = AssistantStatus.RUNNING
        log.info("container %s started", self.id)
        self.send_heartbeat()

    def stop_workload(self, grace: float) -> None:
        """Send SIGTERM, and SIGKILL to every process after ``grace`` seconds.

        A repeated stop sends no second SIGTERM; it only moves the SIGKILL
        earlier when its grace ends sooner than the running one.
        """
        if not self.is_alive():
            return
        deadline = time.monotonic() + grace
        if self._stop_timer is not None:
            if deadline < self._stop_deadline:
                self._stop_timer.cancel()
                self._start_kill_timer(grace, deadline)
            return
        self.ending_reason = ExitReason.STOPPED
        if self.status == AssistantStatus.CREATED:
            self.kill_workload(ExitReason.STOPPED)
            return
        log.info("container %s: stopping with a grace of %.1f s", self.id, grace)
        self._signal_workload("SIGTERM", all_processes=False)
        self._start_kill_timer(grace, deadline)

    def _start_kill_timer(self, delay: float, deadline: float) -> None:
        self._stop_deadline = deadline
        self._stop_timer = threading.Timer(delay, self._signal_workload, args=("SIGKILL", True))
        self._stop_timer.daemon = True
        self._stop_timer.start()

    def kill_workload(self, reason: ExitReason, signal_name: str = "SIGKILL") -> None:
        if not self.is_alive():
            return
        # The latest order names the cause: a stop after a kill of SIGUSR1 ends
        # the workload as stopped.
        self.ending_reason = reason
        log.info("container %s: sending %s (%s)", self.id, signal_name, reason.value)
        self._signal_workload(signal_name, all_processes=signal_name == "SIGKILL")

    def kill_workload_now(self) -> None:
        """Kill every process of the container and drop its runc state.

        The last resort when the assistant itself fails, so that no
        workload outlives its supervisor.
        """
        if self.pid is None:
            return
        if self.exit is not None:
            # The watcher still removes the runc state after the report.
            self._wait_for_cleanup()
            return
        self._signal_workload("SIGKILL", all_processes=True)
        self._delete_runc_state()

    def _signal_workload(self, signal_name: str, all_processes: bool) -> None:
        """Send a signal to the init, or with ``all_processes`` to every process.

        When the init of a container with its own PID namespace dies, the
        kernel kills every other process in that namespace. So a SIGKILL
        goes to the init alone, and ``runc kill --all`` is used only for a
        container without its own PID namespace or for another signal.
        """
        if self.exit is not None:
            return
        if all_processes and not (signal_name == "SIGKILL" and self._own_pid_namespace):
            self._runc_kill(signal_name, all_processes=True)
            return
        try:
            number = signal.Signals[normalize_signal_name(signal_name)]
        except ValueError as exc:
            log.error("container %s: signal not sent: %s", self.id, exc)
            return
        with self._pidfd_lock:
            if self._init_pidfd is None:
                return
            try:
                signal.pidfd_send_signal(self._init_pidfd, number)
            except ProcessLookupError:
                log.info(
                    "container %s: init %s already exited; %s not sent",
                    self.id, self.pid, number.name,
                )

    def _runc_kill(self, signal_name: str, all_processes: bool) -> None:
        if self.exit is not None:
            return
        state = self._runc_state()
        if state is None or state.get("pid") != self.pid:
            # runc no longer knows this container, or the id now names the
            # container of a newer create: signal only our own init, which
            # is our child, so its pid cannot have been reused.
            log.warning(
                "container %s: runc does not own init %s any more; signalling it directly",
                self.id, self.pid,
            )
            if self.pid is not None:
                try:
                    os.kill(self.pid, signal.Signals[signal_name])
                except ProcessLookupError:
                    pass
            return
        try:
            self.runc.kill(self.id, signal_name, all_processes=all_processes)
        except RuncError as exc:
            # The init may have exited between the check and the call.
            log.info("container %s: runc kill %s: %s", self.id, signal_name, exc.text)

    def _runc_state(self) -> dict | None:
        try:
            return self.runc.state(self.id)
        except RuncError as exc:
            log.info("container %s: runc state: %s", self.id, exc.text)
            return None

    def _delete_runc_state(self) -> None:
        try:
            self.runc.delete(self.id)
        except RuncError as exc:
            log.info("container %s: runc delete: %s", self.id, exc.text)

    def _watch(self, watcher: InitWatcher) -> None:
        """Wait for init, then record the exit; runs on the watcher thread."""
        status = None
        while status is None:
            status = watcher.wait(timeout=1.0)
        watcher.close()
        exit_code, signal_name = decode_status(status)
        if signal_name is None and self.config.init:
            signal_name = signal_from_init_status(exit_code)

        cgroups_path = self._cgroups_path()
        oom_kills = oom_kill_count(cgroups_path) if cgroups_path else None
        oom = bool(oom_kills)
        # The OOM killer sends SIGKILL. A container that lost only a child
        # to it and then ended otherwise keeps the flag, not the reason.
        killed_by_oom = oom and exit_code == 128 + signal.SIGKILL and self.ending_reason is None
        reason = ExitReason.OOM if killed_by_oom else (self.ending_reason or ExitReason.EXITED)

        record = ExitInfo(exit_code=exit_code, signal=signal_name, oom_killed=oom, reason=reason)
        log.info(
            "container %s exited: code %d, signal %s, oom %s, reason %s",
            self.id, exit_code, signal_name, oom, reason.value,
        )
        # Report first: the record on disk and the removal of the runc state
        # only matter once the assistant is gone, and the main thread waits
        # for both before it ends.
        self._exits.put(record)
        self._wake_main_thread()
        try:
            write_exit_record(self.paths.exit_record, record)
        except OSError as exc:
            log.error("container %s: cannot write %s: %s", self.id, self.paths.exit_record, exc)
        try:
            self._delete_runc_state()
        finally:
            self._cleanup_done.set()

    def _wait_for_cleanup(self) -> None:
        if self.exit is None:
            return
        if not self._cleanup_done.wait(CLEANUP_TIMEOUT):
            log.error(
                "container %s: exit.json and runc delete not done after %.0f s",
                self.id, CLEANUP_TIMEOUT,
            )

    def _read_spec(self) -> dict | None:
        try:
            return json.loads((self.paths.bundle / "config.json").read_text())
        except (OSError, json.JSONDecodeError) as exc:
            log.warning("container %s: cannot read config.json: %s", self.id, exc)
            return None

    def _cgroups_path(self) -> str | None:
        spec = self._read_spec()
        if spec is None:
            return None
        return spec.get("linux", {}).get("cgroupsPath")

    def _wake_main_thread(self) -> None:
        connection = self.connection
        if connection is None:
            return
        try:
            connection.add_callback_threadsafe(lambda: None)
        except (pika.exceptions.AMQPError, AttributeError, RuntimeError):
            pass  # the main loop wakes by itself within MAX_WAIT

    def _collect_exits(self) -> None:
        try:
            record = self._exits.get_nowait()
        except queue.Empty:
            return
        if self._stop_timer is not None:
            self._stop_timer.cancel()
        self.exit = record
        self.ports.close()
        self.status = AssistantStatus.EXITED
        self.exited_at = time.monotonic()
        self.send_heartbeat()

    def _timeout_deadline(self) -> float:
        """Monotonic time at which the heartbeat timeout would end the workload."""
        timeout = self.config.heartbeat_timeout
        if timeout == 0 or not self.is_alive():
            return float("inf")
        # Just past the deadline, so that the check after the wait finds it passed.
        return self.last_reply + timeout + 0.001

    def _check_timeout(self, now: float) -> None:
        timeout = self.config.heartbeat_timeout
        if timeout == 0 or not self.is_alive():
            return
        silent = now - self.last_reply
        if silent > timeout:
            log.error(
                "container %s: no heartbeat reply from manager %s for %.1f s"
                " (timeout %.1f s); killing the workload",
                self.id, self.config.manager_id, silent, timeout,
            )
            self.kill_workload(ExitReason.MANAGER_UNREACHABLE)

    # --- the broker -------------------------------------------------------

    def connect(self, budget: float) -> None:
        """Open the connection, retrying with backoff for at most ``budget`` s."""
        retrying = Retrying(
            # Wrong credentials are not retried: that only delays the error
            # and keeps the workload unsupervised.
            retry=retry_if_exception(retryable_broker_error),
            wait=wait_exponential_jitter(
                multiplier=0.2, max=self.config.reconnect_cap(), jitter=0.1
            ),
            stop=stop_after_delay(budget),
            before_sleep=lambda state: log.warning(
                "container %s: broker connection failed (%s); retry %d in %.1f s",
                self.id,
                state.outcome.exception(),
                state.attempt_number,
                state.next_action.sleep,
            ),
            reraise=True,
        )
        try:
            retrying(self._open_channel)
        except (pika.exceptions.AMQPConnectionError, pika.exceptions.AMQPChannelError) as exc:
            raise AssistantExit(f"cannot reach the broker: {exc!r}") from exc

    def _open_channel(self) -> None:
        parameters = connection_parameters(
            self.config.amqp_url,
            connection_attempts=1,
            blocked_connection_timeout=max(5.0, self.config.heartbeat_timeout),
        )
        connection = pika.BlockingConnection(parameters)
        try:
            channel = connection.channel()
            channel.confirm_delivery()
            channel.basic_consume(names.DIRECT_REPLY_TO, self._on_reply, auto_ack=True)
            # A broker-named queue, new for every connection: a fixed name
            # could stay locked by the old connection for as long as the
            # cluster node holding it is down. Heartbeats carry the name.
            declared = channel.queue_declare("", exclusive=True, auto_delete=True)
            self.control_queue = declared.method.queue
            channel.basic_consume(self.control_queue, self._on_control, auto_ack=True)
        except pika.exceptions.AMQPChannelError:
            connection.close()
            raise
        self.connection, self.channel = connection, channel
        log.info("container %s: connected to the broker", self.id)

    def _pump(self, until: float) -> None:
        """Handle broker traffic until the monotonic time ``until``, at most MAX_WAIT s."""
        if self.connection is None:
            self._reconnect()
            return
        wait = min(MAX_WAIT, max(0.0, until - time.monotonic()))
        try:
            self.connection.process_data_events(time_limit=wait)
        except pika.exceptions.AMQPError as exc:
            log.warning("container %s: broker connection lost: %r", self.id, exc)
            self.connection = self.channel = None

    def _reconnect(self) -> None:
        """Try to reconnect until the heartbeat timeout would expire."""
        timeout = self.config.heartbeat_timeout
        if self.is_alive() and timeout > 0:
            budget = max(0.0, timeout - (time.monotonic() - self.last_reply))
        else:
            budget = self.config.reconnect_cap()
        try:
            self.connect(budget=budget)
        except AssistantExit as exc:
            log.warning("container %s: %s", self.id, exc)
            time.sleep(LOOP_TICK)

    def send_heartbeat(self) -> None:
        if self.channel is None:
            return
        beat = Heartbeat(
            container_id=self.id,
            assistant_pid=os.getpid(),
            token=self.config.token,
            control_queue=self.control_queue,
            status=self.status,
            pid=self.pid,
            exit=self.exit,
            error=self.error,
        )
        properties = pika.BasicProperties(
            content_type="application/json",
            reply_to=names.DIRECT_REPLY_TO,
            delivery_mode=1,
        )
        try:
            self.channel.basic_publish(
                "",
                self.heartbeat_queue,
                beat.model_dump_json().encode(),
                properties,
                mandatory=True,
            )
        except pika.exceptions.UnroutableError:
            # No heartbeat queue means no manager: the timeout keeps running.
            log.warning(
                "container %s: heartbeat unroutable, queue %s missing",
                self.id, self.heartbeat_queue,
            )
        except pika.exceptions.AMQPError as exc:
            log.warning("container %s: heartbeat not sent: %r", self.id, exc)
            self.connection = self.channel = None

    def _on_reply(self, channel, method, properties, body: bytes) -> None:
        try:
            reply = HeartbeatReply.model_validate_json(body)
        except ValueError as exc:
            log.error("container %s: invalid heartbeat reply %r: %s", self.id, body[:200], exc)
            return
        if reply.epoch < self.epoch and reply.verdict in (Verdict.NACK, Verdict.STOP):
            # A manager run older than one already heard from, for instance
            # one that lost its broker connection and lives on, must not end
            # a workload that the newer run adopted.
            log.warning(
                "container %s: ignoring %s from manager epoch %d (latest %d)",
                self.id, reply.verdict.value, reply.epoch, self.epoch,
            )
            return
        self.epoch = max(self.epoch, reply.epoch)
        if reply.verdict == Verdict.RETRY_LATER:
            # Neither ack nor nack: the heartbeat timeout keeps running.
            log.info("container %s: manager is not ready for it yet", self.id)
            return
        self.last_reply = time.monotonic()
        if reply.verdict == Verdict.NACK:
            log.error(
                "container %s: manager %s does not know this container; killing it",
                self.id, self.config.manager_id,
            )
            self.nacked = True
            self.kill_workload(ExitReason.MANAGER_NACK)
        elif reply.verdict == Verdict.STOP:
            self.stop_workload(reply.grace or 0.0)
        if reply.exit_recorded and not self.is_alive():
            self.exit_recorded = True

    def _on_control(self, channel, method, properties, body: bytes) -> None:
        try:
            order = ControlOrder.model_validate_json(body)
        except ValueError as exc:
            log.error("container %s: invalid control order %r: %s", self.id, body[:200], exc)
            return
        log.info("container %s: control order %s", self.id, order.action)
        if order.action == "start":
            self.start_workload()
        elif order.action == "stop":
            self.stop_workload(order.grace or 0.0)
        elif order.action == "kill":
            self.kill_workload(ExitReason.KILLED, order.signal or "SIGKILL")


def has_own_pid_namespace(spec: dict | None) -> bool:
    """Tell whether an OCI spec gives the container a new PID namespace."""
    if spec is None:
        return False
    namespaces = spec.get("linux", {}).get("namespaces", [])
    return any(entry.get("type") == "pid" and not entry.get("path") for entry in namespaces)


def signal_from_init_status(exit_code: int) -> str | None:
    """Name the signal behind an init's 128 + N status, as shells and tini do.

    A workload that itself calls exit(128 + N) reads the same; that
    ambiguity is the convention of every container engine using an init.
    """
    number = exit_code - 128
    if number <= 0:
        return None
    try:
        return signal.Signals(number).name
    except ValueError:
        return None


def write_exit_record(path: Path, record: ExitInfo) -> None:
    """Write the exit record atomically, so a reader never sees half of it."""
    temporary = path.with_suffix(".tmp")
    with open(temporary, "w") as file:
        file.write(record.model_dump_json())
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)


def read_exit_record(path: Path) -> ExitInfo | None:
    try:
        return ExitInfo.model_validate_json(path.read_text())
    except FileNotFoundError:
        return None
