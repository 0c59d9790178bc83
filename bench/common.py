"""Shared parts of the benchmarks: statistics, a manager child, a timing
client, raw runc and podman peers, and /proc readers.

Every benchmark module exposes ``run(context) -> dict`` and builds its
result with :class:`Result`, so that bench.run can print one table.
"""

from __future__ import annotations

import json
import logging
import math
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import pika
import pika.exceptions

from manager import bundle
from manager.network import remove_manager_network
from messages import names
from messages.models import CreateSpec

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
"""The interpreter's real path: a pyenv shim would add about 70 ms per start."""

INIT_BINARY = "/usr/bin/tini-static"
"""The manager's default init, so that peers run the same process tree."""

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

COMMAND_TIMEOUT = 120.0
"""Seconds after which a runc or podman command is killed as hung."""


# --- statistics ------------------------------------------------------------


def percentile(sorted_samples: list[float], p: float) -> float:
    """Return the nearest-rank percentile: with 30 samples, p99 is the maximum."""
    rank = max(1, math.ceil(p / 100 * len(sorted_samples)))
    return sorted_samples[rank - 1]


def summarize(samples: list[float]) -> dict:
    ordered = sorted(value for value in samples if value is not None)
    if not ordered:
        return {"n": 0, "median": None, "p90": None, "p99": None, "min": None, "max": None}
    middle = len(ordered) // 2
    if len(ordered) % 2:
        median = ordered[middle]
    else:
        median = (ordered[middle - 1] + ordered[middle]) / 2
    return {
        "n": len(ordered),
        "median": median,
        "p90": percentile(ordered, 90),
        "p99": percentile(ordered, 99),
        "min": ordered[0],
        "max": ordered[-1],
    }


def loadavg() -> list[float]:
    """Return the 1, 5 and 15 minute load averages from /proc/loadavg."""
    return [float(value) for value in Path("/proc/loadavg").read_text().split()[:3]]


@dataclass
class Context:
    """Broker URL, scratch directory and mode, shared by all benchmarks of one run."""

    amqp_url: str
    work_dir: Path
    quick: bool
    spawn: str = "fork"
    """The managers' --spawn mode: "fork" (the default) or "exec"."""
    broker_pid: int | None = None
    """Pid of the broker's Erlang VM, to read its limits; None if not known."""
    scale_count: int | None = None
    """Containers the scale benchmark starts; None for its default."""
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:6])

    def directory(self, name: str) -> Path:
        path = self.work_dir / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def manager_id(self, name: str) -> str:
        return f"bench-{self.run_id}-{name}"


class Result:
    """Rows of one benchmark plus the load average at its start and end."""

    def __init__(self, name: str):
        self.name = name
        self.load_start = loadavg()
        self.rows: list[dict] = []
        self.notes: list[str] = []
        self.extra: dict = {}

    def add(
        self,
        label: str,
        unit: str,
        samples: list[float],
        compare_to: str | None = None,
        higher_is_better: bool = False,
    ) -> None:
        """Add a row; ``compare_to`` names the peer row whose median is the ratio's divisor."""
        self.rows.append(
            {
                "label": label,
                "unit": unit,
                "compare_to": compare_to,
                "higher_is_better": higher_is_better,
                **summarize(samples),
                "samples": [None if value is None else round(value, 6) for value in samples],
            }
        )

    def note(self, text: str) -> None:
        log.info("%s: %s", self.name, text)
        self.notes.append(text)

    def finish(self) -> dict:
        by_label = {row["label"]: row for row in self.rows}
        for row in self.rows:
            peer = by_label.get(row["compare_to"]) if row["compare_to"] else None
            if peer and row["median"] is not None and peer["median"]:
                row["ratio"] = row["median"] / peer["median"]
            else:
                row["ratio"] = None
        return {
            "benchmark": self.name,
            "load_start": self.load_start,
            "load_end": loadavg(),
            "rows": self.rows,
            "notes": self.notes,
            **self.extra,
        }


# --- processes and /proc ---------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """Return user + system CPU seconds of ``pid`` (fields 14 and 15 of /proc/PID/stat)."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def pss_kib(pid: int) -> int:
    """Return the proportional set size of ``pid`` in KiB from /proc/PID/smaps_rollup."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    raise ValueError(f"no Pss line in /proc/{pid}/smaps_rollup")


def total_pss_mib(pids: list[int]) -> float:
    """Return the summed PSS of ``pids`` in MiB; pids that ended meanwhile count 0."""
    total = 0
    for pid in pids:
        try:
            total += pss_kib(pid)
        except (OSError, ValueError):
            pass
    return total / 1024


def pids_matching(*markers: bytes) -> list[int]:
    """Return live pids whose command line contains every marker."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command_line = (entry / "cmdline").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and all(marker in command_line for marker in markers):
            found.append(int(entry.name))
    return found


