"""A manager process for tests, and checks that nothing was left behind."""

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from assistant.cgroups import cgroup_dirs
from assistant.runtime import Runc
from manager.network import remove_manager_network
from messages.client import Client, ClientError

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parent.parent


class ManagerProcess:
    """One ``python -m manager`` child with its own state and runc root."""

    def __init__(
        self,
        amqp_url: str,
        manager_id: str,
        base_dir: Path,
        heartbeat_interval: float = 0.5,
        heartbeat_timeout: float = 10.0,
        lost_after: float = 3.0,
        adopt_window: float = 0.0,
        environment: dict[str, str] | None = None,
        extra_args: tuple[str, ...] = (),
    ):
        self.amqp_url = amqp_url
        self.manager_id = manager_id
        self.base_dir = base_dir
        self.state_dir = base_dir / "state"
        self.runc_root = base_dir / "runc"
        self.log_path = base_dir / "manager.log"
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_timeout = heartbeat_timeout
        self.lost_after = lost_after
        self.adopt_window = adopt_window
        self.environment = environment or {}
        self.extra_args = extra_args
        self.process: subprocess.Popen | None = None

    @property
    def containers_dir(self) -> Path:
        return self.state_dir / self.manager_id / "containers"

    @property
    def runc(self) -> Runc:
        return Runc("runc", self.runc_root / self.manager_id)

    def launch(self) -> subprocess.Popen:
        """Start the manager process without waiting until it serves."""
        self.base_dir.mkdir(parents=True, exist_ok=True)
        command = [
            sys.executable,
            "-m",
            "manager",
            "--amqp-url",
            self.amqp_url,
            "--id",
            self.manager_id,
            "--state-dir",
            str(self.state_dir),
            "--runc-root",
            str(self.runc_root),
            "--heartbeat-interval",
            str(self.heartbeat_interval),
            "--heartbeat-timeout",
            str(self.heartbeat_timeout),
            "--lost-after",
            str(self.lost_after),
            "--adopt-window",
            str(self.adopt_window),
            "--log-level",
            "DEBUG",
            *self.extra_args,
        ]
        with open(self.log_path, "ab") as output:
            self.process = subprocess.Popen(
                command,
                cwd=PROJECT_ROOT,
                stdout=output,
                stderr=output,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **self.environment},
            )
        return self.process

    def start(self, timeout: float = 30.0) -> None:
        self.launch()
        self.wait_ready(timeout)

    def wait_ready(self, timeout: float) -> None:
        """Wait until the manager replies to a list command."""
        deadline = time.monotonic() + timeout
        while True:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(
                    f"manager exited with {self.process.returncode}: {self.log_tail()}"
                )
            try:
                with Client(self.amqp_url, self.manager_id, timeout=2.0) as client:
                    client.request({"command": "list"})
                return
            except ClientError:
                if time.monotonic() > deadline:
                    raise AssertionError(f"manager not ready after {timeout} s: {self.log_tail()}")
                time.sleep(0.2)

    def client(self, timeout: float = 60.0) -> Client:
        return Client(self.amqp_url, self.manager_id, timeout=timeout)

    def kill(self) -> None:
        """SIGKILL the manager, as a crash would."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def stop(self) -> int | None:
        """SIGTERM the manager and wait for it; SIGKILL after 40 s."""
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(40)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait(10)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def assistant_pids(self) -> list[int]:
        """Pids of live assistants started by this manager, found in /proc."""
        marker = str(self.containers_dir).encode()
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                command_line = (entry / "cmdline").read_bytes()
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if b"assistant" in command_line and marker in command_line and state != "Z":
                pids.append(int(entry.name))
        return pids

    def cleanup(self) -> None:
        """Stop the manager, end its assistants, remove runc state and network.

        Every process ended here was started by this test's manager.
        """
        self.stop()
        for pid in self.assistant_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        root = self.runc_root / self.manager_id
        if root.exists():
            for container_id in self.runc.list_ids():
                subprocess.run(
                    ["runc", "--root", str(root), "delete", "--force", container_id],
                    check=False,
                    capture_output=True,
                )
        remove_manager_network(self.manager_id)  # bridge, veths and namespaces
        remove_manager_cgroups(self.manager_id)


def remove_manager_cgroups(manager_id: str) -> None:
    """Remove the manager's parent cgroups, which runc delete leaves behind."""
    for directory in cgroup_dirs(f"/berth/{manager_id}"):
        try:
            directory.rmdir()
        except OSError as exc:
            log.warning("cannot remove cgroup %s: %s", directory, exc)


def wait_until(predicate, timeout: float, interval: float = 0.1) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def zombie_children(parent_pid: int) -> list[int]:
    zombies = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] == "Z" and int(fields[1]) == parent_pid:
            zombies.append(int(entry.name))
    return zombies
