"""Container networking through a real manager, real runc and a real broker.

The tests use `ip` only to observe interfaces and namespaces; berth itself
configures them through pyroute2.
"""

import ipaddress
import json
import os
import socket
import sqlite3
import subprocess
import threading
import time
import uuid

import pytest

from manager.network import names
from manager.network.attach import remove_netns
from manager.network.bridge import parse_subnet
from manager.network.namespaces import create_namespace, run_in_namespace
from messages.client import Client, ClientError
from messages.models import ContainerState, ErrorCode, ExitReason
from tests.helpers import ManagerProcess, pid_alive, wait_until

pytestmark = pytest.mark.root

SERVER_PORT = 8080

SERVER = f"""
import socket
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(("0.0.0.0", {SERVER_PORT}))
server.listen()
print("listening", flush=True)
while True:
    connection, _ = server.accept()
    connection.sendall(b"pong:" + connection.recv(100))
    connection.close()
"""

CLIENT = """
import socket, sys, time
deadline = time.monotonic() + 15
while True:
    try:
        connection = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2)
        break
    except OSError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.2)
connection.sendall(b"ping")
print(connection.recv(100).decode(), flush=True)
"""

INTERFACES = "import socket; print(' '.join(sorted(name for _, name in socket.if_nameindex())))"


@pytest.fixture
def manager(amqp_url, run_prefix, tmp_path):
    process = ManagerProcess(amqp_url, f"{run_prefix}-{uuid.uuid4().hex[:6]}", tmp_path / "manager")
    process.start()
    yield process
    process.cleanup()


def link_names() -> set[str]:
    output = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in output.splitlines()}


def netns_names() -> set[str]:
    output = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in output.splitlines() if line.strip()}


def manager_leftovers(manager_id: str) -> tuple[set[str], set[str]]:
    """Return this manager's veths and namespaces that exist now."""
    veths = {name for name in link_names() if name.startswith(names.veth_prefix(manager_id))}
    namespaces = {name for name in netns_names() if name.startswith(names.netns_prefix(manager_id))}
    return veths, namespaces


def allocations(manager: ManagerProcess) -> dict[str, str]:
    database = manager.state_dir / manager.manager_id / "network.db"
    if not database.exists():
        return {}
    with sqlite3.connect(database) as connection:
        return dict(connection.execute("SELECT container_id, address FROM allocations"))


def wait_exited(client, container_id: str, timeout: float = 30.0):
    assert wait_until(
        lambda: client.request({"command": "inspect", "id": container_id}).container.state
        == ContainerState.EXITED,
        timeout,
    ), f"container {container_id} did not exit within {timeout} s"
    return client.request({"command": "inspect", "id": container_id}).container


def stdout_of(client, container_id: str) -> list[str]:
    logs = client.request({"command": "logs", "id": container_id}).logs
    return [line.line for line in logs if line.stream == "stdout"]


def free_loopback_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_bridge_containers_exchange_tcp(manager):
    with manager.client() as client:
        server = client.request({"command": "run", "id": "server", "argv": ["python3", "-c", SERVER]})
        address = server.container.address
        assert address is not None
        bridge_subnet = ipaddress.IPv4Interface(f"{address}/24").network

        caller = client.request(
            {
                "command": "run",
                "id": "caller",
                "network": "bridge",
                "argv": ["python3", "-c", CLIENT, address, str(SERVER_PORT)],
            }
        )
        assert caller.container.address != address
        assert ipaddress.IPv4Address(caller.container.address) in bridge_subnet

        info = wait_exited(client, "caller")
        assert info.exit.exit_code == 0, stdout_of(client, "caller")
        assert stdout_of(client, "caller") == ["pong:ping"]

        client.request({"command": "delete", "id": "caller"})
        client.request({"command": "delete", "id": "server", "force": True})
    assert manager_leftovers(manager.manager_id) == (set(), set())
    assert allocations(manager) == {}


def test_network_none_has_only_loopback(manager):
    with manager.client() as client:
        reply = client.request(
            {"command": "run", "id": "isolated", "network": "none", "argv": ["python3", "-c", INTERFACES]}
        )
        assert reply.container.address is None
        info = wait_exited(client, "isolated")
        assert info.exit.exit_code == 0
        assert stdout_of(client, "isolated") == ["lo"]
        client.request({"command": "delete", "id": "isolated"})
    assert manager_leftovers(manager.manager_id) == (set(), set())


