"""A multi-host berth lab on one machine: hosts as network namespaces.

``up`` builds, all through pyroute2:

- a lab bridge in the calling namespace with the first address of the lab
  subnet (default 10.214.0.0/24, private and unused by berth's managers);
- one network namespace per host, joined to the lab bridge by a veth whose
  inner end is eth0 with the subnet's address 10 + host number, and no
  default route, so a host reaches nothing but the lab subnet;
- a private RabbitMQ node on 127.0.0.1 (deploy.rabbitmq.PrivateNode) and
  a TCP relay (assistant.ports) from the lab bridge's address to it, so
  the hosts reach the broker while it listens on loopback only;
- one ``python -m manager`` per host namespace, with manager id
  ``<prefix>-h<N>``, its own state directory under the lab directory and
  its own container subnet 10.215.<N>.0/24;
- unless ``--no-overlay``, a VXLAN overlay (deploy.overlay) that routes
  between the hosts' container subnets.

``kill-manager N`` SIGKILLs host N's manager, as a crash would, and
``start-manager N`` starts it again with the same id and state, so that
it adopts the containers that survived.

``down`` ends those processes (by the pids recorded in ``lab.json``),
the containers of the lab's managers, and removes every namespace,
interface and directory that ``up`` created.

Command line::

    python -m deploy.lab up --hosts 3 --dir /tmp/lab
    python -m deploy.lab kill-manager --dir /tmp/lab 2
    python -m deploy.lab start-manager --dir /tmp/lab 2
    python -m deploy.lab down --dir /tmp/lab
"""

from __future__ import annotations

import argparse
import hashlib
import ipaddress
import json
import logging
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

from pyroute2 import IPRoute, netns

from assistant.runtime import Runc, RuncError
from deploy import overlay
from deploy.rabbitmq import PrivateNode, ProcessRef, RabbitMQNodeError
from assistant.cgroups import cgroup_dirs
from manager.network import remove_manager_network
from manager.network.bridge import ipv4_interfaces
from messages.client import Client, ClientError

log = logging.getLogger(__name__)

PROJECT_ROOT = pathlib.Path(__file__).resolve().parent.parent
STATE_FILE = "lab.json"
DEFAULT_SUBNET = "10.214.0.0/24"
CONTAINER_SUBNET = "10.215.{host}.0/24"
"""Container subnet of host N; distinct per host, so the overlay can route between hosts."""

HOST_ADDRESS_OFFSET = 10
MAX_HOSTS = 50
READY_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0


class LabError(RuntimeError):
    """The lab cannot be built or torn down; the message names the step."""


# --- names and state ---------------------------------------------------------


def lab_tag(directory: pathlib.Path) -> str:
    """Return 6 hex digits derived from the lab directory, unique per lab on a machine."""
    return hashlib.sha256(str(directory.resolve()).encode()).hexdigest()[:6]


def lab_names(directory: pathlib.Path, hosts: int) -> dict:
    tag = lab_tag(directory)
    return {
        "tag": tag,
        "bridge": f"blab{tag}",
        "hosts": [
            {
                "number": number,
                "netns": f"blab{tag}-h{number}",
                "veth": f"blab{tag}v{number}",
                "manager_id": f"lab{tag}-h{number}",
            }
            for number in range(1, hosts + 1)
        ],
    }


def read_state(directory: pathlib.Path) -> dict | None:
    path = directory / STATE_FILE
    if not path.exists():
        return None
    return json.loads(path.read_text())


def write_state(directory: pathlib.Path, state: dict) -> None:
    temporary = directory / (STATE_FILE + ".tmp")
    temporary.write_text(json.dumps(state, indent=2) + "\n")
    temporary.replace(directory / STATE_FILE)


def process_state(pid: int) -> dict | None:
    ref = ProcessRef.of(pid)
    return None if ref is None else {"pid": ref.pid, "start_time": ref.start_time}


def process_ref(value: dict | None) -> ProcessRef | None:
    return None if value is None else ProcessRef(value["pid"], value["start_time"])


