"""Tests of deploy.rabbitmq.PrivateNode against the installed rabbitmq-server."""

from __future__ import annotations

import contextlib
import os
import pathlib
import re
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator

import pika
import pika.exceptions
import pytest

from deploy import rabbitmq
from deploy.rabbitmq import (
    CtlError,
    NodeStartError,
    PrivateNode,
    ProcessRef,
    RabbitMQNodeError,
    RabbitMQNotInstalledError,
)

REPOSITORY_ROOT = pathlib.Path(__file__).resolve().parent.parent


def _rabbitmq_installed() -> bool:
    try:
        rabbitmq.find_scripts_dir()
    except RabbitMQNotInstalledError:
        return False
    return True


# Under CI, which installs rabbitmq-server, a missing package fails the tests
# instead of skipping them.
pytestmark = pytest.mark.skipif(
    not _rabbitmq_installed() and not os.environ.get("CI"),
    reason="rabbitmq-server is not installed (apt-get install rabbitmq-server)",
)


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def _make_node_dir() -> pathlib.Path:
    # Not under pytest's tmp_path: its 0700 parent keeps the rabbitmq user out.
    return pathlib.Path(tempfile.mkdtemp(prefix="berth-rabbitmq-test-", dir="/tmp"))


def _command_lines() -> dict[int, str]:
    """Return the command line of every process that has one (zombies have none)."""
    result = {}
    for entry in pathlib.Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "cmdline").read_bytes()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if raw:
            result[int(entry.name)] = raw.replace(b"\0", b" ").decode("utf-8", "replace")
    return result


def _pids_mentioning(text: str) -> list[int]:
    return [pid for pid, command_line in _command_lines().items() if text in command_line]


def _vm_pids(node: PrivateNode) -> list[int]:
    """Return the pids of the node's Erlang VM, whose command line contains `-home HOME_DIR`."""
    return _pids_mentioning(f"-home {node.home_dir} ")


def _epmd_pids(port: int | None) -> list[int]:
    return _pids_mentioning(f"epmd -port {port} ")


def _descendants(pid: int) -> list[int]:
    parents = {}
    for entry in pathlib.Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                stat_text = (entry / "stat").read_text()
                parents[int(entry.name)] = int(stat_text[stat_text.rindex(")") + 2 :].split()[1])
    found = []
    pending = [pid]
    while pending:
        parent = pending.pop()
        children = [child for child, child_parent in parents.items() if child_parent == parent]
        found.extend(children)
        pending.extend(children)
    return found


def _listening_addresses() -> list[tuple[str, int]]:
    """Return (local address, pid) of every listening TCP socket, as `ss -ltnpH` reports them."""
    output = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    result = []
    for line in output.splitlines():
        fields = line.split()
        local_address = fields[3]
        for pid in re.findall(r"pid=(\d+)", line):
            result.append((local_address, int(pid)))
    return result


def _port_accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return True
    except OSError:
        return False


def _publish_and_get(url: str, queue: str, body: bytes) -> bytes | None:
    """Publish ``body`` to an exclusive queue and return the body that basic_get receives."""
    with contextlib.closing(pika.BlockingConnection(pika.URLParameters(url))) as connection:
        channel = connection.channel()
        channel.confirm_delivery()
        channel.queue_declare(queue, exclusive=True)
        channel.basic_publish("", queue, body)
        _method, _properties, received = channel.basic_get(queue, auto_ack=True)
        return received


def _queue_message_count(url: str, queue: str) -> int:
    """Return the message count of a queue. Raises ChannelClosedByBroker if it does not exist."""
    with contextlib.closing(pika.BlockingConnection(pika.URLParameters(url))) as connection:
        declared = connection.channel().queue_declare(queue, passive=True)
        return declared.method.message_count


@pytest.fixture(scope="module")
def node() -> Iterator[PrivateNode]:
    base_dir = _make_node_dir()
    started = PrivateNode(base_dir)
    started.start()
    yield started
    started.stop()
    shutil.rmtree(base_dir, ignore_errors=True)


# ---------------------------------------------------------------------------
# A running node
# ---------------------------------------------------------------------------


def test_start_returns_loopback_amqp_url(node: PrivateNode) -> None:
    assert node.url == f"amqp://guest:guest@127.0.0.1:{node.amqp_port}/%2F"
    assert node.is_running()
    assert node.state_file.exists()


def test_publish_and_get_message(node: PrivateNode, run_prefix: str) -> None:
    assert node.url is not None
    received = _publish_and_get(node.url, f"{run_prefix}.round-trip", b"hello")

    assert received == b"hello"


