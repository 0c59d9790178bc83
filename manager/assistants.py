"""Starting assistant processes and noticing when they end.

An assistant runs in a session of its own, so a signal to the manager's
process group (Ctrl-C, a service stop) never reaches it, and it outlives
the manager. While the manager runs it is the assistant's parent and must
reap it; after a manager restart the old assistants belong to someone
else, and the manager can only check whether their pid is still theirs.
"""

import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from assistant.config import AssistantConfig, ContainerPaths

log = logging.getLogger(__name__)

# The directory holding the assistant package, so the child imports the
# same code as the manager whether or not berth is installed.
PROJECT_ROOT = Path(__file__).resolve().parent.parent


class Assistants:
    """Thread-safe registry of assistant processes by container id."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._children: dict[str, subprocess.Popen] = {}

    def spawn(self, config: AssistantConfig) -> int:
        paths = ContainerPaths(config.container_dir)
        paths.config.write_text(config.model_dump_json())
        os.chmod(paths.config, 0o600)  # it holds the broker credentials
        environment = dict(os.environ)
        environment["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(PROJECT_ROOT), environment.get("PYTHONPATH")])
        )
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

    def reap(self) -> dict[str, int]:
        """Collect ended children; return their exit status by container id."""
        ended = {}
        with self._lock:
            for container_id, child in list(self._children.items()):
                status = child.poll()
                if status is not None:
                    ended[container_id] = status
                    del self._children[container_id]
        for container_id, status in ended.items():
            log.info("container %s: assistant ended with status %d", container_id, status)
        return ended

    def is_alive(self, container_id: str, pid: int | None, container_dir: Path) -> bool:
        """Tell whether the assistant of a container still runs.

        For an assistant from an earlier manager run, the pid alone could
        belong to a new process, so its command line must name the
        container directory.
        """
        with self._lock:
            child = self._children.get(container_id)
        if child is not None:
            return child.poll() is None
        if pid is None:
            return False
        try:
            command_line = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            with open(f"/proc/{pid}/stat") as stat:
                zombie = stat.read().rsplit(")", 1)[1].split()[0] == "Z"
        except OSError:
            return False
        return not zombie and b"assistant" in command_line and str(container_dir).encode() in command_line

    def kill(self, container_id: str, pid: int | None, container_dir: Path) -> None:
        """SIGKILL an assistant that stopped answering."""
        if pid is None or not self.is_alive(container_id, pid, container_dir):
            return
        log.warning("container %s: killing assistant %d", container_id, pid)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