def children_of(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(value) for value in text.split()]


class ExitWatch:
    """Times the exit of processes that need not be our children, through pidfds.

    A pidfd becomes readable when its process exits, so the time is taken
    within one poll wake-up of the exit and not at a polling interval.
    """

    def __init__(self, pids: list[int]):
        self.poller = select.poll()
        self.fds: dict[int, int] = {}
        self.exited: dict[int, float] = {}
        for pid in pids:
            try:
                fd = os.pidfd_open(pid)
            except ProcessLookupError:
                self.exited[pid] = time.perf_counter()
                continue
            self.fds[fd] = pid
            self.poller.register(fd, select.POLLIN)

    def wait(self, timeout: float) -> dict[int, float]:
        """Wait until all have exited or ``timeout`` s pass, and return exit times by pid."""
        deadline = time.perf_counter() + timeout
        while self.fds:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                break
            for fd, _ in self.poller.poll(remaining * 1000):
                self.exited[self.fds.pop(fd)] = time.perf_counter()
                self.poller.unregister(fd)
                os.close(fd)
        for fd in list(self.fds):
            os.close(fd)
        self.fds.clear()
        return self.exited


def run_quiet(command: list[str], timeout: float = 60.0, **options) -> subprocess.CompletedProcess:
    return subprocess.run(
        command,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=timeout,
        check=False,
        **options,
    )


def remove_cgroup_parents(relative: str) -> None:
    """Remove an empty cgroup directory (such as /berth/ID) in every v1 hierarchy."""
    for hierarchy in Path("/sys/fs/cgroup").iterdir():
        path = hierarchy / relative.lstrip("/")
        try:
            path.rmdir()
        except OSError:
            pass  # absent, not empty, or not a cgroup hierarchy


# --- a manager child ---------------------------------------------------------


class ManagerRun:
    """One ``python -m manager`` child with its own state directory and runc root."""

    def __init__(
        self,
        context: Context,
        manager_id: str,
        base_dir: Path,
        heartbeat_interval: float = 1.0,
        heartbeat_timeout: float = 30.0,
        lost_after: float = 5.0,
        state_name: str = "state",
        runc_name: str = "runc",
    ):
        self.context = context
        self.manager_id = manager_id
        self.base_dir = base_dir
        self.state_dir = base_dir / state_name
        self.runc_root = base_dir / runc_name
        self.log_path = base_dir / f"manager-{state_name}.log"
        self.options = [
            "--heartbeat-interval", str(heartbeat_interval),
            "--heartbeat-timeout", str(heartbeat_timeout),
            "--lost-after", str(lost_after),
            "--spawn", context.spawn,
        ]
        self.process: subprocess.Popen | None = None

    @property
    def containers_dir(self) -> Path:
        return self.state_dir / self.manager_id / "containers"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self, timeout: float = 60.0) -> float:
        """Start the manager and return the perf_counter time of its first reply."""
        self.base_dir.mkdir(parents=True, exist_ok=True)
        command = [
            PYTHON, "-m", "manager",
            "--amqp-url", self.context.amqp_url,
            "--id", self.manager_id,
            "--state-dir", str(self.state_dir),
            "--runc-root", str(self.runc_root),
            "--init-binary", INIT_BINARY,
            *self.options,
            "--log-level", "INFO",
        ]
        with open(self.log_path, "ab") as output:
            self.process = subprocess.Popen(
                command, cwd=PROJECT_ROOT, stdin=subprocess.DEVNULL, stdout=output, stderr=output
            )
        return self.wait_ready(timeout)

    def wait_ready(self, timeout: float) -> float:
        """Send ``list`` until the manager replies, and return the reply's arrival time.

        The command queue is durable, so a list sent before the manager
        consumes waits in it, and the manager replies once it serves.
        """
        deadline = time.perf_counter() + timeout
        with Probe(self.context.amqp_url, self.manager_id, events=False) as probe:
            while time.perf_counter() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(
                        f"manager {self.manager_id} exited with {self.process.returncode}:"
                        f" see {self.log_path}"
                    )
                try:
                    correlation_id = probe.send({"command": "list"})
                    arrival, _ = probe.wait_reply(correlation_id, timeout=1.0)
                    return arrival
                except (TimeoutError, pika.exceptions.UnroutableError):
                    time.sleep(0.05)
        raise TimeoutError(f"manager {self.manager_id} not ready after {timeout:.0f} s")

    def kill(self) -> float:
        """SIGKILL the manager, as a crash would; return the perf_counter time of the signal."""
        assert self.process is not None
        signalled = time.perf_counter()
        self.process.kill()
        self.process.wait(10)
        return signalled

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(40)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)

    def assistant_pids(self) -> list[int]:
        return pids_matching(b"assistant", str(self.containers_dir).encode())

    def cleanup(self) -> None:
        """Stop the manager, SIGKILL its assistants and delete its runc containers."""
        self.stop()
        for pid in self.assistant_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        RuncPeer.delete_all(self.runc_root / self.manager_id)
        remove_cgroup_parents(f"/berth/{self.manager_id}")
        remove_manager_network(self.manager_id)  # bridge, veths and namespaces