# --- up ----------------------------------------------------------------------


def up(
    directory: pathlib.Path,
    hosts: int,
    subnet_text: str,
    heartbeat_timeout: float,
    with_overlay: bool = True,
) -> dict:
    """Build the lab and return its state; on failure tear down what was built."""
    if not 1 <= hosts <= MAX_HOSTS:
        raise LabError(f"invalid host count {hosts}: use 1 to {MAX_HOSTS}")
    subnet = ipaddress.IPv4Network(subnet_text)
    if subnet.num_addresses - 2 < HOST_ADDRESS_OFFSET + hosts:
        raise LabError(f"lab subnet {subnet} is too small for {hosts} hosts; use a /24")
    directory = directory.resolve()
    directory.mkdir(parents=True, exist_ok=True)
    if read_state(directory) is not None:
        raise LabError(
            f"a lab is already recorded in {directory / STATE_FILE}: run"
            f" `python -m deploy.lab down --dir {directory}` first"
        )

    state = lab_names(directory, hosts)
    state.update(
        {
            "directory": str(directory),
            "subnet": str(subnet),
            "relay": None,
            "broker_dir": None,
            "heartbeat_timeout": heartbeat_timeout,
        }
    )
    write_state(directory, state)
    try:
        gateway = create_lab_bridge(state["bridge"], subnet)
        for host in state["hosts"]:
            host["address"] = str(subnet.network_address + HOST_ADDRESS_OFFSET + host["number"])
            create_host_namespace(host, state["bridge"], subnet)
            write_state(directory, state)
        if with_overlay:
            overlay.connect_hosts(state["hosts"], CONTAINER_SUBNET)

        # The node directory must be reachable by the rabbitmq user, which a
        # caller's directory (such as pytest's tmp_path) may not be.
        broker_dir = pathlib.Path(tempfile.mkdtemp(prefix="berth-lab-rabbitmq-", dir="/tmp"))
        state["broker_dir"] = str(broker_dir)
        write_state(directory, state)
        node = PrivateNode(broker_dir)
        node.start()
        state["relay"] = start_relay(directory, gateway, node.amqp_port)
        state["amqp_url"] = f"amqp://guest:guest@{gateway}:{node.amqp_port}/%2F"
        write_state(directory, state)

        for host in state["hosts"]:
            host["manager"] = start_manager(directory, host, state["amqp_url"], heartbeat_timeout)
            write_state(directory, state)
        for host in state["hosts"]:
            wait_ready(state["amqp_url"], host, directory)
    except BaseException:
        log.error("lab in %s failed to start; tearing down what was built", directory)
        down(directory)
        raise
    log.info("lab %s is up: %d hosts, broker %s", state["tag"], hosts, state["amqp_url"])
    return state


def create_lab_bridge(name: str, subnet: ipaddress.IPv4Network) -> ipaddress.IPv4Address:
    gateway = next(subnet.hosts())
    with IPRoute() as ipr:
        for interface in ipv4_interfaces(ipr):
            if interface.network.overlaps(subnet):
                raise LabError(
                    f"lab subnet {subnet} overlaps address {interface} on this host;"
                    " pick another with --subnet"
                )
        ipr.link("add", ifname=name, kind="bridge")
        index = ipr.link_lookup(ifname=name)[0]
        ipr.addr("add", index=index, address=str(gateway), prefixlen=subnet.prefixlen)
        ipr.link("set", index=index, state="up")
    log.info("lab bridge %s has address %s/%d", name, gateway, subnet.prefixlen)
    return gateway


