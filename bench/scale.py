"""Scale: many idle containers on one manager, with `list` latency and heartbeats meanwhile.

Starts COUNT containers (QUICK_COUNT with ``--quick``) running
``sleep infinity`` with network none through one manager, from CLIENTS
client threads, and records the start rate. Once all of them run, for
WINDOW seconds:

- ``list`` commands go out at LIST_RATE per second on a fixed schedule,
  whether or not earlier ones have been answered, so a slow reply does
  not lower the rate. Each latency runs from the publish until the reply
  arrives.
- A canary sends CANARY_RATE heartbeats per second for the first
  container, with that container's assistant token, into the manager's
  heartbeat queue, and times the replies. The canary's heartbeats wait
  in the same queue, behind the same consumer, as the assistants'
  heartbeats, so their round trip shows how far the manager's
  heartbeat path lags.
- Every second the manager's heartbeat queue is declared passively for
  its message count. The manager consumes with automatic acks and no
  prefetch limit, so heartbeats that it has not read yet may wait in its
  socket buffers instead of the queue; the canary and the ages below
  catch that case.

Whether all heartbeats were answered is judged from what each party
records:

- the manager: every ``list`` reply carries each container's
  ``last_heartbeat_at``, the time the manager last processed a heartbeat
  from it. Per reply, the benchmark keeps how far the oldest of them
  lags behind the newest (usually the canary's), so a container whose
  heartbeats stopped being processed shows as a growing lag. No container may turn ``lost`` (no heartbeat for
  ``--lost-after`` seconds), which the events and the states show.
- the assistants: each logs "no heartbeat reply" when it kills its
  workload after HEARTBEAT_TIMEOUT seconds without a reply, and logs a
  line when a heartbeat is unroutable, cannot be sent, or the
  connection drops. Their logs are searched for these lines afterwards.
- the canary: every heartbeat it sent must get a reply.

Afterwards the benchmark records the PSS of the manager, of its fork
server and of all assistants, the open file descriptors of the manager
and the broker, and the tasks (processes and threads) per container.
Then it deletes all containers through the manager (``delete --force``
from CLIENTS threads) and records how long that took. The manager
fixture removes whatever remains, also after an error or SIGTERM.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import threading
import time
from datetime import datetime
from pathlib import Path

import pika

from bench.common import (
    Context,
    ManagerRun,
    Probe,
    Result,
    children_of,
    cpu_seconds,
    parallel,
    pids_matching,
    total_pss_mib,
)
from messages import names
from messages.models import Heartbeat

log = logging.getLogger(__name__)

COUNT = 1000
QUICK_COUNT = 100
WINDOW = 60.0
QUICK_WINDOW = 20.0
CLIENTS = 4
LIST_RATE = 4.0
"""``list`` commands per second during the window."""
CANARY_RATE = 5.0
"""Canary heartbeats per second during the window."""
HEARTBEAT_INTERVAL = 1.0
HEARTBEAT_TIMEOUT = 10.0
"""Seconds an assistant waits for a heartbeat reply before it kills its
workload. Lower than the default 30 s, so that a stalled heartbeat path
shows up as exits within the window."""
LOST_AFTER = 5.0
SETTLE_SECONDS = 5.0

TASKS_PER_CONTAINER_ESTIMATE = 10
"""Processes and threads per container, used only for the check before
the start: an assistant's threads plus tini and sleep. The run records
the measured figure."""
MEMORY_PER_CONTAINER_ESTIMATE_MIB = 12
"""Memory per container for the check before the start, an estimate:
the assistant (8.3 to 9.1 MiB PSS when forked, measured with 20 to 300
containers), tini, sleep, and the broker's share of a connection. The
run records the measured PSS."""
BROKER_SPARE_FILES = 200
"""File descriptors the broker needs besides one per assistant
connection: its own files, the manager's and the clients' connections."""

ASSISTANT_PROBLEMS = {
    "heartbeat timeout": "no heartbeat reply from manager",
    "heartbeat unroutable": "heartbeat unroutable",
    "heartbeat not sent": "heartbeat not sent",
    "connection lost": "broker connection lost",
    "connection failed": "broker connection failed",
    "nack": "does not know this container",
}
"""Assistant log lines that show a heartbeat without a reply, by name."""


# --- helpers that compute -------------------------------------------------------


def parse_time(value: str) -> float:
    """Return the epoch seconds of an ISO 8601 time from a reply, such as ``last_heartbeat_at``."""
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def heartbeat_lag(containers: list[dict], excluded: set[str]) -> float | None:
    """Return how many seconds the oldest ``last_heartbeat_at`` lags behind the newest one.

    Both come from the same reply, so neither the reply's latency nor a
    clock offset between the hosts enters the figure. Containers in
    ``excluded`` count only as the newest heartbeat, and containers
    without a heartbeat yet are skipped. Returns None when no container
    is left.
    """
    times = {
        container["id"]: parse_time(container["last_heartbeat_at"])
        for container in containers
        if container.get("last_heartbeat_at")
    }
    compared = [value for key, value in times.items() if key not in excluded]
    if not compared:
        return None
    return max(times.values()) - min(compared)


def count_states(containers: list[dict]) -> dict[str, int]:
    """Return the number of containers per state, such as ``{"running": 999, "lost": 1}``."""
    return dict(collections.Counter(container["state"] for container in containers))


def count_log_problems(lines: list[str]) -> dict[str, int]:
    """Count the lines that match each entry of ASSISTANT_PROBLEMS, with 0 for names not found."""
    counts = dict.fromkeys(ASSISTANT_PROBLEMS, 0)
    for line in lines:
        for name, needle in ASSISTANT_PROBLEMS.items():
            if needle in line:
                counts[name] += 1
    return counts


def schedule(rate: float, duration: float) -> list[float]:
    """Return the send offsets in seconds of a steady ``rate`` per second over ``duration``."""
    return [index / rate for index in range(int(duration * rate))]


# --- limits -------------------------------------------------------------------


def open_files_limit(pid: int) -> int | None:
    """Return the soft RLIMIT_NOFILE of ``pid`` from /proc/PID/limits, or None if unlimited."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft = line.split()[3]
            return None if soft == "unlimited" else int(soft)
    raise ValueError(f"no 'Max open files' line in /proc/{pid}/limits")


