"""The manager's side of the assistant fork server (assistant/zygote.py)."""

import logging
import subprocess
import sys
import threading
from pathlib import Path

log = logging.getLogger(__name__)


class ZygoteError(Exception):
    """The fork server could not start an assistant."""


class Zygote:
    """Thread-safe handle on one fork server process, started on first use."""

    def __init__(self, log_path: Path, environment: dict[str, str], cwd: Path):
        self.log_path = log_path
        self.environment = environment
        self.cwd = cwd
        self._lock = threading.Lock()
        self._process: subprocess.Popen | None = None

    @property
    def pid(self) -> int | None:
        process = self._process
        return process.pid if process is not None and process.poll() is None else None

    def _start(self) -> subprocess.Popen:
        with open(self.log_path, "ab") as output:
            process = subprocess.Popen(
                [sys.executable, "-m", "assistant.zygote"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=output,
                cwd=self.cwd,
                env=self.environment,
                start_new_session=True,
                text=True,
                bufsize=1,
            )
        log.info("assistant zygote %d started", process.pid)
        return process

    def fork(self, container_dir: Path) -> int:
        """Return the pid of a new assistant for ``container_dir``."""
        with self._lock:
            for attempt in (1, 2):
                if self._process is None or self._process.poll() is not None:
                    self._process = self._start()
                try:
                    self._process.stdin.write(f"{container_dir}\n")
                    self._process.stdin.flush()
                    answer = self._process.stdout.readline().strip()
                except OSError as exc:
                    answer = f"error {exc}"
                if answer.isdigit():
                    return int(answer)
                if answer:
                    raise ZygoteError(f"the assistant fork server could not fork: {answer}")
                # EOF: the fork server died; start a new one once.
                log.warning("assistant zygote %d exited; starting a new one", self._process.pid)
                self._process = None
            raise ZygoteError("the assistant fork server exited twice in a row")

    def close(self) -> None:
        """Tell the fork server to stop; it exits once its assistants have."""
        with self._lock:
            if self._process is not None and self._process.stdin is not None:
                try:
                    self._process.stdin.close()
                except OSError:
                    pass

    def is_child(self, pid: int) -> bool:
        """Tell whether ``pid`` is a live assistant forked by this server."""
        zygote = self.pid
        if zygote is None:
            return False
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return False
        return fields[0] != "Z" and int(fields[1]) == zygote