# --- a client that timestamps what it receives -------------------------------


class Probe:
    """A pika connection that sends commands and records when replies and events arrive.

    ``messages.client.Client`` reads events only when asked, so it cannot
    tell when an event arrived. This probe stores the perf_counter time in
    its delivery callbacks instead. One thread only.
    """

    def __init__(self, amqp_url: str, manager_id: str, events: bool = True):
        self.manager_id = manager_id
        self.connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
        self.channel = self.connection.channel()
        self.channel.exchange_declare(names.COMMAND_EXCHANGE, "direct", durable=True)
        self.channel.basic_consume(names.DIRECT_REPLY_TO, self._on_reply, auto_ack=True)
        self.replies: dict[str, tuple[float, dict]] = {}
        self.events: dict[str, list[tuple[float, float, dict]]] = {}
        if events:
            self.channel.exchange_declare(names.EVENT_EXCHANGE, "topic", durable=True)
            queue = self.channel.queue_declare("", exclusive=True, auto_delete=True).method.queue
            self.channel.queue_bind(queue, names.EVENT_EXCHANGE, routing_key=f"{manager_id}.#")
            self.channel.basic_consume(queue, self._on_event, auto_ack=True)

    def __enter__(self) -> Probe:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.connection.is_open:
            self.connection.close()

    def _on_reply(self, channel, method, properties, body: bytes) -> None:
        self.replies[properties.correlation_id] = (time.perf_counter(), json.loads(body))

    def _on_event(self, channel, method, properties, body: bytes) -> None:
        arrival = (time.perf_counter(), time.time(), json.loads(body))
        self.events.setdefault(method.routing_key, []).append(arrival)

    def send(self, command: dict) -> str:
        """Publish ``command`` (request_id added) and return its correlation id."""
        correlation_id = uuid.uuid4().hex
        body = json.dumps({**command, "request_id": correlation_id}).encode()
        self.channel.basic_publish(
            names.COMMAND_EXCHANGE,
            self.manager_id,
            body,
            pika.BasicProperties(
                content_type="application/json",
                delivery_mode=2,
                reply_to=names.DIRECT_REPLY_TO,
                correlation_id=correlation_id,
            ),
        )
        return correlation_id

    def wait_reply(self, correlation_id: str, timeout: float) -> tuple[float, dict]:
        deadline = time.perf_counter() + timeout
        while correlation_id not in self.replies:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                raise TimeoutError(f"no reply to request {correlation_id} within {timeout} s")
            self.connection.process_data_events(time_limit=min(remaining, 0.05))
        return self.replies.pop(correlation_id)

    def request(self, command: dict, timeout: float = 90.0) -> dict:
        """Send ``command`` and return its reply. Raise RuntimeError for an error reply."""
        _, reply = self.wait_reply(self.send(command), timeout)
        if not reply["ok"]:
            raise RuntimeError(f"{command['command']} failed: {reply['error']}")
        return reply

    def wait_event(self, container_id: str, event: str, timeout: float) -> tuple[float, float, dict]:
        """Return (perf_counter, wall time, body) of the first such event, waiting if needed."""
        key = names.event_routing_key(self.manager_id, container_id, event)
        deadline = time.perf_counter() + timeout
        while not self.events.get(key):
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                raise TimeoutError(f"no {event} event for {container_id} within {timeout} s")
            self.connection.process_data_events(time_limit=min(remaining, 0.05))
        return self.events[key].pop(0)

    def run_container(self, container_id: str, argv: list[str], **options) -> dict:
        """Create and start a container and return its ContainerInfo as a dict."""
        reply = self.request({"command": "run", "id": container_id, "argv": argv, **options})
        return reply["container"]

    def delete(self, container_id: str) -> None:
        self.request({"command": "delete", "id": container_id, "force": True})