def open_files(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def task_count() -> int:
    """Return the number of processes and threads on the host (the 4th field of /proc/loadavg)."""
    return int(Path("/proc/loadavg").read_text().split()[3].split("/")[1])


def memory_available_mib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    raise ValueError("no MemAvailable line in /proc/meminfo")


def check_limits(context: Context, count: int) -> list[str]:
    """Raise RuntimeError naming the value and the fix when ``count`` containers cannot fit.

    Returns notes with the values checked.
    """
    problems = []
    notes = []
    if context.broker_pid is not None:
        limit = open_files_limit(context.broker_pid)
        needed = count + BROKER_SPARE_FILES
        notes.append(f"broker open files limit {limit}, {needed} needed")
        if limit is not None and limit < needed:
            problems.append(
                f"the broker (pid {context.broker_pid}) may open {limit} files, but {count}"
                f" assistant connections need about {needed}: raise the hard limit"
                f" (ulimit -Hn, or LimitNOFILE= for a systemd unit) to at least {needed}"
            )
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    free_pids = pid_max - task_count()
    needed_pids = count * TASKS_PER_CONTAINER_ESTIMATE
    notes.append(f"pid_max {pid_max}, {free_pids} pids free, about {needed_pids} needed")
    if free_pids < needed_pids:
        problems.append(
            f"kernel.pid_max is {pid_max} and {free_pids} pids are free, but {count} containers"
            f" need about {needed_pids}: raise it with sysctl -w kernel.pid_max=4194304"
        )
    available = memory_available_mib()
    needed_mib = count * MEMORY_PER_CONTAINER_ESTIMATE_MIB
    notes.append(f"{available:.0f} MiB available, about {needed_mib} MiB needed")
    if available < needed_mib:
        problems.append(
            f"{available:.0f} MiB of memory are available, but {count} containers need about"
            f" {needed_mib} MiB: run fewer containers or free memory"
        )
    if problems:
        raise RuntimeError("; ".join(problems))
    return notes


# --- phases -------------------------------------------------------------------------


def start_containers(context: Context, manager: ManagerRun, ids: list[str]) -> float:
    """Run ``sleep infinity`` containers from CLIENTS threads; return the seconds taken.

    The first failed start stops every client, and raises RuntimeError
    with the number of containers running by then.
    """
    began = time.perf_counter()
    started = [0]
    counter_lock = threading.Lock()
    failed = threading.Event()

    def worker(index: int) -> None:
        with Probe(context.amqp_url, manager.manager_id, events=False) as probe:
            for container_id in ids[index::CLIENTS]:
                if failed.is_set():
                    return
                try:
                    probe.run_container(container_id, ["sleep", "infinity"], network="none")
                except (RuntimeError, TimeoutError) as exc:
                    failed.set()
                    raise RuntimeError(
                        f"run {container_id} failed after {time.perf_counter() - began:.0f} s,"
                        f" with {started[0]} containers running: {exc}"
                    ) from exc
                with counter_lock:
                    started[0] += 1
                    if started[0] % 100 == 0:
                        log.info(
                            "scale: %d of %d containers running after %.0f s",
                            started[0], len(ids), time.perf_counter() - began,
                        )

    parallel(CLIENTS, worker)
    return time.perf_counter() - began


def cpu_seconds_of(pids: list[int]) -> float:
    """Return the summed user and system CPU seconds of ``pids``; ended ones count 0."""
    total = 0.0
    for pid in pids:
        try:
            total += cpu_seconds(pid)
        except (OSError, ValueError):
            pass
    return total


def delete_containers(context: Context, manager: ManagerRun, ids: list[str]) -> float:
    """Delete containers with ``force`` from CLIENTS threads; return the seconds taken."""
    began = time.perf_counter()

    def worker(index: int) -> None:
        with Probe(context.amqp_url, manager.manager_id, events=False) as probe:
            for container_id in ids[index::CLIENTS]:
                probe.delete(container_id)

    parallel(CLIENTS, worker)
    return time.perf_counter() - began


class Canary(threading.Thread):
    """Sends heartbeats for one container at CANARY_RATE and samples the heartbeat queue."""

    def __init__(self, amqp_url: str, manager_id: str, body: bytes, duration: float):
        super().__init__(name="canary", daemon=True)
        self.amqp_url = amqp_url
        self.queue = names.heartbeat_queue(manager_id)
        self.body = body
        self.duration = duration
        self.sent = 0
        self.latencies_ms: list[float] = []
        self.queue_depths: list[int] = []
        self.error: BaseException | None = None
        self._sent_at: dict[str, float] = {}

    def run(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # reported by the benchmark after join()
            log.exception("scale: canary failed")
            self.error = exc

    def _on_reply(self, channel, method, properties, body: bytes) -> None:
        began = self._sent_at.pop(properties.correlation_id, None)
        if began is not None:
            self.latencies_ms.append((time.perf_counter() - began) * 1000)

    def _run(self) -> None:
        connection = pika.BlockingConnection(pika.URLParameters(self.amqp_url))
        channel = connection.channel()
        channel.basic_consume(names.DIRECT_REPLY_TO, self._on_reply, auto_ack=True)
        began = time.perf_counter()
        next_depth = began
        for offset in schedule(CANARY_RATE, self.duration):
            while (now := time.perf_counter()) < began + offset:
                connection.process_data_events(time_limit=min(began + offset - now, 0.05))
            if now >= next_depth:
                declared = channel.queue_declare(self.queue, passive=True)
                self.queue_depths.append(declared.method.message_count)
                next_depth += 1.0
            correlation_id = str(self.sent)
            self._sent_at[correlation_id] = time.perf_counter()
            channel.basic_publish(
                "",
                self.queue,
                self.body,
                pika.BasicProperties(
                    content_type="application/json",
                    reply_to=names.DIRECT_REPLY_TO,
                    correlation_id=correlation_id,
                ),
            )
            self.sent += 1
        # Late replies count; a heartbeat older than the queue's TTL gets none.
        drain_end = time.perf_counter() + HEARTBEAT_TIMEOUT
        while self._sent_at and time.perf_counter() < drain_end:
            connection.process_data_events(time_limit=0.05)
        connection.close()


def canary_body(manager: ManagerRun, container: dict) -> bytes:
    """Serialize a ``running`` heartbeat for ``container`` with its assistant's token.

    No control queue is named, so the manager keeps the assistant's own.
    """
    config = json.loads((manager.containers_dir / container["id"] / "assistant.json").read_text())
    beat = Heartbeat(
        container_id=container["id"],
        assistant_pid=container["assistant_pid"],
        token=config["token"],
        status="running",
        pid=container["pid"],
    )
    return beat.model_dump_json().encode()


def measure_lists(probe: Probe, duration: float, canary_id: str) -> dict:
    """Send ``list`` at LIST_RATE for ``duration`` s; return latencies, ages and state counts."""
    sent_at: dict[str, float] = {}
    latencies_ms: list[float] = []
    lags: list[float] = []
    worst_states: dict[str, int] = {}
    began = time.perf_counter()

    def collect() -> None:
        for correlation_id in [key for key in sent_at if key in probe.replies]:
            arrival, reply = probe.replies.pop(correlation_id)
            latencies_ms.append((arrival - sent_at.pop(correlation_id)) * 1000)
            containers = reply.get("containers") or []
            lag = heartbeat_lag(containers, {canary_id})
            if lag is not None:
                lags.append(lag)
            for state, number in count_states(containers).items():
                if state != "running":
                    worst_states[state] = max(worst_states.get(state, 0), number)

    for offset in schedule(LIST_RATE, duration):
        while (now := time.perf_counter()) < began + offset:
            probe.connection.process_data_events(time_limit=min(began + offset - now, 0.05))
            collect()
        correlation_id = probe.send({"command": "list"})
        sent_at[correlation_id] = time.perf_counter()
    deadline = time.perf_counter() + 30.0
    while sent_at and time.perf_counter() < deadline:
        probe.connection.process_data_events(time_limit=0.05)
        collect()
    return {
        "sent": int(duration * LIST_RATE),
        "latencies_ms": latencies_ms,
        "unanswered": len(sent_at),
        "heartbeat_lags_s": lags,
        "other_states": worst_states,
    }


def tasks_of(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return 0


def parent_pid(pid: int) -> int | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(text[text.rindex(")") + 2 :].split()[1])


def tasks_per_container(assistants: list[int]) -> float:
    """Return the mean number of tasks of an assistant and its descendants (tini, sleep)."""
    total = 0
    for pid in assistants:
        pending = [pid]
        while pending:
            current = pending.pop()
            total += tasks_of(current)
            pending.extend(children_of(current))
    return total / len(assistants) if assistants else 0.0


def assistant_log_problems(manager: ManagerRun, ids: list[str]) -> dict[str, int]:
    lines: list[str] = []
    for container_id in ids:
        path = manager.containers_dir / container_id / "assistant.log"
        try:
            lines.extend(path.read_text(errors="replace").splitlines())
        except OSError:
            continue
    return count_log_problems(lines)


def log_manager_problems(manager: ManagerRun, limit: int = 20) -> None:
    """Log the manager's last ``limit`` ERROR and WARNING lines, with a traceback's last line each."""
    try:
        lines = manager.log_path.read_text(errors="replace").splitlines()
    except OSError as exc:
        log.error("scale: cannot read the manager's log %s: %s", manager.log_path, exc)
        return
    problems = []
    for number, line in enumerate(lines):
        if " ERROR " in line or " WARNING " in line:
            following = lines[number + 1 : number + 40]
            last_trace_line = next(
                (text for text in following if text and not text.startswith((" ", "Traceback"))), ""
            )
            problems.append(f"{line} | {last_trace_line}" if " ERROR " in line else line)
    for problem in problems[-limit:]:
        log.error("scale: manager log: %s", problem)


# --- the benchmark --------------------------------------------------------------------


def run(context: Context) -> dict:
    result = Result("scale")
    count = context.scale_count or (QUICK_COUNT if context.quick else COUNT)
    window = QUICK_WINDOW if context.quick else WINDOW
    for note in check_limits(context, count):
        result.note(note)
    base = context.directory("scale")
    manager = ManagerRun(
        context,
        context.manager_id("scale"),
        base / "berth",
        heartbeat_interval=HEARTBEAT_INTERVAL,
        heartbeat_timeout=HEARTBEAT_TIMEOUT,
        lost_after=LOST_AFTER,
    )
    ids = [f"scale-{number}" for number in range(count)]
    try:
        manager.start()
        seconds = start_containers(context, manager, ids)
        result.add("start rate", "containers/s", [count / seconds], higher_is_better=True)
        result.note(f"{count} containers started in {seconds:.1f} s by {CLIENTS} clients")
        time.sleep(SETTLE_SECONDS)

        with Probe(context.amqp_url, manager.manager_id) as probe:
            containers = probe.request({"command": "list"})["containers"]
            states = count_states(containers)
            result.note(f"states before the window: {states}")
            canary_container = next(c for c in containers if c["id"] == ids[0])
            canary = Canary(
                context.amqp_url, manager.manager_id, canary_body(manager, canary_container), window
            )
            assistants = manager.assistant_pids()
            cpu_pids = {"manager": [manager.pid], "assistants": assistants}
            if context.broker_pid is not None:
                cpu_pids["broker"] = [context.broker_pid]
            cpu_before = {name: cpu_seconds_of(pids) for name, pids in cpu_pids.items()}
            load_before = os.getloadavg()
            began = time.perf_counter()
            canary.start()
            lists = measure_lists(probe, window, ids[0])
            canary.join(window + HEARTBEAT_TIMEOUT + 30)
            elapsed = time.perf_counter() - began
            load_after = os.getloadavg()
            cpu_share = {
                name: (cpu_seconds_of(pids) - cpu_before[name]) / elapsed * 100
                for name, pids in cpu_pids.items()
            }
            lost_events = sum(len(v) for k, v in probe.events.items() if k.endswith(".lost"))
            exited_events = sum(len(v) for k, v in probe.events.items() if k.endswith(".exited"))
        if canary.error is not None:
            raise RuntimeError(f"the heartbeat canary failed: {canary.error!r}")
        result.note(f"load average (1 min) {load_before[0]:.2f} at the window's start, {load_after[0]:.2f} at its end")

        for name, percent in cpu_share.items():
            result.add(f"{name} CPU during the window", "% of a core", [percent])
        result.add(f"list latency, {count} containers", "ms", lists["latencies_ms"])
        result.add("oldest heartbeat behind the newest, per list reply", "s", lists["heartbeat_lags_s"])
        result.add("canary heartbeat reply latency", "ms", canary.latencies_ms)
        result.add("heartbeat queue depth, sampled each second", "messages", canary.queue_depths)
        result.note(
            f"list: {lists['sent']} sent at {LIST_RATE:g}/s over {window:.0f} s,"
            f" {lists['unanswered']} unanswered"
        )
        result.note(
            f"canary: {canary.sent} heartbeats sent at {CANARY_RATE:g}/s,"
            f" {canary.sent - len(canary.latencies_ms)} without a reply"
        )
        result.note(
            f"containers in a state other than running, maximum per reply: {lists['other_states'] or 'none'};"
            f" lost events {lost_events}, exited events {exited_events}"
        )
        problems = assistant_log_problems(manager, ids)
        result.note(f"assistant log lines: {problems}")

        assistants = manager.assistant_pids()
        manager_files = open_files(manager.pid)
        zygotes = [
            pid for pid in pids_matching(b"assistant.zygote") if parent_pid(pid) == manager.pid
        ]
        result.add("manager PSS", "MiB", [total_pss_mib([manager.pid])])
        result.add("fork server PSS", "MiB", [total_pss_mib(zygotes)])
        assistants_mib = total_pss_mib(assistants)
        result.add("assistant PSS per container", "MiB", [assistants_mib / max(1, len(assistants))])
        result.note(f"{len(assistants)} assistants, {assistants_mib:.0f} MiB PSS together")
        result.note(
            f"manager: {manager_files} open files (limit {open_files_limit(manager.pid)}),"
            f" {tasks_of(manager.pid)} threads"
        )
        if context.broker_pid is not None:
            result.note(
                f"broker: {open_files(context.broker_pid)} open files"
                f" (limit {open_files_limit(context.broker_pid)})"
            )
        result.note(f"tasks per container (assistant threads, tini, sleep): {tasks_per_container(assistants):.1f}")
        result.extra["scale"] = {
            "count": count,
            "window_s": window,
            "list_rate": LIST_RATE,
            "canary_rate": CANARY_RATE,
            "assistant_log_problems": problems,
            "lost_events": lost_events,
            "exited_events": exited_events,
            "other_states": lists["other_states"],
        }

        seconds = delete_containers(context, manager, ids)
        result.add("tear-down: delete --force of all", "s", [seconds])
        result.note(f"{count} containers deleted in {seconds:.1f} s by {CLIENTS} clients")
    except BaseException:
        # The manager's log is removed with the work directory, so its
        # errors go to the benchmark's own log first.
        log_manager_problems(manager)
        raise
    finally:
        manager.cleanup()
    for row in result.rows:
        if len(row["samples"]) > 1000:
            row["samples"] = []  # the summary is kept
    return result.finish()