def create_host_namespace(host: dict, bridge: str, subnet: ipaddress.IPv4Network) -> None:
    netns.create(host["netns"])
    with IPRoute() as ipr:
        ipr.link("add", ifname=host["veth"], kind="veth", peer={"ifname": "eth0", "net_ns_fd": host["netns"]})
        index = ipr.link_lookup(ifname=host["veth"])[0]
        ipr.link("set", index=index, master=ipr.link_lookup(ifname=bridge)[0], state="up")
    with IPRoute(netns=host["netns"], flags=0) as inside:
        inside.link("set", index=inside.link_lookup(ifname="lo")[0], state="up")
        eth0 = inside.link_lookup(ifname="eth0")[0]
        inside.addr("add", index=eth0, address=host["address"], prefixlen=subnet.prefixlen)
        inside.link("set", index=eth0, state="up")
    log.info(
        "lab host %d: namespace %s, eth0 %s, veth %s on bridge %s",
        host["number"], host["netns"], host["address"], host["veth"], bridge,
    )


def start_relay(directory: pathlib.Path, gateway: ipaddress.IPv4Address, port: int) -> dict:
    """Start the TCP relay from the lab bridge's address to the broker on loopback."""
    with open(directory / "relay.log", "ab") as output:
        relay = subprocess.Popen(
            [sys.executable, "-m", "assistant.ports", f"{gateway}:{port}", f"127.0.0.1:{port}"],
            cwd=PROJECT_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=output,
            start_new_session=True,
        )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection((str(gateway), port), timeout=1).close()
            break
        except OSError:
            if relay.poll() is not None:
                raise LabError(f"broker relay exited with {relay.returncode}; see {directory / 'relay.log'}")
            time.sleep(0.1)
    log.info("broker relay %d: %s:%d to 127.0.0.1:%d", relay.pid, gateway, port, port)
    return process_state(relay.pid)


def enter_namespace(name: str) -> None:
    """Move the calling process into a named network namespace; for preexec_fn."""
    netns.setns(name, flags=0)


def start_manager(directory: pathlib.Path, host: dict, amqp_url: str, heartbeat_timeout: float) -> dict:
    host_dir = directory / "hosts" / f"h{host['number']}"
    host_dir.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable, "-m", "manager",
        "--amqp-url", amqp_url,
        "--id", host["manager_id"],
        "--state-dir", str(host_dir / "state"),
        "--runc-root", str(host_dir / "runc"),
        "--heartbeat-timeout", str(heartbeat_timeout),
        "--network-subnet", CONTAINER_SUBNET.format(host=host["number"]),
    ]
    with open(host_dir / "manager.log", "ab") as output:
        process = subprocess.Popen(
            command,
            cwd=PROJECT_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=output,
            start_new_session=True,
            preexec_fn=lambda: enter_namespace(host["netns"]),
        )
    log.info("lab host %d: manager %s started, pid %d", host["number"], host["manager_id"], process.pid)
    return process_state(process.pid)