def test_network_host_sees_host_interfaces(manager):
    with manager.client() as client:
        reply = client.request(
            {"command": "run", "id": "hostnet", "network": "host", "argv": ["python3", "-c", INTERFACES]}
        )
        assert reply.container.address is None
        wait_exited(client, "hostnet")
        seen = set(stdout_of(client, "hostnet")[0].split())
        client.request({"command": "delete", "id": "hostnet"})
    # Other test sessions may add and remove berth bridges meanwhile.
    host = {name for _, name in socket.if_nameindex() if not name.startswith(("berth-", "bv"))}
    assert "lo" in seen
    assert host <= seen


def test_ports_rejected_without_bridge(manager):
    with manager.client() as client:
        # send_raw skips the client's own validation, so the manager replies.
        body = {
            "command": "create",
            "id": "noports",
            "network": "none",
            "argv": ["true"],
            "ports": [{"host_port": 18080, "container_port": 80}],
        }
        reply = client.send_raw(json.dumps(body).encode(), uuid.uuid4().hex)
    assert reply.error is not None
    assert reply.error.code == ErrorCode.INVALID_ARGUMENT
    assert "ports need network bridge" in reply.error.message


def test_create_delete_cycles_leave_nothing(manager):
    with manager.client() as client:
        # The first create makes the bridge, which stays with the manager.
        client.request({"command": "create", "id": "warmup", "argv": ["sleep", "infinity"]})
        client.request({"command": "delete", "id": "warmup"})
        bridge = names.bridge_name(manager.manager_id)
        assert bridge in link_names()
        assert manager_leftovers(manager.manager_id) == (set(), set())

        for cycle in range(50):
            created = client.request({"command": "create", "id": f"cycle{cycle}", "argv": ["sleep", "infinity"]})
            assert created.container.address is not None
            client.request({"command": "delete", "id": f"cycle{cycle}"})

        # Only this manager's names are compared, because other test
        # sessions on the host may create and remove their own meanwhile.
        assert bridge in link_names()
        assert manager_leftovers(manager.manager_id) == (set(), set())
    assert allocations(manager) == {}


def test_stopped_manager_removes_unused_bridge(amqp_url, run_prefix, tmp_path):
    manager = ManagerProcess(amqp_url, f"{run_prefix}-{uuid.uuid4().hex[:6]}", tmp_path / "manager")
    bridge = names.bridge_name(manager.manager_id)
    try:
        manager.start()
        with manager.client() as client:
            client.request({"command": "run", "id": "kept", "argv": ["sleep", "infinity"]})
        # A container that still exists keeps the bridge over a restart.
        assert manager.stop() == 0
        assert bridge in link_names()

        manager.start()
        with manager.client() as client:
            client.request({"command": "delete", "id": "kept", "force": True})
        assert manager.stop() == 0
        assert bridge not in link_names()
        assert manager_leftovers(manager.manager_id) == (set(), set())
        assert not (manager.runc_root / manager.manager_id).exists()
    finally:
        manager.cleanup()


def test_failed_create_leaves_no_network(manager):
    with manager.client() as client:
        for attempt in range(3):
            # runc cannot create a working directory below the read-only /usr.
            reply = client.send(
                {"command": "create", "id": "broken", "argv": ["true"], "cwd": "/usr/berth-no-such-dir"}
            )
            assert reply.error is not None
            assert manager_leftovers(manager.manager_id) == (set(), set())
    assert allocations(manager) == {}


