"""Starting assistant processes and noticing when they end.

An assistant runs in a session of its own, so a signal to the manager's
process group (Ctrl-C, a service stop) never reaches it, and it outlives
the manager. By default the assistant fork server (assistant/zygote.py)
forks it and reaps it; with spawn mode "exec", or when the fork server
fails, the manager starts it as a new interpreter and reaps it itself.
After a manager restart the old assistants belong to someone else, and
the manager can only check whether their pid is still theirs.
"""

import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from assistant.config import AssistantConfig, ContainerPaths
from manager.zygote import Zygote, ZygoteError

log = logging.getLogger(__name__)

# The directory holding the assistant package, so the child imports the
# same code as the manager whether or not berth is installed.
PROJECT_ROOT = Path(__file__).resolve().parent.parent


def _environment() -> dict[str, str]:
    environment = dict(os.environ)
    environment["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(PROJECT_ROOT), environment.get("PYTHONPATH")])
    )
    return environment


class Assistants:
    """Thread-safe registry of assistant processes by container id."""

    def __init__(self, manager_dir: Path | None = None, spawn_mode: str = "fork") -> None:
        self._lock = threading.Lock()
        self._children: dict[str, subprocess.Popen] = {}
        self._forked: dict[str, int] = {}
        self._zygote: Zygote | None = None
        if spawn_mode == "fork" and manager_dir is not None:
            self._zygote = Zygote(manager_dir / "zygote.log", _environment(), PROJECT_ROOT)

    def close(self) -> None:
        if self._zygote is not None:
            self._zygote.close()

    def spawn(self, config: AssistantConfig) -> int:
        paths = ContainerPaths(config.container_dir)
        paths.config.write_text(config.model_dump_json())
        os.chmod(paths.config, 0o600)  # it contains the broker credentials
        if self._zygote is not None:
            try:
                pid = self._zygote.fork(config.container_dir)
            except ZygoteError as exc:
                log.warning(
                    "container %s: %s; starting its assistant with exec instead",
                    config.container_id,
                    exc,
                )
            else:
                with self._lock:
                    self._forked[config.container_id] = pid
                log.info("container %s: assistant %d forked", config.container_id, pid)
                return pid
        return self._exec(config, paths)

    def _exec(self, config: AssistantConfig, paths: ContainerPaths) -> int:
        environment = _environment()
        with open(paths.assistant_log, "ab") as output:
            # sys.executable is the interpreter's real path: a version
            # manager's shim would add tens of milliseconds per container.
            child = subprocess.Popen(
                [sys.executable, "-m", "assistant", str(config.container_dir)],
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=output,
                cwd=config.container_dir,
                env=environment,
                start_new_session=True,
                close_fds=True,
            )
        with self._lock:
            self._children[config.container_id] = child
        log.info("container %s: assistant %d started", config.container_id, child.pid)
        return child.pid

    def reap(self) -> list[str]:
        """Collect ended assistants; return their container ids.

        Children started with exec are reaped here; forked ones are reaped
        by the fork server, and only their end is noticed here.
        """
        ended = []
        with self._lock:
            for container_id, child in list(self._children.items()):
                status = child.poll()
                if status is not None:
                    log.info("container %s: assistant ended with status %d", container_id, status)
                    ended.append(container_id)
                    del self._children[container_id]
            for container_id, pid in list(self._forked.items()):
                if not self._zygote_child_alive(pid):
                    log.info("container %s: assistant %d ended", container_id, pid)
                    ended.append(container_id)
                    del self._forked[container_id]
        return ended

    def reaped_alive(self, container_id: str, pid: int | None) -> bool:
        """Tell whether the last :meth:`reap` found this forked assistant alive.

        Saves a second read of /proc per container and check.
        """
        with self._lock:
            return pid is not None and self._forked.get(container_id) == pid

    def _zygote_child_alive(self, pid: int) -> bool:
        return self._zygote is not None and self._zygote.is_child(pid)

    def is_alive(self, container_id: str, pid: int | None, container_dir: Path) -> bool:
        """Tell whether the assistant of a container still runs.

        For an assistant from an earlier manager run, the pid alone could
        belong to a new process, so its command line must name the
        container directory.
        """
        with self._lock:
            child = self._children.get(container_id)
            forked = self._forked.get(container_id)
        if child is not None:
            return child.poll() is None
        if pid is None:
            return False
        if forked == pid and self._zygote_child_alive(pid):
            # Checked by parent pid: a child just forked may not have set its
            # command line yet.
            return True
        try:
            # An exec'd assistant has one argument per NUL-separated word;
            # a forked one has its title set as one string. Both contain
            # "-m assistant" and the container directory.
            command_line = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
            with open(f"/proc/{pid}/stat") as stat:
                zombie = stat.read().rsplit(")", 1)[1].split()[0] == "Z"
        except OSError:
            return False
        words = command_line.split()
        return not zombie and b"assistant" in words and str(container_dir).encode() in words

    def kill(self, container_id: str, pid: int | None, container_dir: Path) -> None:
        """SIGKILL an assistant that stopped responding."""
        if pid is None or not self.is_alive(container_id, pid, container_dir):
            return
        log.warning("container %s: killing assistant %d", container_id, pid)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