def test_ctl_status_reports_node(node: PrivateNode) -> None:
    completed = node.ctl("status")

    assert completed.returncode == 0
    assert f"Node name: {node.nodename}" in completed.stdout
    assert "Enabled plugins:" in completed.stdout
    assert "rabbitmq_management" not in completed.stdout


def test_ctl_failure_raises_with_stderr(node: PrivateNode) -> None:
    with pytest.raises(CtlError) as caught:
        node.ctl("no_such_command")

    assert caught.value.returncode != 0
    assert "no_such_command" in caught.value.stderr
    assert "not found" in str(caught.value)


@pytest.mark.skipif(shutil.which("ss") is None, reason="ss (package iproute2) is not installed")
def test_node_listens_only_on_loopback(node: PrivateNode) -> None:
    node_pids = set(_vm_pids(node)) | set(_epmd_pids(node.epmd_port))
    assert node_pids
    node_sockets = [(address, pid) for address, pid in _listening_addresses() if pid in node_pids]
    ports = {int(address.rsplit(":", 1)[1]) for address, _pid in node_sockets}

    assert {node.amqp_port, node.dist_port, node.epmd_port} <= ports
    for address, pid in node_sockets:
        assert address.startswith(("127.0.0.1:", "[::1]:")), f"pid {pid} listens on {address}"


def test_start_twice_is_rejected(node: PrivateNode) -> None:
    with pytest.raises(RabbitMQNodeError, match="already running"):
        node.start()
    with pytest.raises(RabbitMQNodeError, match="already running"):
        PrivateNode(node.base_dir).start()

    assert node.is_running()


def test_two_nodes_run_side_by_side(
    node: PrivateNode, private_node_dir: pathlib.Path, run_prefix: str
) -> None:
    queue = f"{run_prefix}.side-by-side"
    with PrivateNode(private_node_dir) as second:
        assert second.url is not None
        assert node.url is not None
        assert second.nodename != node.nodename
        assert {second.amqp_port, second.dist_port, second.epmd_port}.isdisjoint(
            {node.amqp_port, node.dist_port, node.epmd_port}
        )

        with contextlib.closing(
            pika.BlockingConnection(pika.URLParameters(second.url))
        ) as connection:
            connection.channel().queue_declare(queue, durable=True)
        assert _queue_message_count(second.url, queue) == 0
        with pytest.raises(pika.exceptions.ChannelClosedByBroker, match="NOT_FOUND"):
            _queue_message_count(node.url, queue)

        assert f"Node name: {second.nodename}" in second.ctl("status").stdout

    assert not second.is_running()
    assert node.is_running()
    assert (
        _publish_and_get(node.url, f"{run_prefix}.after-second-stop", b"still here")
        == b"still here"
    )


# ---------------------------------------------------------------------------
# Stop, restart and failures
# ---------------------------------------------------------------------------


def test_stop_ends_every_node_process(private_node_dir: pathlib.Path, run_prefix: str) -> None:
    node = PrivateNode(private_node_dir, name=f"{run_prefix}-stop")
    node.start()
    vm_pid = int(node.pid_file.read_text())
    epmd_pids = _epmd_pids(node.epmd_port)
    amqp_port = node.amqp_port
    assert amqp_port is not None
    assert _vm_pids(node) == [vm_pid]
    assert len(epmd_pids) == 1
    # The VM's children (erl_child_setup, inet_gethost) must end with it.
    pids = [vm_pid, *_descendants(vm_pid), *epmd_pids]
    processes = [ProcessRef.of(pid) for pid in pids]

    node.stop()

    assert not node.is_running()
    assert _vm_pids(node) == []
    assert _epmd_pids(node.epmd_port) == []
    assert [ref.pid for ref in processes if ref is not None and ref.is_alive()] == []
    assert not node.state_file.exists()
    assert node.url is None
    assert not _port_accepts(amqp_port)

    node.stop()  # stopping a stopped node does nothing


def test_restart_keeps_durable_queue(private_node_dir: pathlib.Path, run_prefix: str) -> None:
    name = f"{run_prefix}-restart"
    queue = f"{run_prefix}.durable"
    with PrivateNode(private_node_dir, name=name) as first:
        assert first.url is not None
        with contextlib.closing(
            pika.BlockingConnection(pika.URLParameters(first.url))
        ) as connection:
            channel = connection.channel()
            channel.confirm_delivery()
            channel.queue_declare(queue, durable=True)
            channel.basic_publish("", queue, b"kept", pika.BasicProperties(delivery_mode=2))

    with PrivateNode(private_node_dir, name=name) as second:
        assert second.url is not None
        assert _queue_message_count(second.url, queue) == 1