def test_manager_sigkill_mid_create_then_sweep(manager):
    replies = []

    def create(container_id: str) -> None:
        try:
            with manager.client(timeout=5.0) as client:
                replies.append(client.send({"command": "create", "id": container_id, "argv": ["sleep", "infinity"]}))
        except ClientError as exc:
            replies.append(exc)

    threads = [threading.Thread(target=create, args=(f"crash{index}",)) for index in range(6)]
    for thread in threads:
        thread.start()
    assert wait_until(lambda: manager_leftovers(manager.manager_id)[1], 20, interval=0.01)
    manager.kill()
    for thread in threads:
        thread.join()

    manager.start()
    # Creates the broker redelivers to the new manager may still run, so
    # wait until the containers the manager lists stayed the same for two
    # polls 2 s apart, and every namespace left belongs to one of them.
    previous: dict[str, set[str]] = {}

    def settled() -> bool:
        with manager.client() as client:
            known = {
                info.id
                for info in client.request({"command": "list", "all": True}).containers
                if info.state != ContainerState.DELETED
            }
        stable = previous.get("known") == known
        previous["known"] = known
        namespaces = manager_leftovers(manager.manager_id)[1]
        return stable and namespaces == {names.netns_name(manager.manager_id, cid) for cid in known}

    assert wait_until(settled, 40, interval=2.0), manager.log_tail()
    with manager.client() as client:
        for info in client.request({"command": "list", "all": True}).containers:
            if info.state != ContainerState.DELETED:
                client.request({"command": "delete", "id": info.id, "force": True})
    assert manager_leftovers(manager.manager_id) == (set(), set())
    assert allocations(manager) == {}


def test_no_duplicate_address_after_restart(manager):
    with manager.client() as client:
        first = client.request({"command": "run", "id": "first", "argv": ["sleep", "infinity"]}).container
    manager.stop()
    manager.start()
    with manager.client() as client:
        second = client.request({"command": "run", "id": "second", "argv": ["sleep", "infinity"]}).container
    assert second.address != first.address

    # Without the allocation table the manager reads the addresses that
    # are configured in its namespaces and skips them.
    manager.kill()
    (manager.state_dir / manager.manager_id / "network.db").unlink()
    manager.start()
    with manager.client() as client:
        third = client.request({"command": "run", "id": "third", "argv": ["sleep", "infinity"]}).container
        assert third.address not in {first.address, second.address}
        for container_id in ("first", "second", "third"):
            client.request({"command": "delete", "id": container_id, "force": True})
    assert manager_leftovers(manager.manager_id) == (set(), set())


def test_published_port_reaches_container(manager):
    host_port = free_loopback_port()
    with manager.client() as client:
        client.request(
            {
                "command": "run",
                "id": "published",
                "argv": ["python3", "-c", SERVER],
                "ports": [{"host_port": host_port, "container_port": SERVER_PORT}],
            }
        )
        answer = None
        deadline = time.monotonic() + 15
        while answer is None and time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", host_port), timeout=2) as connection:
                    connection.sendall(b"hello")
                    answer = connection.recv(100) or None
            except OSError:
                time.sleep(0.2)
        assert answer == b"pong:hello"

        taken = client.send(
            {
                "command": "create",
                "id": "samehostport",
                "argv": ["sleep", "infinity"],
                "ports": [{"host_port": host_port, "container_port": SERVER_PORT}],
            }
        )
        assert taken.error is not None
        assert "already in use" in taken.error.message

        client.request({"command": "delete", "id": "published", "force": True})
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", host_port), timeout=2).close()
    assert manager_leftovers(manager.manager_id) == (set(), set())