# --- raw runc ----------------------------------------------------------------


class RuncPeer:
    """runc driven directly, with bundles written by berth's own bundle writer."""

    def __init__(self, base_dir: Path, peer_id: str):
        self.base_dir = base_dir
        self.root = base_dir / "runc"
        self.bundles = base_dir / "bundles"
        self.peer_id = peer_id
        self.root.mkdir(parents=True, exist_ok=True)
        self.bundles.mkdir(parents=True, exist_ok=True)

    def command(self, *args: str) -> list[str]:
        return ["runc", "--root", str(self.root), *args]

    def write_bundle(self, container_id: str, argv: list[str], init: bool = True) -> Path:
        spec = CreateSpec(id=container_id, argv=argv, init=init)
        path = self.bundles / container_id
        bundle.write_bundle(
            path,
            spec,
            bundle.cgroups_path(self.peer_id, container_id),
            init_binary=INIT_BINARY if init else None,
        )
        return path

    def create(self, container_id: str, bundle_dir: Path) -> int:
        """Run ``runc create`` with output to /dev/null and return the init pid."""
        pid_file = self.bundles / f"{container_id}.pid"
        self._run("create", "--bundle", str(bundle_dir), "--pid-file", str(pid_file), container_id)
        return int(pid_file.read_text())

    def start(self, container_id: str) -> None:
        self._run("start", container_id)

    def kill(self, container_id: str, signal_name: str) -> None:
        self._run("kill", container_id, signal_name)

    def delete(self, container_id: str, force: bool = False) -> None:
        self._run("delete", *(["--force"] if force else []), container_id)

    def remove_bundle(self, container_id: str) -> None:
        bundle.remove_bundle(self.bundles / container_id)
        (self.bundles / f"{container_id}.pid").unlink(missing_ok=True)

    def _run(self, *args: str) -> None:
        # runc create hands its stdout and stderr to the container, so a pipe
        # would stay open as long as the workload runs. Errors go to a file.
        with tempfile.TemporaryFile() as error_output:
            status = wait_blocking(
                subprocess.Popen(
                    self.command(*args),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=error_output,
                )
            )
            if status != 0:
                error_output.seek(0)
                error = error_output.read().decode(errors="replace").strip()
                raise RuntimeError(f"runc {' '.join(args)} failed with status {status}: {error}")

    def cleanup(self) -> None:
        self.delete_all(self.root)
        shutil.rmtree(self.bundles, ignore_errors=True)
        remove_cgroup_parents(f"/berth/{self.peer_id}")

    @staticmethod
    def delete_all(root: Path) -> None:
        if not root.exists():
            return
        listed = run_quiet(["runc", "--root", str(root), "list", "--format", "json"])
        for entry in json.loads(listed.stdout or b"null") or []:
            run_quiet(["runc", "--root", str(root), "delete", "--force", entry["id"]])


def wait_blocking(process: subprocess.Popen, timeout: float = COMMAND_TIMEOUT) -> int:
    """Wait for ``process`` with a blocking waitpid, and SIGKILL it after ``timeout`` s.

    ``Popen.wait(timeout=...)`` polls with growing sleeps (up to 50 ms) and
    so rounds short runs up. A watchdog timer keeps this wait blocking.
    """
    watchdog = threading.Timer(timeout, process.kill)
    watchdog.daemon = True
    watchdog.start()
    try:
        return process.wait()
    finally:
        watchdog.cancel()


def wait_for_child(pid: int, timeout: float = 2.0) -> bool:
    """Wait until ``pid`` (an init such as tini) has forked its workload."""
    deadline = time.perf_counter() + timeout
    while not children_of(pid):
        if time.perf_counter() > deadline:
            return False
        time.sleep(0.0002)
    return True


# --- podman --------------------------------------------------------------------


CONTAINERS_CONF = """\
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=4096:4096"]
netns = "none"

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "none"
"""
"""podman 4.3 runs on this kind of host only with runc, cgroupfs and
ulimits below the hard limits (nofile 20000 here); its defaults exceed them."""