def test_start_timeout_reports_log_tail(private_node_dir: pathlib.Path, run_prefix: str) -> None:
    node = PrivateNode(private_node_dir, name=f"{run_prefix}-timeout")

    with pytest.raises(NodeStartError) as caught:
        node.start(timeout=0.5)

    message = str(caught.value)
    assert "did not accept AMQP connections" in message
    assert f"Last lines of {node.log_file}" in message
    assert not node.is_running()
    assert _vm_pids(node) == []
    assert _epmd_pids(node.epmd_port) == []
    assert not node.state_file.exists()


def test_missing_server_names_apt_package(
    private_node_dir: pathlib.Path, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(rabbitmq, "SBIN_DIRS", ())

    with pytest.raises(RabbitMQNotInstalledError, match="apt-get install rabbitmq-server"):
        PrivateNode(private_node_dir).start()


@pytest.mark.root
def test_unreachable_directory_is_rejected(tmp_path: pathlib.Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o700)

    with pytest.raises(RabbitMQNodeError, match="cannot enter"):
        PrivateNode(locked / "node").start()


def test_invalid_name_is_rejected(private_node_dir: pathlib.Path) -> None:
    with pytest.raises(ValueError, match="invalid node name"):
        PrivateNode(private_node_dir, name="bad@name")


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def test_cli_start_and_stop(private_node_dir: pathlib.Path, run_prefix: str) -> None:
    name = f"{run_prefix}-cli"
    command = [sys.executable, "-m", "deploy.rabbitmq"]
    started = subprocess.run(
        [*command, "start", str(private_node_dir), "--name", name],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
        cwd=REPOSITORY_ROOT,
    )
    try:
        assert started.returncode == 0, started.stderr
        url = started.stdout.strip()
        assert re.fullmatch(r"amqp://guest:guest@127\.0\.0\.1:\d+/%2F", url), started.stdout
        assert _publish_and_get(url, f"{run_prefix}.cli", b"from cli") == b"from cli"
        assert len(_vm_pids(PrivateNode(private_node_dir, name))) == 1
    finally:
        stopped = subprocess.run(
            [*command, "stop", str(private_node_dir)],
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
            cwd=REPOSITORY_ROOT,
        )

    assert stopped.returncode == 0, stopped.stderr
    assert stopped.stdout == ""
    assert _vm_pids(PrivateNode(private_node_dir, name)) == []
    assert not (private_node_dir / rabbitmq.STATE_FILE_NAME).exists()


def _open_files_limits(pid: int) -> tuple[str, str]:
    """Return the soft and hard limit on open files of ``pid`` as /proc/PID/limits shows them."""
    for line in pathlib.Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return soft, hard
    raise AssertionError(f"no 'Max open files' line in /proc/{pid}/limits")


def test_server_soft_open_files_raised_to_hard(
    private_node_dir: pathlib.Path, run_prefix: str
) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard <= 512:
        pytest.skip(f"needs a finite hard limit on open files above 512, not {hard}")
    command = [sys.executable, "-m", "deploy.rabbitmq"]
    started = subprocess.run(
        [*command, "start", str(private_node_dir), "--name", f"{run_prefix}-nofile"],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
        cwd=REPOSITORY_ROOT,
        # The starting process has a soft limit of 512, as a login shell may
        # have 1024; the node must not inherit it.
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (512, hard)),
    )
    try:
        assert started.returncode == 0, started.stderr
        vm_pids = _vm_pids(PrivateNode(private_node_dir, f"{run_prefix}-nofile"))
        assert len(vm_pids) == 1
        assert _open_files_limits(vm_pids[0]) == (str(hard), str(hard))
    finally:
        subprocess.run(
            [*command, "stop", str(private_node_dir)],
            capture_output=True,
            check=False,
            timeout=60,
            cwd=REPOSITORY_ROOT,
        )


def test_cli_stop_without_state_fails(private_node_dir: pathlib.Path) -> None:
    stopped = subprocess.run(
        [sys.executable, "-m", "deploy.rabbitmq", "stop", str(private_node_dir)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        cwd=REPOSITORY_ROOT,
    )

    assert stopped.returncode == 1
    assert "does not exist" in stopped.stderr


# ---------------------------------------------------------------------------
# Session fixtures from conftest.py
# ---------------------------------------------------------------------------


def test_amqp_url_fixture_accepts_messages(amqp_url: str, run_prefix: str) -> None:
    assert _publish_and_get(amqp_url, f"{run_prefix}.fixture", b"fixture") == b"fixture"


def test_rabbitmq_node_fixture_runs_ctl(rabbitmq_node: PrivateNode, amqp_url: str) -> None:
    assert rabbitmq_node.url == amqp_url
    assert f"Node name: {rabbitmq_node.nodename}" in rabbitmq_node.ctl("status").stdout


def test_run_prefix_is_short_hex(run_prefix: str) -> None:
    assert re.fullmatch(r"t[0-9a-f]{6}", run_prefix)