def wait_ready(amqp_url: str, host: dict, directory: pathlib.Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        try:
            with Client(amqp_url, host["manager_id"], timeout=2.0) as client:
                client.request({"command": "list"})
            return
        except ClientError as exc:
            ref = process_ref(host.get("manager"))
            if ref is None or not ref.is_alive():
                raise LabError(
                    f"manager {host['manager_id']} exited; see"
                    f" {directory / 'hosts' / ('h' + str(host['number'])) / 'manager.log'}"
                ) from exc
            if time.monotonic() > deadline:
                raise LabError(
                    f"manager {host['manager_id']} did not reply to list within"
                    f" {READY_TIMEOUT:.0f} s; see its manager.log under {directory / 'hosts'}"
                ) from exc
            time.sleep(0.5)


# --- one host's manager -----------------------------------------------------


def lab_host(directory: pathlib.Path, number: int) -> tuple[dict, dict]:
    """Return the lab's state and host ``number``'s entry, or raise LabError."""
    directory = directory.resolve()
    state = read_state(directory)
    if state is None:
        raise LabError(f"no lab is recorded in {directory}: run `python -m deploy.lab up` first")
    for host in state["hosts"]:
        if host["number"] == number:
            return state, host
    raise LabError(f"the lab in {directory} has no host {number}: use 1 to {len(state['hosts'])}")


def kill_manager(directory: pathlib.Path, number: int) -> int:
    """SIGKILL host ``number``'s manager and return its pid.

    Its containers run on until the lab's heartbeat timeout.
    """
    _, host = lab_host(directory, number)
    ref = process_ref(host.get("manager"))
    if ref is None or not ref.is_alive():
        raise LabError(
            f"the manager of host {number} is not running: start it with"
            f" `python -m deploy.lab start-manager --dir {directory} {number}`"
        )
    ref.send_signal(signal.SIGKILL)
    deadline = time.monotonic() + STOP_TIMEOUT
    while ref.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    log.info("lab host %d: manager %s (pid %d) killed", number, host["manager_id"], ref.pid)
    return ref.pid


def restart_manager(directory: pathlib.Path, number: int) -> int:
    """Start host ``number``'s manager again with its id and state; return its pid."""
    directory = directory.resolve()
    state, host = lab_host(directory, number)
    ref = process_ref(host.get("manager"))
    if ref is not None and ref.is_alive():
        raise LabError(
            f"the manager of host {number} is running (pid {ref.pid}): stop it with"
            f" `python -m deploy.lab kill-manager --dir {directory} {number}` first"
        )
    host["manager"] = start_manager(directory, host, state["amqp_url"], state["heartbeat_timeout"])
    write_state(directory, state)
    wait_ready(state["amqp_url"], host, directory)
    return host["manager"]["pid"]


# --- down --------------------------------------------------------------------


def down(directory: pathlib.Path) -> None:
    """Tear down the lab recorded in ``directory``; safe to repeat after a partial up."""
    directory = directory.resolve()
    state = read_state(directory)
    if state is None:
        log.info("no lab recorded in %s; nothing to do", directory)
        return
    for host in state["hosts"]:
        stop_process(process_ref(host.get("manager")), f"manager {host['manager_id']}", signal.SIGTERM)
    for host in state["hosts"]:
        end_containers(directory, host)
    stop_process(process_ref(state.get("relay")), "broker relay", signal.SIGTERM)
    if state.get("broker_dir"):
        broker_dir = pathlib.Path(state["broker_dir"])
        if (broker_dir / "node.json").exists():
            try:
                PrivateNode.load(broker_dir).stop()
            except RabbitMQNodeError as exc:
                log.error("lab broker in %s did not stop: %s", broker_dir, exc)
        shutil.rmtree(broker_dir, ignore_errors=True)

    with IPRoute() as ipr:
        for name in [host["veth"] for host in state["hosts"]] + [state["bridge"]]:
            indexes = ipr.link_lookup(ifname=name)
            if indexes:
                ipr.link("del", index=indexes[0])
                log.info("lab interface %s deleted", name)
    for host in state["hosts"]:
        if host["netns"] in netns.listnetns():
            netns.remove(host["netns"])
            log.info("lab host %d: namespace %s removed", host["number"], host["netns"])

    shutil.rmtree(directory / "hosts", ignore_errors=True)
    (directory / "relay.log").unlink(missing_ok=True)
    (directory / STATE_FILE).unlink()
    log.info("lab %s in %s is down", state["tag"], directory)


def stop_process(ref: ProcessRef | None, what: str, signum: int) -> None:
    """Signal a recorded process, wait for it, and SIGKILL it after STOP_TIMEOUT."""
    if ref is None or not ref.is_alive():
        return
    ref.send_signal(signum)
    deadline = time.monotonic() + STOP_TIMEOUT
    while ref.is_alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    if ref.is_alive():
        log.warning("%s (pid %d) still runs %.0f s after %s; sending SIGKILL", what, ref.pid, STOP_TIMEOUT, signal.Signals(signum).name)
        ref.send_signal(signal.SIGKILL)
    log.info("%s (pid %d) stopped", what, ref.pid)


def end_containers(directory: pathlib.Path, host: dict) -> None:
    """Kill the assistants and runc containers of one lab host and remove its network."""
    host_dir = directory / "hosts" / f"h{host['number']}"
    marker = str(host_dir / "state").encode()
    for entry in pathlib.Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command_line = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        # Only assistants whose command line names this lab host's state
        # directory, which only the lab's own manager starts.
        if b"assistant" in command_line and marker in command_line:
            log.info("lab host %d: killing assistant %s", host["number"], entry.name)
            try:
                os.kill(int(entry.name), signal.SIGKILL)
            except ProcessLookupError:
                pass
    runc = Runc("runc", host_dir / "runc" / host["manager_id"])
    if runc.root.exists():
        try:
            container_ids = runc.list_ids()
        except RuncError as exc:
            log.error("lab host %d: cannot list runc containers: %s", host["number"], exc)
            container_ids = []
        for container_id in container_ids:
            try:
                runc.kill(container_id, "SIGKILL", all_processes=True)
            except RuncError as exc:
                log.info("lab host %d: container %s: runc kill: %s", host["number"], container_id, exc.text)
            try:
                runc.delete(container_id)
            except RuncError as exc:
                log.warning("lab host %d: container %s: runc delete failed: %s", host["number"], container_id, exc)
    # The manager's bridge and veths vanish with the host namespace; the
    # container namespaces are files in /run/netns and need removing.
    remove_manager_network(host["manager_id"])
    # runc delete leaves the manager's parent cgroups; they are empty now.
    for directory in cgroup_dirs(f"/berth/{host['manager_id']}"):
        try:
            directory.rmdir()
        except OSError as exc:
            log.warning("lab host %d: cannot remove cgroup %s: %s", host["number"], directory, exc)


# --- command line ------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.lab", description="Run a multi-host berth lab on one machine.")
    commands = parser.add_subparsers(dest="command", required=True)
    start = commands.add_parser("up", help="build the lab and start a manager per host")
    start.add_argument("--hosts", type=int, default=3, help="number of hosts (1 to %d)" % MAX_HOSTS)
    start.add_argument("--dir", type=pathlib.Path, required=True, help="directory for the lab's state and logs")
    start.add_argument("--subnet", default=DEFAULT_SUBNET, help="IPv4 subnet of the lab bridge")
    start.add_argument("--heartbeat-timeout", type=float, default=10.0, help="seconds a workload survives without its manager")
    start.add_argument("--no-overlay", action="store_true", help="leave out the VXLAN overlay between the hosts")
    stop = commands.add_parser("down", help="stop everything the lab started and remove it")
    stop.add_argument("--dir", type=pathlib.Path, required=True, help="directory given to up")
    for name, text in (
        ("kill-manager", "SIGKILL one host's manager, as a crash would"),
        ("start-manager", "start one host's manager again with its state"),
    ):
        host_command = commands.add_parser(name, help=text)
        host_command.add_argument("--dir", type=pathlib.Path, required=True, help="directory given to up")
        host_command.add_argument("host", type=int, help="host number, from 1")
    arguments = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    # pika warns about every command returned while a manager starts.
    logging.getLogger("pika").setLevel(logging.ERROR)
    logging.getLogger("pyroute2").setLevel(logging.WARNING)
    if os.geteuid() != 0:
        parser.error("the lab must run as root: it creates namespaces and runs managers")
    try:
        if arguments.command == "up":
            state = up(
                arguments.dir,
                arguments.hosts,
                arguments.subnet,
                arguments.heartbeat_timeout,
                with_overlay=not arguments.no_overlay,
            )
            print(f"export BERTH_AMQP_URL={state['amqp_url']}")
            for host in state["hosts"]:
                print(f"# host {host['number']}: manager id {host['manager_id']}, namespace {host['netns']}, address {host['address']}")
        elif arguments.command == "kill-manager":
            pid = kill_manager(arguments.dir, arguments.host)
            print(f"# host {arguments.host}: manager pid {pid} killed")
        elif arguments.command == "start-manager":
            pid = restart_manager(arguments.dir, arguments.host)
            print(f"# host {arguments.host}: manager started, pid {pid}")
        else:
            down(arguments.dir)
    except (LabError, OSError, RabbitMQNodeError, ValueError) as exc:
        log.error("lab %s failed: %s", arguments.command, exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
