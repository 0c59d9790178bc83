"""Start and stop a private RabbitMQ node for tests and local runs.

A ``PrivateNode`` runs the ``rabbitmq-server`` of the Debian package (or of
the generic Unix tarball, whose scripts have the same layout) with all of its
state in one directory: Mnesia data, logs, Erlang cookie, configuration and a
``node.json`` state file. The node enables no plugins. Its AMQP listener,
its Erlang distribution listener and its private epmd listen only on
127.0.0.1, each on a free port. Several nodes can therefore run side by side
and next to a system-wide broker.

When run as root, the server, its epmd and ``rabbitmqctl`` run as the
``rabbitmq`` user (as the Debian wrapper script does), so the node directory
is handed to that user. Other users run everything as themselves.

Command line::

    python -m deploy.rabbitmq start DIR   # prints the AMQP URL, leaves the node running
    python -m deploy.rabbitmq stop DIR
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import logging
import os
import pathlib
import pwd
import re
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from types import TracebackType
from typing import IO

logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
SERVER_USER = "rabbitmq"
STATE_FILE_NAME = "node.json"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
COOKIE_PATTERN = re.compile(r"^[A-Za-z0-9]{1,255}$")

# By default the Erlang distribution listener binds to all interfaces. This
# kernel setting binds the server's and rabbitmqctl's listener to loopback.
LOOPBACK_DIST_ERL_ARGS = "-kernel inet_dist_use_interface {127,0,0,1}"

# Environment variables that the RabbitMQ scripts or the Erlang VM read. The
# caller's values are dropped so that they cannot redirect the private node.
INHERITED_PREFIXES_DROPPED = ("RABBITMQ_", "ERL_", "ERLANG_", "ELIXIR_")
INHERITED_NAMES_DROPPED = ("NOTIFY_SOCKET", "CONF_ENV_FILE", "HOME")

SBIN_DIRS = ("/usr/local/sbin", "/usr/sbin", "/sbin")
INSTALL_HINT = "install it with `apt-get install rabbitmq-server`"

# The Erlang VM accepts about as many connections as its soft limit on open
# files allows, and a login shell often sets that limit to 1024, which a
# thousand containers' assistants exceed. The server therefore starts with
# its soft limit raised to the hard limit. An unlimited hard limit, or a
# raise that fails, leaves the inherited soft limit in place.
RAISE_OPEN_FILES_AND_EXEC = (
    'hard=$(ulimit -H -n); [ "$hard" = unlimited ] || ulimit -S -n "$hard"; exec "$0" "$@"'
)

LOG_TAIL_LINES = 40
CTL_ERROR_OUTPUT_CHARS = 2000


class RabbitMQNodeError(RuntimeError):
    """Base class of the errors raised by this module."""


class RabbitMQNotInstalledError(RabbitMQNodeError):
    """The rabbitmq-server scripts, epmd or the server user are missing."""


class NodeStartError(RabbitMQNodeError):
    """The node exited or did not accept AMQP connections in time."""


class CtlError(RabbitMQNodeError):
    """A rabbitmqctl command failed or timed out."""

    def __init__(
        self,
        message: str,
        *,
        ctl_args: tuple[str, ...],
        returncode: int | None,
        stdout: str,
        stderr: str,
    ) -> None:
        super().__init__(message)
        self.ctl_args = ctl_args
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr


# ---------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ProcessRef:
    """A process id together with its start time in clock ticks since boot.

    The start time (field 22 of /proc/PID/stat) distinguishes a process from
    a later one that reuses its pid, so a stale state file does not lead to a
    signal for an unrelated process.
    """

    pid: int
    start_time: int

    @classmethod
    def of(cls, pid: int) -> ProcessRef | None:
        stat_fields = _read_proc_stat(pid)
        if stat_fields is None:
            return None
        return cls(pid, int(stat_fields[19]))

    def is_alive(self) -> bool:
        """Return True while the process runs. A zombie counts as exited."""
        stat_fields = _read_proc_stat(self.pid)
        if stat_fields is None:
            return False
        if int(stat_fields[19]) != self.start_time:
            return False
        return stat_fields[0] not in ("Z", "X")

    def send_signal(self, signum: int) -> bool:
        """Send ``signum`` if the process still runs, and return whether it was sent."""
        if not self.is_alive():
            return False
        try:
            os.kill(self.pid, signum)
        except ProcessLookupError:
            return False
        return True


def _read_proc_stat(pid: int) -> list[str] | None:
    """Return the fields of /proc/PID/stat after the command name, or None."""
    try:
        text = pathlib.Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name is in parentheses and may itself contain spaces or
    # parentheses, so split after its last closing parenthesis.
    return text[text.rindex(")") + 2 :].split()


def _descendants(root_pid: int) -> list[ProcessRef]:
    """Return the running descendants of ``root_pid``, found through /proc."""
    children: dict[int, list[int]] = {}
    for entry in pathlib.Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        stat_fields = _read_proc_stat(int(entry.name))
        if stat_fields is None:
            continue
        children.setdefault(int(stat_fields[1]), []).append(int(entry.name))

    found: list[ProcessRef] = []
    pending = list(children.get(root_pid, []))
    while pending:
        pid = pending.pop()
        ref = ProcessRef.of(pid)
        if ref is not None:
            found.append(ref)
        pending.extend(children.get(pid, []))
    return found


def _wait_for_exit(refs: list[ProcessRef], deadline: float) -> list[ProcessRef]:
    """Poll until every process has exited or the deadline passes, and return the survivors."""
    while True:
        survivors = [ref for ref in refs if ref.is_alive()]
        if not survivors or time.monotonic() >= deadline:
            return survivors
        time.sleep(0.05)


def _kill(refs: list[ProcessRef], what: str) -> None:
    """Send SIGKILL and wait up to 5 s. Raise RabbitMQNodeError if a process still runs."""
    for ref in refs:
        ref.send_signal(signal.SIGKILL)
    still_alive = _wait_for_exit(refs, time.monotonic() + 5.0)
    if still_alive:
        pids = ", ".join(str(ref.pid) for ref in still_alive)
        raise RabbitMQNodeError(f"{what} (pid {pids}) is still running after SIGKILL")


def _terminate(refs: list[ProcessRef], timeout: float, what: str) -> None:
    """Send SIGTERM, wait up to ``timeout`` seconds, then SIGKILL the survivors."""
    for ref in refs:
        ref.send_signal(signal.SIGTERM)
    survivors = _wait_for_exit(refs, time.monotonic() + timeout)
    if survivors:
        pids = ", ".join(str(ref.pid) for ref in survivors)
        logger.warning("%s (pid %s) ran %.0f s after SIGTERM, sending SIGKILL", what, pids, timeout)
        _kill(survivors, what)


# ---------------------------------------------------------------------------
# Installation, ports and files
# ---------------------------------------------------------------------------


def find_scripts_dir() -> pathlib.Path:
    """Return the directory that contains the real rabbitmq-server and rabbitmqctl scripts.

    Debian installs /usr/sbin/rabbitmq-server as a symlink to a wrapper that
    switches to the rabbitmq user through ``su``, which sets HOME to
    /var/lib/rabbitmq and so shares the system node's Erlang cookie. This
    module switches the user itself and runs the scripts next to that wrapper
    (/usr/lib/rabbitmq/bin) directly.
    """
    search_path = os.pathsep.join([os.environ.get("PATH", ""), *SBIN_DIRS])
    server = shutil.which("rabbitmq-server", path=search_path)
    if server is None:
        raise RabbitMQNotInstalledError(
            f"rabbitmq-server was not found in PATH or {', '.join(SBIN_DIRS)}: {INSTALL_HINT}"
        )

    scripts_dir = pathlib.Path(server).resolve().parent
    for script in ("rabbitmq-server", "rabbitmqctl", "rabbitmq-env"):
        if not (scripts_dir / script).is_file():
            raise RabbitMQNotInstalledError(
                f"{scripts_dir / script} is missing, so the RabbitMQ installation that provides "
                f"{server} is incomplete: {INSTALL_HINT}"
            )
    return scripts_dir


def _find_epmd() -> str:
    epmd = shutil.which("epmd")
    if epmd is None:
        raise RabbitMQNotInstalledError(
            f"epmd (Erlang's port mapper) was not found in PATH: {INSTALL_HINT}"
        )
    return epmd


def _free_loopback_ports(count: int) -> list[int]:
    """Return ``count`` distinct TCP ports that are free on 127.0.0.1 right now.

    The sockets are closed before the ports are used, so another process can
    take one in between. That race fails the start with an address-in-use
    error in the node's log rather than sharing a port.
    """
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind((LOOPBACK, 0))
            ports.append(sock.getsockname()[1])
        return ports


def _port_accepts(port: int) -> bool:
    try:
        with socket.create_connection((LOOPBACK, port), timeout=1.0):
            return True
    except OSError:
        return False


def _epmd_names(port: int) -> list[str] | None:
    """Return the node names registered with the epmd on ``port``, or None if it does not respond.

    Sends the epmd NAMES_REQ request: a 2-byte length, then the byte 110. The
    reply is the 4-byte epmd port followed by lines "name NAME at port N".
    """
    try:
        with socket.create_connection((LOOPBACK, port), timeout=2.0) as sock:
            sock.sendall(b"\x00\x01n")
            chunks = []
            while chunk := sock.recv(4096):
                chunks.append(chunk)
    except OSError:
        return None
    text = b"".join(chunks)[4:].decode("utf-8", "replace")
    return re.findall(r"^name (\S+) at port \d+$", text, flags=re.MULTILINE)


def tail(path: pathlib.Path, lines: int = LOG_TAIL_LINES) -> str:
    """Return the last ``lines`` lines of a text file, or a note that it does not exist."""
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return f"({path} does not exist)"
    return "\n".join(text.splitlines()[-lines:])


def _check_reachable(directory: pathlib.Path, uid: int, gids: set[int]) -> None:
    """Raise unless a process with ``uid`` and ``gids`` can enter every parent of ``directory``."""
    for parent in reversed(directory.parents):
        mode = parent.stat()
        if mode.st_uid == uid:
            allowed = mode.st_mode & stat.S_IXUSR
        elif mode.st_gid in gids:
            allowed = mode.st_mode & stat.S_IXGRP
        else:
            allowed = mode.st_mode & stat.S_IXOTH
        if not allowed:
            raise RabbitMQNodeError(
                f"the {SERVER_USER} user cannot enter {parent} "
                f"(mode {stat.filemode(mode.st_mode)}), so it cannot reach the node directory "
                f"{directory}: choose a directory outside {parent}, "
                "for example one made by tempfile.mkdtemp() under /tmp"
            )


# ---------------------------------------------------------------------------
# PrivateNode
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerUser:
    """The account that the server, epmd and rabbitmqctl run as."""

    uid: int
    gid: int
    groups: frozenset[int]

    @classmethod
    def for_current_process(cls) -> ServerUser | None:
        """Return the rabbitmq account if this process runs as root.

        Returns None otherwise, and the node then runs as the current user.
        """
        if os.geteuid() != 0:
            return None
        try:
            entry = pwd.getpwnam(SERVER_USER)
        except KeyError:
            raise RabbitMQNotInstalledError(
                f"user {SERVER_USER!r} not found (the rabbitmq-server package creates it): "
                f"{INSTALL_HINT}"
            ) from None
        groups = frozenset(os.getgrouplist(SERVER_USER, entry.pw_gid))
        return cls(entry.pw_uid, entry.pw_gid, groups)

    def popen_kwargs(self) -> dict[str, object]:
        return {"user": self.uid, "group": self.gid, "extra_groups": sorted(self.groups)}


class PrivateNode:
    """A RabbitMQ node with its own directory, ports, epmd and Erlang cookie.

    ``start`` returns the AMQP URL, ``stop`` ends every process that
    ``start`` created. The directory keeps the data between a stop and the
    next start under the same name.

    By default the node gets a random Erlang cookie and starts its own epmd.
    Nodes that form a cluster must share both, so ``PrivateCluster`` passes
    ``cookie`` and the port of an epmd that it runs as ``epmd_port``. Such a
    node neither starts nor stops an epmd.
    """

    def __init__(
        self,
        base_dir: pathlib.Path,
        name: str | None = None,
        *,
        cookie: str | None = None,
        epmd_port: int | None = None,
    ) -> None:
        if cookie is not None and not COOKIE_PATTERN.match(cookie):
            raise ValueError("invalid Erlang cookie: use 1 to 255 letters or digits")
        if name is None:
            name = "berth-" + secrets.token_hex(3)
        if not NAME_PATTERN.match(name):
            raise ValueError(f"invalid node name {name!r}: use 1 to 64 letters, digits, '_' or '-'")

        self.base_dir = pathlib.Path(base_dir).absolute()
        self.name = name
        self.nodename = f"{name}@localhost"
        self.url: str | None = None
        self.amqp_port: int | None = None
        self.dist_port: int | None = None
        self.epmd_port: int | None = epmd_port

        self._cookie = cookie
        self._shared_epmd_port = epmd_port
        self._server_user: ServerUser | None = None
        self._server_process: subprocess.Popen[bytes] | None = None
        self._epmd_process: subprocess.Popen[bytes] | None = None
        self._server_ref: ProcessRef | None = None
        self._beam_ref: ProcessRef | None = None
        self._epmd_ref: ProcessRef | None = None

    # -- paths -------------------------------------------------------------

    @property
    def state_file(self) -> pathlib.Path:
        return self.base_dir / STATE_FILE_NAME

    @property
    def home_dir(self) -> pathlib.Path:
        """HOME of the server and rabbitmqctl, which contains the private Erlang cookie."""
        return self.base_dir / "home"

    @property
    def mnesia_base(self) -> pathlib.Path:
        return self.base_dir / "mnesia"

    @property
    def log_dir(self) -> pathlib.Path:
        return self.base_dir / "log"

    @property
    def log_file(self) -> pathlib.Path:
        """The server's main log file."""
        return self.log_dir / f"{self.name}.log"

    @property
    def console_file(self) -> pathlib.Path:
        """Standard output and error of the rabbitmq-server script and epmd."""
        return self.log_dir / "console.log"

    @property
    def pid_file(self) -> pathlib.Path:
        """File in which the server writes the pid of its Erlang VM (beam.smp)."""
        return self.mnesia_base / f"{self.name}.pid"

    # -- state -------------------------------------------------------------

    @classmethod
    def load(cls, base_dir: pathlib.Path) -> PrivateNode:
        """Return the node described by the state file that ``start`` wrote in ``base_dir``."""
        state_file = pathlib.Path(base_dir) / STATE_FILE_NAME
        try:
            state = json.loads(state_file.read_text())
        except FileNotFoundError:
            raise RabbitMQNodeError(
                f"no running node is recorded in {base_dir}: {state_file} does not exist"
            ) from None

        node = cls(base_dir, state["name"])
        node.amqp_port = state["amqp_port"]
        node.dist_port = state["dist_port"]
        node.epmd_port = state["epmd_port"]
        node.url = state["url"]
        node._server_ref = _ref_from_state(state.get("server"))
        node._beam_ref = _ref_from_state(state.get("beam"))
        node._epmd_ref = _ref_from_state(state.get("epmd"))
        return node

    def _write_state(self) -> None:
        state = {
            "name": self.name,
            "nodename": self.nodename,
            "url": self.url,
            "amqp_port": self.amqp_port,
            "dist_port": self.dist_port,
            "epmd_port": self.epmd_port,
            "server": _ref_to_state(self._server_ref),
            "beam": _ref_to_state(self._beam_ref),
            "epmd": _ref_to_state(self._epmd_ref),
        }
        temporary = self.state_file.with_suffix(".tmp")
        temporary.write_text(json.dumps(state, indent=2) + "\n")
        temporary.replace(self.state_file)

    def is_running(self) -> bool:
        """Return True while the server process or its Erlang VM runs."""
        refs = [self._server_ref, self._beam_ref]
        return any(ref is not None and ref.is_alive() for ref in refs)

    # -- start -------------------------------------------------------------

    def start(self, timeout: float = 90.0) -> str:
        """Start the node, block until it accepts an AMQP connection and return its URL.

        Raises RabbitMQNotInstalledError when the package is missing and
        NodeStartError (with the tail of the node's log) when the server
        exits early or does not accept a connection within ``timeout`` seconds.
        Processes started by a failed attempt are stopped again.
        """
        if self.is_running():
            raise RabbitMQNodeError(f"node {self.nodename} is already running in {self.base_dir}")
        self._reject_running_state_file()

        scripts_dir = find_scripts_dir()
        epmd = _find_epmd()
        self._server_user = ServerUser.for_current_process()
        started_at = time.monotonic()
        self._prepare_directory()
        if self._shared_epmd_port is None:
            self.amqp_port, self.dist_port, self.epmd_port = _free_loopback_ports(3)
        else:
            self.amqp_port, self.dist_port = _free_loopback_ports(2)
            self.epmd_port = self._shared_epmd_port
        self.url = f"amqp://guest:guest@{LOOPBACK}:{self.amqp_port}/%2F"
        logger.info(
            "starting RabbitMQ node %s in %s (AMQP port %d, distribution port %d, epmd port %d)",
            self.nodename,
            self.base_dir,
            self.amqp_port,
            self.dist_port,
            self.epmd_port,
        )

        try:
            if self._shared_epmd_port is None:
                self._start_epmd(epmd, deadline=started_at + timeout)
            self._start_server(scripts_dir)
            self._write_state()
            self._wait_until_ready(deadline=started_at + timeout, timeout=timeout)
            self._beam_ref = self._read_beam_ref()
            self._write_state()
        except BaseException:
            self._stop_after_failed_start()
            raise

        logger.info(
            "RabbitMQ node %s is ready after %.1f s", self.nodename, time.monotonic() - started_at
        )
        return self.url

    def _reject_running_state_file(self) -> None:
        if not self.state_file.exists():
            return
        previous = PrivateNode.load(self.base_dir)
        if previous.is_running():
            raise RabbitMQNodeError(
                f"node {previous.nodename} is already running in {self.base_dir}: "
                f"stop it with `python -m deploy.rabbitmq stop {self.base_dir}`"
            )
        # The server of the previous start has exited, but its epmd may still run.
        logger.info(
            "cleaning up after node %s, which exited without being stopped", previous.nodename
        )
        previous.stop()

    def _prepare_directory(self) -> None:
        """Create the node's directories and files and hand them to the server user."""
        for directory in (self.base_dir, self.home_dir, self.mnesia_base, self.log_dir):
            directory.mkdir(mode=0o755, parents=True, exist_ok=True)

        # An empty plugin list, so a system-wide enabled_plugins file is not read.
        (self.base_dir / "enabled_plugins").write_text("[].\n")
        # Empty files in place of /etc/rabbitmq/rabbitmq.conf and rabbitmq-env.conf.
        (self.base_dir / "rabbitmq.conf").write_text("")
        (self.base_dir / "rabbitmq-env.conf").write_text("")

        cookie = self.home_dir / ".erlang.cookie"
        if self._cookie is not None and cookie.exists() and cookie.read_text() != self._cookie:
            # The file has mode 0400, so it is replaced rather than rewritten.
            cookie.unlink()
        if not cookie.exists():
            # Erlang rejects a cookie file that others can read, hence mode 0400.
            descriptor = os.open(cookie, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
            with os.fdopen(descriptor, "w") as cookie_file:
                cookie_file.write(self._cookie or secrets.token_hex(20).upper())

        if self._server_user is not None:
            _check_reachable(self.base_dir, self._server_user.uid, set(self._server_user.groups))
            for path in [self.base_dir, *self.base_dir.rglob("*")]:
                os.lchown(path, self._server_user.uid, self._server_user.gid)

    def environment(self) -> dict[str, str]:
        """Return the environment of the server, epmd and rabbitmqctl processes."""
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(INHERITED_PREFIXES_DROPPED) and key not in INHERITED_NAMES_DROPPED
        }
        env["PATH"] = os.pathsep.join([env.get("PATH", "/usr/bin:/bin"), *SBIN_DIRS])
        # The Elixir CLI warns about a Latin-1 encoding when no UTF-8 locale is set.
        env["LC_ALL"] = "C.UTF-8"
        env.update(
            {
                "HOME": str(self.home_dir),
                "RABBITMQ_NODENAME": self.nodename,
                "RABBITMQ_NODE_IP_ADDRESS": LOOPBACK,
                "RABBITMQ_NODE_PORT": str(self.amqp_port),
                "RABBITMQ_DIST_PORT": str(self.dist_port),
                "RABBITMQ_MNESIA_BASE": str(self.mnesia_base),
                "RABBITMQ_LOG_BASE": str(self.log_dir),
                "RABBITMQ_LOGS": str(self.log_file),
                "RABBITMQ_PID_FILE": str(self.pid_file),
                "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.base_dir / "enabled_plugins"),
                "RABBITMQ_CONFIG_FILE": str(self.base_dir / "rabbitmq.conf"),
                "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.base_dir / "advanced.config"),
                "RABBITMQ_CONF_ENV_FILE": str(self.base_dir / "rabbitmq-env.conf"),
                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": LOOPBACK_DIST_ERL_ARGS,
                "RABBITMQ_CTL_ERL_ARGS": LOOPBACK_DIST_ERL_ARGS,
                "ERL_EPMD_PORT": str(self.epmd_port),
                "ERL_EPMD_ADDRESS": LOOPBACK,
            }
        )
        return env

    def _popen(self, command: list[str], output: IO[bytes]) -> subprocess.Popen[bytes]:
        user_kwargs = self._server_user.popen_kwargs() if self._server_user is not None else {}
        return subprocess.Popen(
            command,
            env=self.environment(),
            cwd=self.base_dir,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            # A new session keeps the node alive when the starting process's
            # terminal sends SIGINT or SIGHUP, which the CLI's `start` relies on.
            start_new_session=True,
            **user_kwargs,
        )

    def _start_epmd(self, epmd: str, deadline: float) -> None:
        """Start a private epmd on loopback and wait until it accepts connections.

        Erlang would otherwise start a shared epmd on port 4369 as a daemon,
        which is not a child of this process and may serve other nodes, so it
        could not be stopped safely. A private one is stopped with the node.
        """
        with self.console_file.open("ab") as console:
            self._epmd_process = self._popen(
                [epmd, "-port", str(self.epmd_port), "-address", LOOPBACK], console
            )
        self._epmd_ref = ProcessRef.of(self._epmd_process.pid)

        epmd_deadline = min(deadline, time.monotonic() + 10.0)
        while not _port_accepts(self.epmd_port):
            if self._epmd_process.poll() is not None:
                raise NodeStartError(
                    f"epmd on port {self.epmd_port} exited with code "
                    f"{self._epmd_process.returncode}. Output:\n{tail(self.console_file)}"
                )
            if time.monotonic() >= epmd_deadline:
                raise NodeStartError(
                    f"epmd did not accept connections on port {self.epmd_port} within 10 s"
                )
            time.sleep(0.02)

    def _start_server(self, scripts_dir: pathlib.Path) -> None:
        with self.console_file.open("ab") as console:
            self._server_process = self._popen(
                ["/bin/sh", "-c", RAISE_OPEN_FILES_AND_EXEC, str(scripts_dir / "rabbitmq-server")],
                console,
            )
        self._server_ref = ProcessRef.of(self._server_process.pid)

    def _wait_until_ready(self, deadline: float, timeout: float) -> None:
        """Poll until the node completes an AMQP handshake.

        Raises NodeStartError if the server exits or the deadline passes first.
        """
        assert self._server_process is not None and self.amqp_port is not None
        while True:
            if self._server_process.poll() is not None:
                raise NodeStartError(
                    f"rabbitmq-server for node {self.nodename} exited with code "
                    f"{self._server_process.returncode} before accepting connections. "
                    f"{self._log_tails()}"
                )
            # A plain TCP connect first, because pika logs every refused
            # connection at ERROR level.
            if _port_accepts(self.amqp_port) and self._amqp_handshake_succeeds():
                return
            if time.monotonic() >= deadline:
                raise NodeStartError(
                    f"RabbitMQ node {self.nodename} did not accept AMQP connections on port "
                    f"{self.amqp_port} within {timeout:.0f} s. {self._log_tails()}"
                )
            time.sleep(0.2)

    def _amqp_handshake_succeeds(self) -> bool:
        import pika  # noqa: PLC0415 - pika is needed only once the port is open
        import pika.exceptions  # noqa: PLC0415
        from pika.adapters.utils.connection_workflow import AMQPConnectorException  # noqa: PLC0415

        parameters = pika.URLParameters(
            f"{self.url}?connection_attempts=1&socket_timeout=2&stack_timeout=5"
        )
        try:
            connection = pika.BlockingConnection(parameters)
        # pika 1.4 raises AMQPConnectorStackTimeout, which is no AMQPError, when
        # the handshake does not finish within stack_timeout.
        except (pika.exceptions.AMQPError, AMQPConnectorException, OSError) as error:
            logger.debug("AMQP handshake with %s failed, retrying: %r", self.nodename, error)
            return False
        connection.close()
        return True

    def _read_beam_ref(self) -> ProcessRef | None:
        """Return the Erlang VM named by the pid file, if that process is this node's VM.

        The pid file may be left from an earlier run, and its pid reused by an
        unrelated process. The VM of this node has ``-home HOME_DIR`` in its
        command line, which the check relies on.
        """
        try:
            pid = int(self.pid_file.read_text().strip())
            command_line = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes()
        except (FileNotFoundError, ProcessLookupError, ValueError):
            return None
        if f"\0-home\0{self.home_dir}\0".encode() not in command_line:
            return None
        return ProcessRef.of(pid)

    def _log_tails(self) -> str:
        return (
            f"Last lines of {self.log_file}:\n{tail(self.log_file)}\n"
            f"Last lines of {self.console_file}:\n{tail(self.console_file)}"
        )

    # -- stop --------------------------------------------------------------

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the node, its Erlang VM and its child processes, and its private epmd.

        The server gets SIGTERM, which makes RabbitMQ shut down cleanly, and
        processes still running after ``timeout`` seconds get SIGKILL. The
        epmd is left running (with a warning) while another node is
        registered with it. Stopping a node that does not run does nothing.
        """
        deadline = time.monotonic() + timeout
        was_running = self.is_running()
        if was_running:
            logger.info("stopping RabbitMQ node %s in %s", self.nodename, self.base_dir)
        self._stop_server(deadline)
        self._stop_epmd(max(deadline - time.monotonic(), 1.0))
        self._reap_children()
        self.state_file.unlink(missing_ok=True)
        self.url = None
        if was_running:
            logger.info("RabbitMQ node %s is stopped", self.nodename)

    def _stop_after_failed_start(self) -> None:
        try:
            self._stop_server(time.monotonic() + 15.0)
            self._stop_epmd(5.0)
            self._reap_children()
        except RabbitMQNodeError:
            logger.exception("cleanup after the failed start of node %s failed", self.nodename)
        self.state_file.unlink(missing_ok=True)
        self.url = None

    def _stop_server(self, deadline: float) -> None:
        # Collect the processes first: once the server script exits, its
        # remaining children are reparented and cannot be found through it.
        processes: list[ProcessRef] = []
        if self._server_ref is not None:
            processes.append(self._server_ref)
            processes.extend(_descendants(self._server_ref.pid))
        if self._beam_ref is None and self.pid_file.exists():
            self._beam_ref = self._read_beam_ref()
        if self._beam_ref is not None and self._beam_ref not in processes:
            processes.append(self._beam_ref)
            processes.extend(_descendants(self._beam_ref.pid))

        # The rabbitmq-server script forwards SIGTERM to the VM and waits for
        # it. The VM is signalled directly too, in case the script is gone.
        for ref in (self._server_ref, self._beam_ref):
            if ref is not None:
                ref.send_signal(signal.SIGTERM)
        if self._server_process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._server_process.wait(timeout=max(deadline - time.monotonic(), 0.0))

        survivors = _wait_for_exit(processes, deadline)
        if survivors:
            pids = ", ".join(str(ref.pid) for ref in survivors)
            logger.warning(
                "processes of RabbitMQ node %s (pid %s) still run after SIGTERM, sending SIGKILL",
                self.nodename,
                pids,
            )
            _kill(survivors, f"RabbitMQ node {self.nodename}")

    def _stop_epmd(self, timeout: float) -> None:
        if self._epmd_ref is None or not self._epmd_ref.is_alive():
            return
        assert self.epmd_port is not None
        names = _epmd_names(self.epmd_port) or []
        others = [name for name in names if name != self.name]
        if others:
            logger.warning(
                "leaving epmd (pid %d, port %d) running because nodes %s are registered with it",
                self._epmd_ref.pid,
                self.epmd_port,
                ", ".join(others),
            )
            return
        _terminate([self._epmd_ref], timeout=timeout, what=f"epmd of node {self.nodename}")

    def _reap_children(self) -> None:
        """Collect the exit status of processes started by this object, so no zombie remains."""
        for process in (self._server_process, self._epmd_process):
            if process is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=1.0)

    # -- rabbitmqctl -------------------------------------------------------

    def ctl(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """Run ``rabbitmqctl -n NODE ARGS`` and return the completed process.

        Raises CtlError, whose message contains rabbitmqctl's stderr, when the
        command exits with a non-zero code or runs longer than ``timeout`` seconds.
        """
        if self.epmd_port is None:
            raise RabbitMQNodeError(
                f"node {self.nodename} was never started, so rabbitmqctl cannot reach it"
            )
        command = [str(find_scripts_dir() / "rabbitmqctl"), "-n", self.nodename, *args]
        if self._server_user is None:
            self._server_user = ServerUser.for_current_process()
        user_kwargs = self._server_user.popen_kwargs() if self._server_user is not None else {}
        logger.debug("running %s", " ".join(command))
        try:
            completed = subprocess.run(
                command,
                env=self.environment(),
                cwd=self.base_dir,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
                **user_kwargs,
            )
        except subprocess.TimeoutExpired as error:
            raise CtlError(
                f"rabbitmqctl {' '.join(args)} on node {self.nodename} timed out "
                f"after {timeout:.0f} s",
                ctl_args=args,
                returncode=None,
                stdout=_decode(error.stdout),
                stderr=_decode(error.stderr),
            ) from None

        if completed.returncode != 0:
            output = completed.stderr.strip() or completed.stdout.strip()
            if len(output) > CTL_ERROR_OUTPUT_CHARS:
                # An unknown command prints the whole usage text, so only its start is kept.
                omitted = len(output) - CTL_ERROR_OUTPUT_CHARS
                output = (
                    f"{output[:CTL_ERROR_OUTPUT_CHARS]}... "
                    f"({omitted} more characters in CtlError.stderr)"
                )
            raise CtlError(
                f"rabbitmqctl {' '.join(args)} on node {self.nodename} failed with exit code "
                f"{completed.returncode}: {output}",
                ctl_args=args,
                returncode=completed.returncode,
                stdout=completed.stdout,
                stderr=completed.stderr,
            )
        return completed

    # -- context manager ---------------------------------------------------

    def __enter__(self) -> PrivateNode:
        if not self.is_running():
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"PrivateNode(base_dir={str(self.base_dir)!r}, name={self.name!r}, url={self.url!r})"


def _ref_to_state(ref: ProcessRef | None) -> dict[str, int] | None:
    if ref is None:
        return None
    return {"pid": ref.pid, "start_time": ref.start_time}


def _ref_from_state(value: dict[str, int] | None) -> ProcessRef | None:
    if value is None:
        return None
    return ProcessRef(value["pid"], value["start_time"])


def _decode(output: bytes | str | None) -> str:
    if output is None:
        return ""
    if isinstance(output, bytes):
        return output.decode("utf-8", "replace")
    return output


# ---------------------------------------------------------------------------
# PrivateCluster
# ---------------------------------------------------------------------------


class PrivateCluster:
    """A RabbitMQ cluster of ``PrivateNode`` instances on 127.0.0.1.

    Erlang nodes find each other's distribution port through epmd, and a
    connection between them needs the same cookie on both sides. The cluster
    therefore runs one private epmd on a loopback port for all of its nodes
    and gives each node the same random cookie. Node names are
    ``NAME-1@localhost``, ``NAME-2@localhost`` and so on. The other nodes
    join the first one.

    Each node keeps its data in ``base_dir/node-N`` and the epmd writes its
    output to ``base_dir/epmd.log``. ``stop_app`` and ``start_app`` stop and
    start RabbitMQ on one node while its Erlang VM, and so its ports, stay up.
    """

    def __init__(self, base_dir: pathlib.Path, size: int = 3, name: str | None = None) -> None:
        if size < 1:
            raise ValueError(f"invalid cluster size {size}: a cluster needs at least 1 node")
        if name is None:
            name = "berth-" + secrets.token_hex(3)
        # The node names append "-N", so the prefix must leave room for it.
        if not NAME_PATTERN.match(f"{name}-{size}"):
            raise ValueError(
                f"invalid cluster name {name!r}: use at most 60 letters, digits, '_' or '-'"
            )

        self.base_dir = pathlib.Path(base_dir).absolute()
        self.name = name
        self.size = size
        self.epmd_port: int | None = None
        self.nodes: list[PrivateNode] = []
        self._epmd_process: subprocess.Popen[bytes] | None = None
        self._epmd_ref: ProcessRef | None = None

    @property
    def urls(self) -> list[str]:
        """The AMQP URLs of the nodes, in node order, or an empty list before ``start``."""
        return [node.url for node in self.nodes if node.url is not None]

    @property
    def epmd_log_file(self) -> pathlib.Path:
        return self.base_dir / "epmd.log"

    def start(self, timeout: float = 180.0) -> list[str]:
        """Start the nodes, join them into one cluster and return their AMQP URLs.

        Blocks until ``cluster_status`` on the first node lists every node as
        running. Raises NodeStartError when that takes longer than ``timeout``
        seconds, and stops everything that was started when any step fails.
        """
        if self._epmd_ref is not None and self._epmd_ref.is_alive():
            raise RabbitMQNodeError(f"cluster {self.name} in {self.base_dir} is already running")
        # NOTE: only a start in an empty directory has been tried. A second
        # start reuses the nodes' Mnesia data, with a new cookie and new ports.

        started_at = time.monotonic()
        deadline = started_at + timeout
        self.base_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
        server_user = ServerUser.for_current_process()
        if server_user is not None:
            _check_reachable(self.base_dir, server_user.uid, set(server_user.groups))
            # The nodes run as the server user, which must enter this
            # directory to reach their own, as with a PrivateNode's directory.
            os.lchown(self.base_dir, server_user.uid, server_user.gid)

        cookie = secrets.token_hex(20).upper()
        (self.epmd_port,) = _free_loopback_ports(1)
        self.nodes = [
            PrivateNode(
                self.base_dir / f"node-{number}",
                f"{self.name}-{number}",
                cookie=cookie,
                epmd_port=self.epmd_port,
            )
            for number in range(1, self.size + 1)
        ]
        logger.info(
            "starting RabbitMQ cluster %s of %d nodes in %s (epmd port %d)",
            self.name,
            self.size,
            self.base_dir,
            self.epmd_port,
        )

        try:
            self._start_epmd(server_user, deadline)
            self._start_nodes(deadline)
            self._join_nodes(deadline)
            self.wait_for_running_nodes(self.size, timeout=max(deadline - time.monotonic(), 1.0))
        except BaseException:
            self.stop()
            raise

        logger.info(
            "RabbitMQ cluster %s of %d nodes is ready after %.1f s",
            self.name,
            self.size,
            time.monotonic() - started_at,
        )
        return self.urls

    def _start_epmd(self, server_user: ServerUser | None, deadline: float) -> None:
        epmd = _find_epmd()
        user_kwargs = server_user.popen_kwargs() if server_user is not None else {}
        # The epmd writes nothing that the server user would need to reopen,
        # so the log file may stay owned by the caller.
        with self.epmd_log_file.open("ab") as output:
            self._epmd_process = subprocess.Popen(
                [epmd, "-port", str(self.epmd_port), "-address", LOOPBACK],
                env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C.UTF-8"},
                cwd=self.base_dir,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                **user_kwargs,
            )
        self._epmd_ref = ProcessRef.of(self._epmd_process.pid)

        assert self.epmd_port is not None
        epmd_deadline = min(deadline, time.monotonic() + 10.0)
        while not _port_accepts(self.epmd_port):
            if self._epmd_process.poll() is not None:
                raise NodeStartError(
                    f"epmd of cluster {self.name} on port {self.epmd_port} exited with code "
                    f"{self._epmd_process.returncode}. Output:\n{tail(self.epmd_log_file)}"
                )
            if time.monotonic() >= epmd_deadline:
                raise NodeStartError(
                    f"epmd of cluster {self.name} did not accept connections on port "
                    f"{self.epmd_port} within 10 s"
                )
            time.sleep(0.02)

    def _start_nodes(self, deadline: float) -> None:
        """Start all nodes at once, because each spends most of its start waiting."""
        timeout = max(deadline - time.monotonic(), 1.0)
        with concurrent.futures.ThreadPoolExecutor(max_workers=len(self.nodes)) as executor:
            futures = [executor.submit(node.start, timeout) for node in self.nodes]
        # Every start has finished here, so a failure leaves no node half started.
        for future in futures:
            future.result()

    def _join_nodes(self, deadline: float) -> None:
        first = self.nodes[0]
        for node in self.nodes[1:]:
            timeout = max(deadline - time.monotonic(), 1.0)
            node.ctl("stop_app", timeout=timeout)
            node.ctl("join_cluster", first.nodename, timeout=timeout)
            node.ctl("start_app", timeout=timeout)
            logger.info("RabbitMQ node %s joined %s", node.nodename, first.nodename)

    def running_nodes(self, index: int = 0) -> list[str]:
        """Return the running cluster members as node ``index`` reports them in ``cluster_status``."""
        completed = self.nodes[index].ctl("cluster_status", "--formatter", "json")
        status = json.loads(completed.stdout)
        return sorted(status.get("running_nodes", []))

    def wait_for_running_nodes(self, count: int, timeout: float = 60.0, index: int = 0) -> None:
        """Poll ``cluster_status`` on node ``index`` until ``count`` nodes run.

        Raises NodeStartError with the last reported members after ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        running: list[str] = []
        while True:
            try:
                running = self.running_nodes(index)
            except (CtlError, json.JSONDecodeError) as error:
                logger.debug(
                    "cluster_status on %s failed, retrying: %s", self.nodes[index].nodename, error
                )
            if len(running) == count:
                return
            if time.monotonic() >= deadline:
                raise NodeStartError(
                    f"cluster {self.name} has {len(running)} running nodes "
                    f"({', '.join(running) or 'none'}) after {timeout:.0f} s, expected {count}"
                )
            time.sleep(0.5)

    def stop_app(self, index: int, timeout: float = 60.0) -> None:
        """Stop RabbitMQ on node ``index`` and keep its Erlang VM running, as a node outage."""
        self.nodes[index].ctl("stop_app", timeout=timeout)

    def start_app(self, index: int, timeout: float = 60.0) -> None:
        """Start RabbitMQ again on node ``index`` after ``stop_app``."""
        self.nodes[index].ctl("start_app", timeout=timeout)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop every node, then the cluster's epmd. Stopping a cluster that does not run does nothing.

        Each node gets up to ``timeout`` seconds. A node that fails to stop
        does not keep the others running, and the first error is raised at the end.
        """
        errors: list[RabbitMQNodeError] = []
        for node in reversed(self.nodes):
            try:
                node.stop(timeout=timeout)
            except RabbitMQNodeError as error:
                logger.exception("stopping RabbitMQ node %s failed", node.nodename)
                errors.append(error)

        if self._epmd_ref is not None:
            try:
                _terminate([self._epmd_ref], timeout=5.0, what=f"epmd of cluster {self.name}")
            except RabbitMQNodeError as error:
                logger.exception("stopping the epmd of RabbitMQ cluster %s failed", self.name)
                errors.append(error)
        if self._epmd_process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._epmd_process.wait(timeout=1.0)
        self._epmd_ref = None
        self._epmd_process = None
        if errors:
            raise errors[0]

    def __enter__(self) -> PrivateCluster:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return (
            f"PrivateCluster(base_dir={str(self.base_dir)!r}, name={self.name!r}, size={self.size})"
        )


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m deploy.rabbitmq",
        description="Start or stop a private RabbitMQ node that keeps its data, logs and state "
        "in DIR.",
    )
    subcommands = parser.add_subparsers(dest="command", required=True)

    start_parser = subcommands.add_parser(
        "start", help="start a node in DIR and print its AMQP URL"
    )
    start_parser.add_argument("dir", type=pathlib.Path, help="node directory, created if missing")
    start_parser.add_argument(
        "--name", help="node name before @localhost (default: berth- and 6 random hex digits)"
    )
    start_parser.add_argument(
        "--timeout",
        type=float,
        default=90.0,
        help="seconds to wait for the node to accept connections (default: 90)",
    )

    stop_parser = subcommands.add_parser("stop", help="stop the node started in DIR")
    stop_parser.add_argument("dir", type=pathlib.Path, help="directory given to `start`")
    stop_parser.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        help="seconds to wait after SIGTERM before sending SIGKILL (default: 30)",
    )

    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # pika logs every step of the readiness probe's connection at INFO level.
    logging.getLogger("pika").setLevel(logging.WARNING)

    try:
        if args.command == "start":
            url = PrivateNode(args.dir, args.name).start(timeout=args.timeout)
            print(url, flush=True)
        else:
            PrivateNode.load(args.dir).stop(timeout=args.timeout)
    except RabbitMQNodeError as error:
        logger.error("%s", error)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