def test_lab_of_three_hosts(tmp_path):
    from deploy import lab

    lab_dir = tmp_path / "lab"
    names_of_lab = lab.lab_names(lab_dir, 3)
    try:
        state = lab.up(lab_dir, hosts=3, subnet_text=lab.DEFAULT_SUBNET, heartbeat_timeout=3.0)
        first, _, third = state["hosts"]
        with Client(state["amqp_url"], first["manager_id"], timeout=60.0) as client:
            events = client.subscribe("#")
            on_first = client.request({"command": "run", "id": "one", "argv": ["sleep", "infinity"]}).container
            on_third = client.request(
                {"command": "run", "id": "three", "argv": ["sleep", "infinity"]},
                manager_id=third["manager_id"],
            ).container
            assert on_first.manager_id == first["manager_id"]
            assert on_third.manager_id == third["manager_id"]
            assert on_third.address.startswith("10.215.3.")

            # The VXLAN overlay routes from host 1's subnet to host 3's.
            client.request(
                {"command": "run", "id": "server", "argv": ["python3", "-c", SERVER]},
                manager_id=third["manager_id"],
            )
            server = client.request({"command": "inspect", "id": "server"}, manager_id=third["manager_id"]).container
            client.request(
                {"command": "run", "id": "caller", "argv": ["python3", "-c", CLIENT, server.address, str(SERVER_PORT)]}
            )
            info = wait_exited(client, "caller")
            assert info.exit.exit_code == 0, stdout_of(client, "caller")
            assert stdout_of(client, "caller") == ["pong:ping"]

            seen = set()
            deadline = time.monotonic() + 20
            while len(seen) < 2 and time.monotonic() < deadline:
                event = events.get(deadline - time.monotonic())
                if event is not None and event.event == "running":
                    seen.add(event.manager_id)
            assert seen == {first["manager_id"], third["manager_id"]}

            # Without its manager the workload dies at the heartbeat timeout.
            lab.kill_manager(lab_dir, 1)
            with pytest.raises(lab.LabError, match="not running"):
                lab.kill_manager(lab_dir, 1)
            assert wait_until(lambda: not pid_alive(on_first.pid), 15)
            assert pid_alive(on_third.pid)

            # Started again with its state, the manager still has its container.
            lab.restart_manager(lab_dir, 1)
            with pytest.raises(lab.LabError, match="is running"):
                lab.restart_manager(lab_dir, 1)
            info = wait_exited(client, "one")
            assert info.exit.reason in (ExitReason.MANAGER_UNREACHABLE, ExitReason.ASSISTANT_LOST)
            with pytest.raises(lab.LabError, match="no host 9"):
                lab.kill_manager(lab_dir, 9)
    finally:
        lab.down(lab_dir)

    assert not (lab_dir / lab.STATE_FILE).exists()
    assert not {host["netns"] for host in names_of_lab["hosts"]} & netns_names()
    assert names_of_lab["bridge"] not in link_names()
    assert not any(
        name.startswith(names.netns_prefix(host["manager_id"]))
        for name in netns_names()
        for host in names_of_lab["hosts"]
    )
    for host in state["hosts"]:
        assert not lab.process_ref(host["manager"]).is_alive()
    assert not lab.process_ref(state["relay"]).is_alive()
    assert not pid_alive(on_third.pid)


def test_namespace_helpers_leave_caller_in_host(run_prefix):
    namespace = f"{run_prefix}-nsthread"
    host_namespace = os.readlink("/proc/thread-self/ns/net")
    create_namespace(namespace)
    try:
        assert namespace in netns_names()
        assert os.readlink("/proc/thread-self/ns/net") == host_namespace

        inside = run_in_namespace(namespace, lambda: os.readlink("/proc/thread-self/ns/net"))
        assert inside != host_namespace
        assert os.stat(f"/run/netns/{namespace}").st_ino == int(inside.split("[")[1].rstrip("]"))
        interfaces = run_in_namespace(namespace, lambda: [name for _, name in socket.if_nameindex()])
        assert interfaces == ["lo"]
        assert os.readlink("/proc/thread-self/ns/net") == host_namespace

        def fail() -> None:
            raise ValueError("raised inside")

        with pytest.raises(ValueError, match="raised inside"):
            run_in_namespace(namespace, fail)
    finally:
        remove_netns(namespace, "test")
    assert namespace not in netns_names()
    with pytest.raises(OSError):
        run_in_namespace(namespace, lambda: None)


@pytest.mark.parametrize("text", ["10.213.7.0/24", "172.20.0.0/16", "192.168.5.0/24"])
def test_parse_subnet_accepts_private(text):
    assert str(parse_subnet(text)) == text


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("8.8.8.0/24", "not a private range"),
        ("100.64.0.0/24", "not a private range"),
        ("10.0.0.0/31", "prefix length of 30 or less"),
        ("10.0.0.1/24", "has host bits set"),
        ("subnet", "such as 10.213.7.0/24"),
    ],
)
def test_parse_subnet_rejects_value(text, fragment):
    with pytest.raises(ValueError, match=fragment) as raised:
        parse_subnet(text)
    assert repr(text) in str(raised.value)