class Podman:
    """podman with its own storage, run root and configuration in a temporary directory.

    No image registry is reachable, so containers run with ``--rootfs`` on a
    directory that binds the host's /usr read-only, like berth's default root.
    """

    def __init__(self):
        # podman 4.3 rejects a run root path longer than 50 characters.
        self.base_dir = Path(tempfile.mkdtemp(prefix="berth-podman-", dir="/tmp"))
        base_dir = self.base_dir
        self.binary = shutil.which("podman")
        self.rootfs = base_dir / "rootfs"
        self.conf = base_dir / "containers.conf"
        self.unusable_reason: str | None = None
        if self.binary is None:
            self.unusable_reason = "podman is not installed (apt-get install podman)"
            return
        base_dir.mkdir(parents=True, exist_ok=True)
        self.conf.write_text(CONTAINERS_CONF)
        for name in ("usr", "etc", "tmp", "proc", "dev", "sys"):
            (self.rootfs / name).mkdir(parents=True, exist_ok=True)
        for name in ("bin", "lib", "lib64", "sbin"):
            host = Path("/") / name
            if host.is_symlink() and not (self.rootfs / name).is_symlink():
                os.symlink(os.readlink(host), self.rootfs / name)
        bundle.write_etc(self.rootfs / "etc", "bench")
        probe = run_quiet(
            self.command("run", "--rm", *self.run_options(), "true"), env=self.environment()
        )
        if probe.returncode != 0:
            self.unusable_reason = f"podman run failed: {probe.stderr.decode(errors='replace')}"

    @property
    def usable(self) -> bool:
        return self.unusable_reason is None

    def command(self, *args: str) -> list[str]:
        return [
            self.binary,
            "--root", str(self.base_dir / "storage"),
            "--runroot", str(self.base_dir / "run"),
            "--tmpdir", str(self.base_dir / "tmp"),
            "--storage-driver", "vfs",
            *args,
        ]

    def run_options(self) -> list[str]:
        return [
            "--network", "none",
            "--init", "--init-path", INIT_BINARY,
            "-v", "/usr:/usr:ro",
            "--rootfs", str(self.rootfs),
        ]

    def environment(self) -> dict[str, str]:
        return {**os.environ, "CONTAINERS_CONF": str(self.conf)}

    def timed(self, *args: str) -> float:
        """Run one podman command and return its wall time in seconds."""
        with tempfile.TemporaryFile() as error_output:
            started = time.perf_counter()
            status = wait_blocking(
                subprocess.Popen(
                    self.command(*args),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=error_output,
                    env=self.environment(),
                )
            )
            elapsed = time.perf_counter() - started
            if status != 0:
                error_output.seek(0)
                error = error_output.read().decode(errors="replace").strip()
                raise RuntimeError(f"podman {' '.join(args)} failed with status {status}: {error}")
        return elapsed

    def run_detached(self, name: str, argv: list[str]) -> float:
        """Run ``podman run -d`` and return the seconds until podman reports the container started."""
        # run_options() ends with "--rootfs PATH", because podman takes the
        # first argument after the options as the root path.
        return self.timed("run", "-d", "--name", name, *self.run_options(), *argv)

    def remove_all(self) -> None:
        if self.usable:
            run_quiet(self.command("rm", "--all", "--force", "--time", "0"), timeout=300,
                      env=self.environment())

    def cleanup(self) -> None:
        self.remove_all()
        # Each conmon runs "podman container cleanup" after its container
        # exits, which recreates directories here, so wait for those first.
        marker = str(self.base_dir).encode()
        if not wait_until(lambda: not pids_matching(marker), timeout=30.0):
            log.warning("podman processes for %s still run after 30 s", self.base_dir)
        shutil.rmtree(self.base_dir, ignore_errors=True)


# --- log timestamps -------------------------------------------------------------


def log_times(path: Path, *needles: str) -> list[float]:
    """Return the wall times (epoch seconds) of log lines containing every needle.

    The manager and assistant log with logging's default asctime,
    ``YYYY-MM-DD HH:MM:SS,mmm`` in local time, so the resolution is 1 ms.
    """
    times = []
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return times
    for line in lines:
        if all(needle in line for needle in needles):
            try:
                stamp = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
            except ValueError:
                continue
            times.append(stamp.timestamp())
    return times


def wait_until(predicate, timeout: float, interval: float = 0.05) -> bool:
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def parallel(count: int, target, *args) -> list:
    """Run ``target(index, *args)`` on ``count`` threads and return their results.

    The first error raised in a thread is raised again here.
    """
    results: list = [None] * count
    errors: list[BaseException] = []

    def work(index: int) -> None:
        try:
            results[index] = target(index, *args)
        except BaseException as exc:  # handed to the caller below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(index,)) for index in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results
