"""A thin wrapper around the runc command line.

Every runc call goes through :class:`Runc`, which holds ``children_lock``
while the child runs. The assistant's orphan reaper takes the same lock
before calling ``waitpid(-1)``, so it can never collect the exit status of
a runc process that ``subprocess`` is waiting for; if it did, subprocess
would report status 0 and a failed ``runc create`` would look successful.
"""

import json
import logging
import subprocess
import threading
from pathlib import Path

log = logging.getLogger(__name__)

children_lock = threading.Lock()

RUNC_TIMEOUT = 60.0
"""Seconds one runc call may take; create on a loaded host takes well under 1 s."""


class RuncError(RuntimeError):
    """A runc command failed; the message carries runc's own error text."""

    def __init__(self, args: list[str], status: int, text: str):
        self.status = status
        self.text = text.strip()
        super().__init__(
            f"runc {' '.join(args)} failed with status {status}: {self.text or '(no output)'}"
        )


class Runc:
    def __init__(self, binary: str, root: Path, log_file: Path | None = None):
        self.binary = binary
        self.root = root
        # runc writes errors to its --log file (JSON) and to stderr. For
        # create, stderr belongs to the workload, so the log file is where
        # the assistant reads runc's error text from.
        self.log_file = log_file

    def _command(self, args: list[str]) -> list[str]:
        command = [self.binary, "--root", str(self.root)]
        if self.log_file is not None:
            command += ["--log", str(self.log_file), "--log-format", "json"]
        return command + args

    def run(
        self,
        args: list[str],
        stdout: int | None = None,
        stderr: int | None = None,
    ) -> str:
        """Run one runc command; return its stdout or raise RuncError."""
        capture = stdout is None
        log.debug("runc %s", " ".join(args))
        with children_lock:
            result = subprocess.run(
                self._command(args),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE if capture else stdout,
                stderr=subprocess.PIPE if stderr is None else stderr,
                timeout=RUNC_TIMEOUT,
                check=False,
            )
        if result.returncode != 0:
            text = result.stderr.decode(errors="replace") if stderr is None else ""
            raise RuncError(args, result.returncode, text or self._last_log_error())
        return result.stdout.decode(errors="replace") if capture else ""

    def _last_log_error(self) -> str:
        if self.log_file is None or not self.log_file.exists():
            return ""
        message = ""
        for line in self.log_file.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("level") in ("error", "fatal"):
                message = record.get("msg", "")
        return message

    def create(
        self, container_id: str, bundle: Path, pid_file: Path, stdout: int, stderr: int
    ) -> int:
        """Create the container (its init waits for start); return the init pid."""
        self.run(
            ["create", "--bundle", str(bundle), "--pid-file", str(pid_file), container_id],
            stdout=stdout,
            stderr=stderr,
        )
        return int(pid_file.read_text().strip())

    def start(self, container_id: str) -> None:
        self.run(["start", container_id])

    def kill(self, container_id: str, signal: str, all_processes: bool = False) -> None:
        args = ["kill"] + (["--all"] if all_processes else []) + [container_id, signal]
        self.run(args)

    def delete(self, container_id: str) -> None:
        """Remove the container's runc state and cgroup, killing what is left."""
        self.run(["delete", "--force", container_id])

    def state(self, container_id: str) -> dict | None:
        """Return ``runc state`` as a dict, or None when runc does not know the id."""
        try:
            return json.loads(self.run(["state", container_id]))
        except RuncError as exc:
            if "does not exist" in exc.text or "not exist" in exc.text:
                return None
            raise

    def list_ids(self) -> list[str]:
        output = self.run(["list", "--format", "json"])
        return [entry["id"] for entry in json.loads(output or "null") or []]
